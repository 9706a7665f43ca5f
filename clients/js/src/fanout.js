// fanout.js: a small, dependency-free browser client for the fanout edge WebSocket.
//
// Plain ES module, no build step. Types: fanout.d.ts. Wire protocol: docs/protocol.md.
// The npm package @fanout/client (clients/js); every edge also serves it at /static/fanout.js.
//
//   import { FanoutClient } from "@fanout/client";    // or "/static/fanout.js" from an edge
//   const client = new FanoutClient();           // ws(s)://<location.host>/ws
//   client.subscribe("quotes.MNQ", { snapshot: true, onResync, onMessage });
//   client.connect();
//
// The client keeps, per channel, the last offset it delivered and the channel's epoch.
// After any reconnect it subscribes again with `recover` from that position, so the
// application sees publications in offset order, never twice, or else a resync (a snapshot
// that replaces its state for the channel). What a slow client may miss depends on the
// channel's `delivery` (in the subscribe reply):
//   "all"      every publication; a skipped offset is a gap, filled by re-subscribing.
//   "conflate" offsets may skip (each message carries the latest value of its key, quotes
//              merged server-side): applying every message gives the current state.
//   "drop"     dropped ranges are announced by `gap` notices (onGap, the "gap" event);
//              fetch them with client.history(channel, from, to) if needed.
// With `maxRate`, offsets may skip on any channel, as on "conflate".

const DEFAULT_BACKOFF = { min: 500, max: 20000 }; // ms
const CONNECT_TIMEOUT_MS = 10000; // socket open + `connected` reply
const HEARTBEAT_GRACE_MS = 2000; // on top of ping_interval + pong_timeout
const RETRYABLE_ERRORS = new Set(["unavailable", "internal"]);
const SUBSCRIBE_RETRY_MS = { min: 1000, max: 5000 };
const MAX_RATE = 1000; // the server's limit for a subscribe's max_rate
const DELIVERIES = new Set(["all", "conflate", "drop"]);

// Close codes we use for connections we end ourselves (never sent by the server).
const CLOSE_CONNECT_TIMEOUT = 4000;
const CLOSE_NO_PING = 4001;
const CLOSE_CONNECT_FAILED = 4002;
const CLOSE_RECONNECT = 4003;

/** Whether a close code says "reconnect": everything but 3500-3999. */
export function shouldReconnect(code) {
  return !(code >= 3500 && code <= 3999);
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) throw new Error("FanoutClient: no URL given and no page location");
  return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
}

/** The reconnect delay (ms) a server advises in a close reason, or 0. */
/**
 * When to resend a subscribe that got a retryable error (ms): the server's advice
 * (`retry_after_ms`, an edge under load) plus up to half again, so that the clients it
 * deferred together come back spread out; without advice 1-5 s. At most a minute.
 */
export function subscribeRetryDelay(reply) {
  const advised = reply && reply.retry_after_ms;
  if (Number.isInteger(advised) && advised > 0) {
    const ms = Math.min(advised, 60000);
    return ms + Math.random() * ms / 2;
  }
  return SUBSCRIBE_RETRY_MS.min + Math.random() * (SUBSCRIBE_RETRY_MS.max - SUBSCRIBE_RETRY_MS.min);
}

export function advisedDelay(reason) {
  const m = /(?:^|\s)retry_after_ms=(\d{1,7})(?:\s|$)/.exec(reason || "");
  return m ? Number(m[1]) : 0;
}

/** `persist`: true = sessionStorage, or any object with getItem/setItem; else none. */
function resolveStorage(persist) {
  if (!persist) return null;
  if (typeof persist === "object" && typeof persist.getItem === "function") return persist;
  try {
    return globalThis.sessionStorage || null;
  } catch {
    return null; // storage disabled (privacy settings, sandboxed frames)
  }
}

function loadPositions(storage, key) {
  try {
    const value = JSON.parse(storage.getItem(key) || "{}");
    const out = {};
    for (const [channel, p] of Object.entries(value || {})) {
      if (p && Number.isInteger(p.offset) && p.offset >= 0 && typeof p.epoch === "string" && p.epoch) {
        out[channel] = { offset: p.offset, epoch: p.epoch };
      }
    }
    return out;
  } catch {
    return {};
  }
}

function jitter(attempt, min, max) {
  // Capped exponential backoff with full jitter: uniform in [0, min(max, min * 2^(n-1))].
  const cap = Math.min(max, min * 2 ** Math.max(0, attempt - 1));
  return Math.round(Math.random() * cap);
}

