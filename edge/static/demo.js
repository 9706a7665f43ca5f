// The demo page: live quotes, a trades tape, 1-minute bars and the depth ladder of the
// selected symbol, and the client's state: a showcase of the browser client, the npm package
// @fanout/client (clients/js), imported here from the copy every edge serves at
// /static/fanout.js.
//
// Messages only update plain objects and mark what changed; the DOM is written at most once
// per animation frame, and only the cells whose text changed.
//
// Query parameters: ?symbols=MNQ,ES  ?url=ws://a/ws,ws://b/ws  ?debug=1
//
// For browser tests: window.fanout is the client (positions(), counters, state);
// window.fanoutDemo holds the page's view of the data.

import { FanoutClient } from "/static/fanout.js";

const DEFAULT_SYMBOLS = ["MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM"];
const TAPE_LENGTH = 20;

const params = new URLSearchParams(location.search);
const list = (name) => (params.get(name) || "").split(",").map((s) => s.trim()).filter(Boolean);
const symbols = list("symbols").length ? list("symbols") : DEFAULT_SYMBOLS;
const urls = list("url");

const client = new FanoutClient(urls.length ? urls : undefined, {
  name: "demo",
  debug: !["", "0", null].includes(params.get("debug")),
  // Positions in sessionStorage: a reload recovers what it missed (?persist=0 turns it off).
  persist: params.get("persist") !== "0",
});

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
  if (chart.symbol && dirtyQuotes.has(chart.symbol)) chart.dirty = true; // its last-price line
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
  if (depth.dirty) renderDepth();
  if (chart.dirty) {
    try {
      drawChart();
    } catch (err) {
      console.warn("[demo] chart:", err); // never let the chart stop the tables
    }
  }
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
      tradeForChart(symbol, data);
    },
    onSubscribed(info) {
      trackChannel(info.channel, info.offset, info.epoch);
      schedule();
    },
  });
}

// --- 1-minute bar chart of the selected symbol ------------------------------------------------
//
// bars.1m.<SYM> of the selected symbol only (the previous one is unsubscribed). The snapshot
// holds the last closed bar (key ""); the subscribe reply's offset is the newest bar's, so a
// `history` request for the MAX_BARS offsets up to it fills the chart on open (once per
// epoch). Messages are closed bars, and on recovery older bars replay as ordinary messages:
// bars are kept by start time, so a replay or the history reply replaces, never doubles.
// The bar still forming is drawn from the symbol's trades until its closed bar arrives.

const BAR_MS = 60_000;
const MAX_BARS = 60;
const chart = {
  symbol: null,
  sub: null, // the bars subscription handle
  bars: [], // closed bars, oldest first, at most MAX_BARS, unique `t`
  live: null, // {t, o, h, l, c, v, n}: the bar forming from trades, newer than every closed bar
  offset: null,
  history: { epoch: null, state: "none", bars: 0 }, // the last history load: loading, done, failed
  dirty: false,
  size: { w: 0, h: 0, dpr: 1 },
};

// The recent bars before `info.offset` (the newest at subscribe time), once per epoch.
function loadBars(channel, symbol, info) {
  if (chart.history.epoch === info.epoch || info.offset < 1) return;
  const from = Math.max(1, info.offset - MAX_BARS + 1);
  chart.history = { epoch: info.epoch, state: "loading", bars: 0 };
  client.history(channel, from, info.offset, info.epoch).then(
    (pubs) => {
      if (chart.symbol !== symbol || chart.history.epoch !== info.epoch) return;
      for (const pub of pubs) putBar(pub.data);
      chart.history = { epoch: info.epoch, state: "done", bars: pubs.length };
      markChart();
    },
    (err) => {
      // history_unavailable (trimmed meanwhile): the snapshot and live bars still draw.
      if (chart.symbol !== symbol) return;
      chart.history = { epoch: info.epoch, state: "failed", bars: 0, code: err.code };
      console.warn("[demo] bars history:", err.code || err.message);
      if (err.code !== "history_unavailable") chart.history.epoch = null; // retry next time
    },
  );
}

function validBar(b) {
  return b && num(b.t) && num(b.o) && num(b.h) && num(b.l) && num(b.c);
}

