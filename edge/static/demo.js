// The demo page: live quotes, a trades tape and the client's state, from fanout.js.
//
// Messages only update plain objects and mark what changed; the DOM is written at most once
// per animation frame, and only the cells whose text changed.
//
// Query parameters: ?symbols=MNQ,ES  ?url=ws://a/ws,ws://b/ws  ?debug=1
//
// For browser tests: window.fanout is the client (positions(), counters, state);
// window.fanoutDemo holds the page's view of the data.

import { FanoutClient } from "./fanout.js";

const DEFAULT_SYMBOLS = ["MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM"];
const TAPE_LENGTH = 20;

const params = new URLSearchParams(location.search);
const list = (name) => (params.get(name) || "").split(",").map((s) => s.trim()).filter(Boolean);
const symbols = list("symbols").length ? list("symbols") : DEFAULT_SYMBOLS;
const urls = list("url");

const client = new FanoutClient(urls.length ? urls : undefined, { name: "demo", debug: !["", "0", null].includes(params.get("debug")) });

// --- the page's data ----------------------------------------------------------------------

const quotes = new Map(); // symbol -> {data, prevLast, tick, cells}
const tape = []; // newest first, at most TAPE_LENGTH trades
const tapeCells = []; // TAPE_LENGTH rows of cells
const channels = new Map(); // channel -> {offset, epoch, cells}
const dirtyQuotes = new Set();
const dirtyChannels = new Set();
let tapeDirty = false;
let frame = 0;

// --- formatting -----------------------------------------------------------------------------

const intFmt = new Intl.NumberFormat("en-US");
const num = (v) => typeof v === "number" && Number.isFinite(v);
const price = (v) => (num(v) ? v.toFixed(2) : "");
const int = (v) => (num(v) ? intFmt.format(v) : "");
const signed = (v, digits) => (num(v) ? (v > 0 ? "+" : "") + v.toFixed(digits) : "");
const direction = (v) => (!num(v) || v === 0 ? "flat" : v > 0 ? "up" : "down");

function tsMillis(ts) {
  if (typeof ts === "string") return Date.parse(ts);
  if (!num(ts)) return NaN;
  if (ts > 1e17) return ts / 1e6; // ns
  if (ts > 1e14) return ts / 1e3; // µs
  if (ts > 1e11) return ts; // ms
  return ts * 1e3; // s
}

function clock(ts) {
  const ms = tsMillis(ts);
  if (!Number.isFinite(ms)) return "";
  const d = new Date(ms);
  const two = (n) => String(n).padStart(2, "0");
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

// --- DOM helpers ----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function setText(el, text) {
  if (el._text !== text) {
    el._text = text;
    el.textContent = text;
  }
}

// Cells keep the class they were built with; `mod` is added to it (up, down, tick-up, ...).
function setMod(el, mod) {
  if (el._mod !== mod) {
    el._mod = mod;
    el.className = el._base ? `${el._base} ${mod}` : mod;
  }
}

function row(tbody, classes, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  const cells = classes.map((cls) => {
    const td = document.createElement("td");
    td.className = td._base = cls;
    tr.appendChild(td);
    return td;
  });
  tbody.appendChild(tr);
  return cells;
}

// --- rendering ------------------------------------------------------------------------------

let scheduled = false;
function schedule() {
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(render);
  }
}

function render() {
  scheduled = false;
  frame += 1;
  for (const symbol of dirtyQuotes) renderQuote(quotes.get(symbol));
  dirtyQuotes.clear();
  for (const channel of dirtyChannels) {
    const c = channels.get(channel);
    setText(c.cells[1], c.epoch ?? "");
    setText(c.cells[2], c.offset == null ? "" : String(c.offset));
  }
  dirtyChannels.clear();
  if (tapeDirty) renderTape();
  tapeDirty = false;
  renderCounters();
}

function renderQuote(q) {
  const d = q.data;
  const [sym, bidSize, bid, ask, askSize, last, chg, chgPct, volume, offset] = q.cells;
  setText(sym, q.symbol);
  setText(bidSize, int(d.bid_size));
  setText(bid, price(d.bid));
  setText(ask, price(d.ask));
  setText(askSize, int(d.ask_size));
  setText(last, price(d.last));
  setMod(last, "tick-" + q.tick);
  const prevClose = num(d.last) && num(d.change) ? d.last - d.change : NaN;
  setText(chg, signed(d.change, 2));
  setText(chgPct, prevClose ? signed((d.change / prevClose) * 100, 2) + "%" : "");
  const cls = direction(d.change);
  setMod(chg, cls);
  setMod(chgPct, cls);
  setText(volume, int(d.volume));
  setText(offset, q.offset == null ? "" : String(q.offset));
}

function renderTape() {
  tapeCells.forEach((cells, i) => {
    const t = tape[i];
    const [time, sym, side, px, size] = cells;
    setText(time, t ? clock(t.ts) : "");
    setText(sym, t ? t.symbol || "" : "");
    const s = t && typeof t.side === "string" ? t.side.toLowerCase() : "";
    const buy = s.startsWith("b");
    setText(side, t ? (s ? (buy ? "BUY" : s.startsWith("s") ? "SELL" : t.side) : "") : "");
    setMod(side, (buy ? "up" : s.startsWith("s") ? "down" : "flat"));
    setText(px, t ? price(t.price) : "");
    setText(size, t ? int(t.size) : "");
  });
}

const counterCells = ["messages", "recovered", "resynced", "gaps", "duplicates", "reconnects"].map((k) => [k, $("c-" + k)]);
function renderCounters() {
  for (const [k, el] of counterCells) setText(el, int(client.counters[k]));
}

// --- state updates from the client --------------------------------------------------------