export class FanoutClient {
  /**
   * @param {string | string[] | object} [urls] one URL or a list to cycle through
   * @param {object} [options] {token, name, debug, backoff: {min, max}, connectTimeout, WebSocket,
   *   persist (true = sessionStorage, or a Storage-like object), persistKey}
   */
  constructor(urls, options) {
    if (urls && typeof urls === "object" && !Array.isArray(urls)) [urls, options] = [undefined, urls];
    const list = urls == null ? [defaultUrl()] : Array.isArray(urls) ? urls.slice() : [urls];
    if (!list.length) throw new Error("FanoutClient: empty URL list");
    const opts = options || {};
    this.urls = list;
    this.options = opts;
    this.backoff = { ...DEFAULT_BACKOFF, ...(opts.backoff || {}) };
    this.state = "closed";
    this.url = null; // URL of the current (or last) connection
    this.session = null; // {client, version, pingInterval, pongTimeout} of the open connection
    this.counters = { recovered: 0, resynced: 0, gaps: 0, duplicates: 0, messages: 0, reconnects: 0 };

    this._WebSocket = opts.WebSocket || globalThis.WebSocket;
    this._ws = null;
    this._wanted = false; // connect() called and not close()d
    this._attempt = 0;
    this._urlIndex = 0;
    this._nextId = 0;
    this._pending = new Map(); // request id -> reply handler (called with null if the socket goes)
    this._subs = new Map(); // channel -> subscription record
    this._listeners = new Map(); // event -> Set<fn>
    this._timers = {}; // name -> timeout handle: connect, heartbeat, reconnect

    // Optional persistence of positions (e.g. sessionStorage), so that a page reload recovers
    // from where it was instead of starting at the live tail.
    this._storage = resolveStorage(opts.persist);
    this._storageKey = typeof opts.persistKey === "string" ? opts.persistKey : "fanout.positions";
    this._stored = this._storage ? loadPositions(this._storage, this._storageKey) : {};
    if (this._storage && typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("pagehide", () => this._savePositions());
    }
  }

  // --- public API ----------------------------------------------------------------------

  /** Start connecting (no-op if already connecting or connected). */
  connect() {
    if (this._wanted && this.state !== "closed") return this;
    this._wanted = true;
    this._attempt = 0;
    this._open();
    return this;
  }

  /** Close for good (until the next connect()). Subscriptions and positions are kept. */
  close() {
    this._wanted = false;
    this._savePositions(); // where a later page (or connect()) recovers from
    this._clearTimer("reconnect");
    if (this._ws) this._drop(1000, "client closed");
    else if (this.state !== "closed") this._setState("closed", { code: 1000, reason: "client closed" });
  }

  /** Drop the current connection (if any) and connect again at once, recovering positions. */
  reconnectNow() {
    this._wanted = true;
    this._clearTimer("reconnect");
    if (this._ws) this._discardSocket(CLOSE_RECONNECT, "reconnect requested");
    this._attempt = 1;
    this._reconnect(0, { code: CLOSE_RECONNECT, reason: "reconnect requested" });
  }