function putBar(bar) {
  if (!validBar(bar)) return;
  const bars = chart.bars;
  let i = bars.length;
  while (i > 0 && bars[i - 1].t > bar.t) i--;
  if (i > 0 && bars[i - 1].t === bar.t) bars[i - 1] = bar;
  else bars.splice(i, 0, bar);
  if (bars.length > MAX_BARS) bars.splice(0, bars.length - MAX_BARS);
  if (chart.live && chart.live.t <= bars[bars.length - 1].t) chart.live = null;
  markChart();
}

function tradeForChart(symbol, trade) {
  if (symbol !== chart.symbol || !num(trade.price)) return;
  const ms = tsMillis(trade.ts);
  if (!Number.isFinite(ms)) return;
  const t = Math.floor(ms / BAR_MS) * BAR_MS;
  const lastClosed = chart.bars.length ? chart.bars[chart.bars.length - 1].t : -Infinity;
  if (t <= lastClosed) return; // that bar is closed already
  const p = trade.price;
  const size = num(trade.size) ? trade.size : 0;
  const live = chart.live;
  if (!live || t > live.t) chart.live = { t, o: p, h: p, l: p, c: p, v: size, n: 1 };
  else if (t === live.t) Object.assign(live, { h: Math.max(live.h, p), l: Math.min(live.l, p), c: p, v: live.v + size, n: live.n + 1 });
  else return; // an older trade (the tape's snapshot, or out of order)
  markChart();
}

function markChart() {
  chart.dirty = true;
  schedule();
}

function selectSymbol(symbol) {
  if (symbol === chart.symbol || !quotes.has(symbol)) return;
  if (chart.sub) chart.sub.unsubscribe();
  const prev = quotes.get(chart.symbol);
  if (prev) prev.cells[0].parentNode.classList.remove("selected");
  quotes.get(symbol).cells[0].parentNode.classList.add("selected");
  Object.assign(chart, { symbol, bars: [], live: null, offset: null, sub: null,
    history: { epoch: null, state: "none", bars: 0 } });
  setText($("chart-symbol"), symbol);
  selectDepth(symbol);
  const channel = `bars.1m.${symbol}`;
  const mine = () => chart.symbol === symbol; // late callbacks of a previous selection
  try {
    chart.sub = client.subscribe(channel, {
      snapshot: true,
      onResync(snapshot, info) {
        if (!mine()) return;
        chart.offset = info.offset;
        // The snapshot is the newest closed bar: keep the older ones (the chart is a history)
        // unless the snapshot is older than them (a new epoch).
        const bar = snapshot[""];
        if (validBar(bar) && chart.bars.length && bar.t < chart.bars[chart.bars.length - 1].t) chart.bars = [];
        putBar(bar);
        markChart();
      },
      onMessage(data, meta) {
        if (!mine()) return;
        chart.offset = meta.offset;
        putBar(data);
        markChart();
      },
      onSubscribed(info) {
        if (!mine()) return;
        chart.offset = info.offset;
        loadBars(channel, symbol, info);
        markChart();
      },
      onError(err) {
        if (mine()) setText($("chart-detail"), `${err.code}: ${err.message}`);
      },
    });
  } catch (err) {
    console.warn("[demo] bars subscribe:", err);
  }
  markChart();
}

function resizeChart() {
  const canvas = $("chart");
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  chart.size = { w, h, dpr };
}