// Offsets received per channel (the newest 10,000), for tests to check contiguity.
const received = new Map();
function logOffset(channel, offset) {
  let list = received.get(channel);
  if (!list) received.set(channel, (list = []));
  list.push(offset);
  if (list.length > 10000) list.splice(0, list.length - 10000);
}

function trackChannel(channel, offset, epoch) {
  const c = channels.get(channel);
  c.offset = offset;
  c.epoch = epoch;
  dirtyChannels.add(channel);
}

function setQuote(q, data, replace) {
  const prevLast = q.data.last;
  q.data = replace ? { ...data } : Object.assign(q.data, data); // quote publications merge
  if (num(q.data.last) && num(prevLast) && q.data.last !== prevLast) q.tick = q.data.last > prevLast ? "up" : "down";
  dirtyQuotes.add(q.symbol);
  schedule();
}

function addTrade(trade) {
  tape.unshift(trade);
  if (tape.length > TAPE_LENGTH) tape.length = TAPE_LENGTH;
  tapeDirty = true;
  schedule();
}

function subscribeSymbol(symbol) {
  const q = quotes.get(symbol);
  client.subscribe(`quotes.${symbol}`, {
    snapshot: true,
    onResync(snapshot, info) {
      q.offset = info.offset;
      trackChannel(info.channel, info.offset, info.epoch);
      setQuote(q, snapshot[""] || {}, true);
    },
    onMessage(data, meta) {
      q.offset = meta.offset;
      logOffset(meta.channel, meta.offset);
      trackChannel(meta.channel, meta.offset, meta.epoch);
      setQuote(q, data, false);
    },
    onSubscribed(info) {
      q.offset = info.offset;
      trackChannel(info.channel, info.offset, info.epoch);
      dirtyQuotes.add(symbol);
      schedule();
    },
  });
  client.subscribe(`trades.${symbol}`, {
    snapshot: true,
    onResync(snapshot, info) {
      trackChannel(info.channel, info.offset, info.epoch);
      // The tape is a history, not state: only the first snapshot (the last trade) goes in.
      const last = snapshot[""];
      if (info.reason === "initial" && last) {
        tape.push({ symbol, ...last });
        tape.sort((a, b) => (tsMillis(b.ts) || 0) - (tsMillis(a.ts) || 0));
        if (tape.length > TAPE_LENGTH) tape.length = TAPE_LENGTH;
        tapeDirty = true;
      }
      schedule();
    },
    onMessage(data, meta) {
      logOffset(meta.channel, meta.offset);
      trackChannel(meta.channel, meta.offset, meta.epoch);
      addTrade({ symbol, ...data });
    },
    onSubscribed(info) {
      trackChannel(info.channel, info.offset, info.epoch);
      schedule();
    },
  });
}

// --- connection state ---------------------------------------------------------------------

let countdown = null;
function showState(state, info) {
  const pill = $("state");
  pill.textContent = state;
  pill.dataset.state = state;
  document.body.dataset.state = state;
  clearInterval(countdown);
  const detail = $("state-detail");
  const closeText = info.code ? `${info.code}${info.reason ? " " + info.reason : ""}` : "";
  if (state === "open") {
    detail.textContent = `${info.url} · client ${info.client}`;
  } else if (state === "connecting") {
    detail.textContent = `${info.url}${info.attempt ? ` · attempt ${info.attempt}` : ""}`;
  } else if (state === "reconnecting") {
    const until = Date.now() + info.delay;
    const tick = () => {
      const left = Math.max(0, until - Date.now()) / 1000;
      detail.textContent = `in ${left.toFixed(1)} s · attempt ${info.attempt}${closeText ? " · closed " + closeText : ""}`;
    };
    tick();
    if (info.delay > 100) countdown = setInterval(tick, 100);
  } else {
    detail.textContent = closeText ? `${info.final ? "server refused: " : ""}${closeText}` : "";
  }
}

// --- start ----------------------------------------------------------------------------------

function build() {
  const qBody = $("quotes").tBodies[0];
  const cBody = $("channels").tBodies[0];
  const numCells = ["bid-size", "bid", "ask", "ask-size", "last", "chg", "chg-pct", "volume", "offset"];
  for (const symbol of symbols) {
    const cells = row(qBody, ["l sym", ...numCells], { "data-symbol": symbol });
    quotes.set(symbol, { symbol, data: {}, offset: null, tick: "flat", cells });
    cells[0].textContent = symbol;
  }
  for (const symbol of symbols) {
    for (const channel of [`quotes.${symbol}`, `trades.${symbol}`]) {
      const cells = row(cBody, ["l", "l epoch", "offset"], { "data-channel": channel });
      cells[0].textContent = channel;
      channels.set(channel, { offset: null, epoch: null, cells });
    }
  }
  const tBody = $("trades").tBodies[0];
  for (let i = 0; i < TAPE_LENGTH; i++) tapeCells.push(row(tBody, ["l time", "l sym", "l side", "", ""]));
}

function start() {
  build();
  client.on("state", showState);
  client.on("error", (err) => console.warn("[demo] server error:", err));
  $("reconnect").addEventListener("click", () => client.reconnectNow());

  // Message rate, once a second; this also refreshes the counters while nothing is rendered.
  let lastCount = 0;
  setInterval(() => {
    setText($("rate"), int(client.counters.messages - lastCount));
    lastCount = client.counters.messages;
    schedule();
  }, 1000);

  for (const symbol of symbols) subscribeSymbol(symbol);
  client.connect();
}

window.fanout = client;
window.fanoutDemo = {
  client,
  symbols,
  quotes, // symbol -> {data, offset, ...}
  tape, // newest first
  positions: () => client.positions(),
  counters: client.counters,
  frames: () => frame,
  received: () => Object.fromEntries(received),
};

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