  /**
   * Subscribe to a channel. Messages go to onMessage(data, meta); a snapshot that replaces
   * the channel's state (the first one if `snapshot` is true, and every resync) goes to
   * onResync(snapshot, info). Returns a handle with unsubscribe() and position().
   */
  subscribe(channel, options) {
    if (typeof channel !== "string" || !channel) throw new TypeError("channel must be a non-empty string");
    if (this._subs.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const o = options || {};
    const maxRate = o.maxRate ?? null;
    if (maxRate !== null && !(typeof maxRate === "number" && maxRate > 0 && maxRate <= MAX_RATE)) {
      throw new RangeError(`maxRate must be a number above 0 and at most ${MAX_RATE}`);
    }
    const sub = {
      channel,
      onMessage: o.onMessage,
      onResync: o.onResync,
      onSubscribed: o.onSubscribed,
      onError: o.onError,
      onGap: o.onGap,
      snapshot: !!o.snapshot,
      maxRate,
      delivery: null, // from the last subscribe reply: all | conflate | drop
      offset: o.recover ? o.recover.offset : this._stored[channel]?.offset ?? null,
      epoch: o.recover ? o.recover.epoch : this._stored[channel]?.epoch ?? null,
      phase: "idle", // idle | pending | live | refilling
      retryTimer: null,
    };
    this._subs.set(channel, sub);
    if (this.state === "open") this._sendSubscribe(sub);
    return {
      channel,
      unsubscribe: () => (this._subs.get(channel) === sub ? this.unsubscribe(channel) : false),
      position: () => (sub.epoch == null ? null : { offset: sub.offset, epoch: sub.epoch }),
      delivery: () => sub.delivery,
    };
  }

  /** Stop a subscription. Returns false if the channel was not subscribed. */
  unsubscribe(channel) {
    const sub = this._subs.get(channel);
    if (!sub) return false;
    this._subs.delete(channel);
    clearTimeout(sub.retryTimer);
    // A refilling subscription already has its unsubscribe on the wire.
    if (this.state === "open" && (sub.phase === "pending" || sub.phase === "live")) {
      this._request({ type: "unsubscribe", channel }, () => {});
    }
    return true;
  }

  /** {channel: {offset, epoch}} for every subscribed channel with a known position. */
  positions() {
    const out = {};
    for (const [channel, sub] of this._subs) {
      if (sub.epoch != null) out[channel] = { offset: sub.offset, epoch: sub.epoch };
    }
    return out;
  }

  /** The subscribed channels. */
  channels() {
    return Array.from(this._subs.keys());
  }

  /** Round trip to the server: resolves with the time in ms. */
  ping() {
    return new Promise((resolve, reject) => {
      if (this.state !== "open") return reject(new Error("not connected"));
      const t0 = Date.now();
      this._request({ type: "ping" }, (reply) =>
        reply && reply.type === "pong" ? resolve(Date.now() - t0) : reject(new Error("ping failed")),
      );
    });
  }

  /**
   * Fetch the publications `from`..`to` (inclusive) of a channel, typically the range of a
   * gap notice. Resolves with the `pub` messages ({type, channel, offset, key?, deleted?,
   * data}) in offset order; rejects with an Error carrying `code` (history_unavailable: gone
   * for good; unavailable: retry later; bad_request; ...) or when not connected. `epoch`
   * defaults to the subscription's current one. The reply is not ordered with the live flow:
   * newer publications of the channel may have been delivered already.
   */
  history(channel, from, to, epoch) {
    return new Promise((resolve, reject) => {
      const sub = this._subs.get(channel);
      const ep = epoch ?? (sub ? sub.epoch : null);
      if (ep == null) return reject(new Error(`history: no epoch known for ${channel}`));
      if (this.state !== "open") return reject(new Error("not connected"));
      this._request({ type: "history", channel, epoch: ep, from, to }, (reply) => {
        if (!reply) return reject(new Error("connection lost"));
        if (reply.type === "history") return resolve(Array.isArray(reply.publications) ? reply.publications : []);
        const err = new Error(reply.message || reply.code || `history failed: ${reply.type}`);
        Object.assign(err, { code: reply.code, channel, from, to, epoch: ep });
        reject(err);
      });
    });
  }

  /** Listen to an event: state, connected, error, gap. Returns a function that stops listening. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const set = this._listeners.get(event);
    if (set) set.delete(fn);
  }

  // --- connection lifecycle ------------------------------------------------------------

  _open() {
    const url = this.urls[this._urlIndex % this.urls.length];
    this._urlIndex += 1; // the next attempt tries the next URL
    this.url = url;
    this._setState("connecting", { attempt: this._attempt, url });
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      this._log("cannot open", url, err);
      this._lost(CLOSE_CONNECT_FAILED, String((err && err.message) || err));
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._onSocketOpen(ws);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => ws === this._ws && this._lost(ev.code, ev.reason);
    ws.onerror = () => {
      this._log("socket error", url);
      // An error means the socket is done. Its close event (with the code) follows in browsers;
      // some implementations (Node 20's) never send one.
      setTimeout(() => ws === this._ws && this._drop(1006, "connection failed"), 100);
    };
    this._setTimer("connect", this.options.connectTimeout || CONNECT_TIMEOUT_MS, () =>
      this._drop(CLOSE_CONNECT_TIMEOUT, "connect timeout"),
    );
  }

  async _onSocketOpen(ws) {
    let token = this.options.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (err) {
        this._log("token function failed", err);
        if (ws === this._ws) this._drop(CLOSE_CONNECT_FAILED, "token unavailable");
        return;
      }
      if (ws !== this._ws) return;
    }
    this._request({ type: "connect", token: token ?? null, name: this.options.name ?? null }, (reply) =>
      this._onConnected(reply),
    );
  }

  _onConnected(reply) {
    if (!reply) return; // the socket went first
    if (reply.type !== "connected") {
      this._emit("error", reply);
      this._drop(CLOSE_CONNECT_FAILED, `connect failed: ${reply.code || reply.type}`);
      return;
    }
    this._clearTimer("connect");
    this._attempt = 0;
    this.session = {
      client: reply.client,
      version: reply.version,
      pingInterval: reply.ping_interval,
      pongTimeout: reply.pong_timeout,
    };
    this._armHeartbeat();
    this._scheduleRefresh(reply.expires_in);
    // Subscribe (again) before telling anyone, so that a listener's own subscribe() is not doubled.
    for (const sub of this._subs.values()) if (sub.phase === "idle") this._sendSubscribe(sub);
    this._setState("open", { url: this.url, client: reply.client });
    this._emit("connected", reply);
  }

  /**
   * With authentication on, `connected` and `refreshed` say how long the token still lasts
   * (`expires_in`, s). With a token function, a fresh token goes out a minute before the end
   * (half way for short tokens), so the server does not close with 3006; a failed refresh is
   * retried, and if none succeeds in time the 3006 close and reconnect are the fallback.
   */
  _scheduleRefresh(expiresIn, retry = false) {
    if (typeof this.options.token !== "function" || !(expiresIn > 0)) return;
    const seconds = retry ? Math.min(5, expiresIn / 2) : Math.max(expiresIn - 60, expiresIn / 2);
    const end = Date.now() + expiresIn * 1000;
    this._setTimer("refresh", Math.round(seconds * 1000), () => this._refresh(end));
  }

  async _refresh(end) {
    const ws = this._ws;
    const left = () => Math.max((end - Date.now()) / 1000, 0.1);
    let token;
    try {
      token = await this.options.token();
    } catch (err) {
      this._log("token function failed", err);
      if (ws === this._ws) this._scheduleRefresh(left(), true);
      return;
    }
    if (ws !== this._ws) return;
    this._request({ type: "refresh", token }, (reply) => {
      if (!reply) return; // the connection went; the next one starts over
      if (reply.type === "refreshed") {
        this._scheduleRefresh(reply.expires_in);
      } else {
        this._emit("error", reply);
        this._scheduleRefresh(left(), true);
      }
    });
  }

  _armHeartbeat() {
    const s = this.session;
    if (!s || !(s.pingInterval > 0)) return;
    const ms = (s.pingInterval + (s.pongTimeout || 0)) * 1000 + HEARTBEAT_GRACE_MS;
    this._setTimer("heartbeat", ms, () => this._drop(CLOSE_NO_PING, "no ping from server"));
  }

  /** End the current socket ourselves, without waiting for its close event, and handle the loss. */
  _drop(code, reason) {
    this._discardSocket(code, reason);
    this._lost(code, reason);
  }

  _discardSocket(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code === 1000 || (code >= 3000 && code <= 4999) ? code : 1000, reason);
    } catch (err) {
      this._log("close failed", err);
    }
    this._resetConnection();
  }

  _resetConnection() {
    this._ws = null;
    this.session = null;
    this._clearTimer("connect");
    this._clearTimer("heartbeat");
    this._clearTimer("refresh");
    const pending = Array.from(this._pending.values());
    this._pending.clear();
    for (const sub of this._subs.values()) sub.phase = "idle";
    for (const handler of pending) this._safely(handler, null);
  }

  /** The connection is gone (closed by the server, the network, or us): reconnect or stop. */
  _lost(code, reason) {
    this._resetConnection();
    this._log("connection lost", code, reason);
    if (!this._wanted) {
      this._setState("closed", { code, reason });
    } else if (!shouldReconnect(code)) {
      this._wanted = false;
      this._setState("closed", { code, reason, final: true });
    } else {
      this._attempt += 1;
      const delay = jitter(this._attempt, this.backoff.min, this.backoff.max);
      // The server may advise a delay in its close reason ("... retry_after_ms=1500"): wait at
      // least that long, plus up to half of it again so that its clients do not come back
      // all at once.
      const advised = advisedDelay(reason);
      this._reconnect(advised ? Math.max(delay, advised + Math.round(Math.random() * advised / 2)) : delay,
        { code, reason, advised });
    }
  }

  _reconnect(delay, why) {
    this.counters.reconnects += 1;
    this._setState("reconnecting", { attempt: this._attempt, delay, ...why });
    this._setTimer("reconnect", delay, () => this._open());
  }

  // --- frames ------------------------------------------------------------------------

  _onFrame(ws, data) {
    if (typeof data !== "string") return this._log("ignoring a binary frame");
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch (err) {
      return this._log("ignoring a malformed frame", err);
    }
    // A coalesced frame is an array of messages: handle them in order, exactly as if each had
    // come alone. Each is handled completely (a `subscribed` reply sets the position) before
    // the next (e.g. the publications replayed after it) is looked at.
    const messages = Array.isArray(parsed) ? parsed : [parsed];
    for (const msg of messages) {
      if (ws !== this._ws) return; // a handler dropped the connection
      if (msg && typeof msg === "object" && !Array.isArray(msg)) this._dispatch(msg);
    }
  }

  _dispatch(msg) {
    if (this.options.debug && msg.type !== "pub") this._log("<-", msg);
    switch (msg.type) {
      case "pub":
        return this._onPub(msg);
      case "ping":
        this._send({ type: "pong" });
        return this._armHeartbeat();
      case "resync":
        return this._onResync(msg);
      case "gap":
        return this._onGap(msg);
    }
    const handler = msg.id != null ? this._pending.get(msg.id) : undefined;
    if (handler) {
      this._pending.delete(msg.id);
      this._safely(handler, msg);
    } else if (msg.type === "error") {
      this._emit("error", msg);
    } else {
      this._log("unexpected message", msg);
    }
  }

  _request(msg, handler) {
    const id = ++this._nextId;
    this._pending.set(id, handler);
    this._send({ type: msg.type, id, ...msg });
    return id;
  }

  _send(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    if (this.options.debug) this._log("->", msg);
    ws.send(JSON.stringify(msg));
    return true;
  }

  // --- subscriptions -----------------------------------------------------------------

  _sendSubscribe(sub) {
    clearTimeout(sub.retryTimer);
    const msg = { type: "subscribe", channel: sub.channel, snapshot: sub.snapshot };
    const recover = sub.epoch != null ? { offset: sub.offset, epoch: sub.epoch } : null;
    if (recover) msg.recover = recover;
    if (sub.maxRate != null) msg.max_rate = sub.maxRate;
    sub.phase = "pending";
    this._request(msg, (reply) => this._onSubscribeReply(sub, recover, reply));
  }

  _onSubscribeReply(sub, recover, reply) {
    if (!reply || this._subs.get(sub.channel) !== sub) return; // connection gone, or unsubscribed
    if (reply.type !== "subscribed") return this._onSubscribeError(sub, reply);
    sub.epoch = reply.epoch;
    sub.phase = "live";
    // A server without slow-consumer policies sends no `delivery`: every offset comes.
    sub.delivery = DELIVERIES.has(reply.delivery) ? reply.delivery : "all";
    if (recover && reply.recovered) {
      // Every publication after the position we sent follows.
      sub.offset = recover.offset;
      this.counters.recovered += 1;
    } else {
      sub.offset = reply.offset;
      if (recover) {
        this.counters.resynced += 1;
        this._deliverSnapshot(sub, reply.snapshot || {}, "recover_failed");
      } else if (reply.snapshot) {
        this._deliverSnapshot(sub, reply.snapshot, "initial");
      }
    }
    this._positionsChanged();
    if (sub.onSubscribed) {
      const info = {
        channel: sub.channel,
        epoch: sub.epoch,
        offset: sub.offset,
        recovered: !!reply.recovered,
        delivery: sub.delivery,
      };
      this._safely(sub.onSubscribed, info);
    }
  }

  _onSubscribeError(sub, reply) {
    const err = { ...reply, channel: sub.channel };
    this._emit("error", err);
    if (RETRYABLE_ERRORS.has(reply.code)) {
      sub.phase = "idle";
      const delay = subscribeRetryDelay(reply);
      sub.retryTimer = setTimeout(() => {
        if (this._subs.get(sub.channel) === sub && sub.phase === "idle" && this.state === "open") {
          this._sendSubscribe(sub);
        }
      }, delay);
    } else {
      // Retrying would fail the same way: drop it, so the application may subscribe again.
      this._subs.delete(sub.channel);
      if (sub.onError) this._safely(sub.onError, err);
    }
  }

  _onPub(msg) {
    const sub = this._subs.get(msg.channel);
    // Only a live subscription has a position that publications continue from.
    if (!sub || sub.phase !== "live" || typeof msg.offset !== "number") return;
    if (msg.offset <= sub.offset) {
      this.counters.duplicates += 1;
      return;
    }
    if (msg.offset > sub.offset + 1 && !this._skipsAllowed(sub)) {
      // Offsets skipped without a gap notice: a real gap ("all", or "drop" without maxRate).
      this.counters.gaps += 1;
      this._log("gap on", sub.channel, "after", sub.offset, "got", msg.offset);
      this._refill(sub);
      return;
    }
    sub.offset = msg.offset;
    this.counters.messages += 1;
    this._positionsChanged();
    if (sub.onMessage) {
      const meta = {
        channel: sub.channel,
        offset: msg.offset,
        epoch: sub.epoch,
        key: msg.key ?? "",
        deleted: msg.deleted === true, // the publication removed its key from the snapshot
      };
      this._safely(sub.onMessage, msg.data, meta);
    }
  }

  /** Save positions soon (at most every 250 ms), if persistence is on. */
  _positionsChanged() {
    if (!this._storage || this._timers.persist) return;
    this._timers.persist = setTimeout(() => {
      this._timers.persist = null;
      this._savePositions();
    }, 250);
  }

  _savePositions() {
    if (!this._storage) return;
    try {
      this._storage.setItem(this._storageKey, JSON.stringify(this.positions()));
    } catch (err) {
      this._log("cannot persist positions:", err);
    }
  }

  /** Whether a publication may skip offsets: conflated (or rate-limited) values supersede. */
  _skipsAllowed(sub) {
    return sub.delivery === "conflate" || sub.maxRate != null;
  }

  /** The server dropped `from`..`to` for us (a "drop" channel and a slow client). */
  _onGap(msg) {
    const sub = this._subs.get(msg.channel);
    // Before the subscribe reply, or while refilling, the recovery covers it anyway.
    if (!sub || sub.phase !== "live" || typeof msg.from !== "number" || typeof msg.to !== "number") return;
    if (msg.to <= sub.offset) return; // already past it
    if (msg.from > sub.offset + 1 && !this._skipsAllowed(sub)) {
      // Offsets before the announced range are missing too, unannounced: recover them all.
      this.counters.gaps += 1;
      this._log("gap on", sub.channel, "after", sub.offset, "notice from", msg.from);
      this._refill(sub);
      return;
    }
    this.counters.gaps += 1;
    sub.offset = msg.to;
    this._positionsChanged();
    const info = { channel: sub.channel, from: msg.from, to: msg.to, epoch: sub.epoch };
    this._log("gap notice on", sub.channel, info);
    if (sub.onGap) this._safely(sub.onGap, info);
    this._emit("gap", info);
  }

  /** Fill a gap: unsubscribe, then subscribe again recovering from the last offset delivered. */
  _refill(sub) {
    sub.phase = "refilling"; // publications are dropped until the new subscribe reply
    this._request({ type: "unsubscribe", channel: sub.channel }, (reply) => {
      if (reply && this._subs.get(sub.channel) === sub && sub.phase === "refilling") this._sendSubscribe(sub);
    });
  }

  _onResync(msg) {
    const sub = this._subs.get(msg.channel);
    if (!sub || (sub.phase !== "live" && sub.phase !== "refilling")) return;
    sub.epoch = msg.epoch;
    sub.offset = msg.offset;
    this.counters.resynced += 1;
    this._positionsChanged();
    this._deliverSnapshot(sub, msg.snapshot || {}, "resync");
  }

  _deliverSnapshot(sub, snapshot, reason) {
    if (!sub.onResync) return;
    const info = { channel: sub.channel, epoch: sub.epoch, offset: sub.offset, reason };
    this._safely(sub.onResync, snapshot, info);
  }

  // --- helpers -----------------------------------------------------------------------

  _setState(state, info) {
    this.state = state;
    this._log("state", state, info);
    this._emit("state", state, info || {});
  }

  _emit(event, ...args) {
    const set = this._listeners.get(event);
    if (set) for (const fn of Array.from(set)) this._safely(fn, ...args);
  }

  /** Call application code; its exceptions are reported, never allowed to break the client. */
  _safely(fn, ...args) {
    try {
      fn(...args);
    } catch (err) {
      console.error("[fanout] callback failed:", err);
    }
  }

  _setTimer(name, ms, fn) {
    this._clearTimer(name);
    this._timers[name] = setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, ms);
  }

  _clearTimer(name) {
    if (this._timers[name] != null) clearTimeout(this._timers[name]);
    this._timers[name] = null;
  }

  _log(...args) {
    if (this.options.debug) console.debug("[fanout]", ...args);
  }
}

export default FanoutClient;