// A round step for about `count` ticks over `span`.
function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 2.5 ? 2.5 : n <= 5 ? 5 : 10) * mag;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawChart() {
  chart.dirty = false;
  const canvas = $("chart");
  if (!canvas) return;
  resizeChart();
  const { w, h, dpr } = chart.size;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.scale(dpr, dpr);
  const W = w / dpr, H = h / dpr;
  const axisW = 64, timeH = 18, pad = 8;
  const plotW = W - axisW - pad, plotH = H - timeH - pad;
  const bars = chart.live ? chart.bars.concat(chart.live) : chart.bars;
  const shown = bars.slice(-MAX_BARS);
  const q = quotes.get(chart.symbol);
  const lastPx = q && num(q.data.last) ? q.data.last : null;

  setText($("chart-detail"), chart.symbol
    ? `${chart.bars.length} bar${chart.bars.length === 1 ? "" : "s"}${chart.offset != null ? ` · offset ${chart.offset}` : ""}`
    : "");

  ctx.font = `11px ${cssVar("--mono") || "monospace"}`;
  ctx.textBaseline = "middle";
  const dim = cssVar("--dim") || "#7c8799";
  if (!shown.length || plotW < 20 || plotH < 20) {
    ctx.fillStyle = dim;
    ctx.textAlign = "center";
    ctx.fillText(chart.symbol ? "waiting for the first 1-minute bar…" : "select a symbol", W / 2, H / 2);
    return;
  }

  let lo = Infinity, hi = -Infinity;
  for (const b of shown) {
    lo = Math.min(lo, b.l);
    hi = Math.max(hi, b.h);
  }
  if (lastPx != null) {
    lo = Math.min(lo, lastPx);
    hi = Math.max(hi, lastPx);
  }
  if (hi === lo) {
    hi += 0.5;
    lo -= 0.5;
  }
  const margin = (hi - lo) * 0.06;
  lo -= margin;
  hi += margin;
  const y = (p) => pad + ((hi - p) / (hi - lo)) * plotH;

  // Price axis and grid.
  const step = niceStep(hi - lo, Math.max(2, Math.floor(plotH / 40)));
  const digits = step >= 1 ? 2 : Math.min(6, Math.ceil(-Math.log10(step)) + 1);
  ctx.textAlign = "left";
  ctx.lineWidth = 1;
  for (let p = Math.ceil(lo / step) * step; p <= hi; p += step) {
    const yy = Math.round(y(p)) + 0.5;
    ctx.strokeStyle = "rgba(255,255,255,0.05)";
    ctx.beginPath();
    ctx.moveTo(0, yy);
    ctx.lineTo(plotW, yy);
    ctx.stroke();
    ctx.fillStyle = dim;
    ctx.fillText(p.toFixed(digits), plotW + 6, yy);
  }
  ctx.strokeStyle = cssVar("--border") || "#222a3a";
  ctx.beginPath();
  ctx.moveTo(plotW + 0.5, pad);
  ctx.lineTo(plotW + 0.5, pad + plotH);
  ctx.stroke();

  // Candles: slots for MAX_BARS minutes ending at the newest bar, so gaps in time show.
  const newest = shown[shown.length - 1].t;
  const slot = plotW / MAX_BARS;
  const body = Math.max(1, Math.floor(slot * 0.7));
  const up = cssVar("--up") || "#22c55e", down = cssVar("--down") || "#f04f5a";
  ctx.textAlign = "center";
  for (const b of shown) {
    const idx = MAX_BARS - 1 - Math.round((newest - b.t) / BAR_MS);
    if (idx < 0) continue;
    const cx = Math.round(idx * slot + slot / 2) + 0.5;
    const color = b.c >= b.o ? up : down;
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.globalAlpha = b === chart.live ? 0.5 : 1;
    ctx.beginPath();
    ctx.moveTo(cx, Math.round(y(b.h)));
    ctx.lineTo(cx, Math.round(y(b.l)));
    ctx.stroke();
    const top = Math.round(y(Math.max(b.o, b.c)));
    const bottom = Math.max(top + 1, Math.round(y(Math.min(b.o, b.c))));
    ctx.fillRect(Math.round(cx - body / 2), top, body, bottom - top);
    ctx.globalAlpha = 1;
    const d = new Date(b.t);
    if (d.getMinutes() % 10 === 0) {
      ctx.fillStyle = dim;
      ctx.fillText(`${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`, cx, pad + plotH + timeH / 2 + 2);
    }
  }

  // The last traded price.
  if (lastPx != null) {
    const yy = Math.round(y(lastPx)) + 0.5;
    ctx.strokeStyle = ctx.fillStyle = cssVar("--accent") || "#4da3ff";
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(0, yy);
    ctx.lineTo(plotW, yy);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillRect(plotW + 1, yy - 8, axisW - 1, 16);
    ctx.fillStyle = "#fff";
    ctx.textAlign = "left";
    ctx.fillText(lastPx.toFixed(digits), plotW + 6, yy);
  }
}

// --- depth ladder of the selected symbol --------------------------------------------------------
//
// depth.<SYM> is keyed: the snapshot maps "bid:<price>" / "ask:<price>" to {side, price, size};
// a message sets its key, a deleted one (or size 0) removes it. The snapshot replaces the
// ladder (initial and every resync); "conflate" delivery may skip offsets, each message still
// carrying its key's latest value, so applying every message keeps the ladder exact.

const DEPTH_LEVELS = 10;
const depth = {
  symbol: null,
  sub: null,
  levels: new Map(), // key -> {side, price, size}
  offset: null,
  updates: 0, // messages applied since the selection
  dirty: false,
  rows: [], // 2 * DEPTH_LEVELS rows of [bidSize, price, askSize] cells: asks, then bids
};

function setLevel(key, level, deleted) {
  if (deleted || !level || !num(level.price) || !num(level.size) || level.size <= 0) depth.levels.delete(key);
  else depth.levels.set(key, { side: level.side, price: level.price, size: level.size });
}

function markDepth() {
  depth.dirty = true;
  schedule();
}

function selectDepth(symbol) {
  if (depth.sub) depth.sub.unsubscribe();
  Object.assign(depth, { symbol, sub: null, levels: new Map(), offset: null, updates: 0 });
  setText($("depth-symbol"), symbol);
  const mine = () => depth.symbol === symbol;
  try {
    depth.sub = client.subscribe(`depth.${symbol}`, {
      snapshot: true,
      onResync(snapshot, info) {
        if (!mine()) return;
        depth.levels = new Map();
        for (const [key, level] of Object.entries(snapshot || {})) setLevel(key, level, false);
        depth.offset = info.offset;
        markDepth();
      },
      onMessage(data, meta) {
        if (!mine()) return;
        setLevel(meta.key, data, meta.deleted);
        depth.offset = meta.offset;
        depth.updates += 1;
        markDepth();
      },
      onSubscribed(info) {
        if (mine()) depth.offset = info.offset;
        markDepth();
      },
      onError(err) {
        if (mine()) setText($("depth-detail"), `${err.code}: ${err.message}`);
      },
    });
  } catch (err) {
    console.warn("[demo] depth subscribe:", err);
  }
  markDepth();
}

// The best DEPTH_LEVELS of each side: bids highest first, asks lowest first.
function ladder() {
  const bids = [], asks = [];
  for (const level of depth.levels.values()) (level.side === "ask" ? asks : bids).push(level);
  bids.sort((a, b) => b.price - a.price);
  asks.sort((a, b) => a.price - b.price);
  return { bids: bids.slice(0, DEPTH_LEVELS), asks: asks.slice(0, DEPTH_LEVELS) };
}

function renderDepth() {
  depth.dirty = false;
  const { bids, asks } = ladder();
  const maxSize = Math.max(1, ...bids.map((l) => l.size), ...asks.map((l) => l.size));
  // Asks from the DEPTH_LEVELS-th best down to the best, then bids from the best down.
  const rows = [];
  for (let i = DEPTH_LEVELS - 1; i >= 0; i--) rows.push(asks[i] ? { ...asks[i], side: "ask" } : null);
  for (let i = 0; i < DEPTH_LEVELS; i++) rows.push(bids[i] ? { ...bids[i], side: "bid" } : null);
  rows.forEach((level, i) => {
    const [bidSize, px, askSize] = depth.rows[i];
    const tr = bidSize.parentNode;
    tr.dataset.side = level ? level.side : "";
    tr.dataset.price = level ? String(level.price) : "";
    setText(bidSize, level && level.side === "bid" ? int(level.size) : "");
    setText(px, level ? price(level.price) : "");
    setText(askSize, level && level.side === "ask" ? int(level.size) : "");
    const pct = level ? Math.round((level.size / maxSize) * 100) : 0;
    tr.style.setProperty("--fill", `${pct}%`);
  });
  setText($("depth-detail"), depth.symbol
    ? `${bids.length + asks.length} levels${depth.offset != null ? ` · offset ${depth.offset}` : ""}`
    : "");
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
  const dBody = $("depth").tBodies[0];
  for (let i = 0; i < 2 * DEPTH_LEVELS; i++) depth.rows.push(row(dBody, ["bid-size", "price", "ask-size"]));
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
  $("quotes").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-symbol]");
    if (tr) selectSymbol(tr.dataset.symbol);
  });
  if (typeof ResizeObserver === "function") new ResizeObserver(markChart).observe($("chart"));
  else window.addEventListener("resize", markChart);
  selectSymbol(symbols[0]);
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
  chart: () => ({ symbol: chart.symbol, bars: chart.bars.slice(), live: chart.live && { ...chart.live },
    history: { ...chart.history } }),
  depth: () => ({ symbol: depth.symbol, offset: depth.offset, updates: depth.updates, ...ladder() }),
  select: (symbol) => selectSymbol(symbol),
};

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
