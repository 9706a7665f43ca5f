// Test helpers for fanout.js: a fake WebSocket and a scripted server side.
// Not a test file itself (it has no tests), but it lives in test/ so `node --test` loads it too.

import { FanoutClient } from "../src/fanout.js";

/** A fresh fake WebSocket class; every instance it creates is pushed onto `sockets`. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0; // CONNECTING
      this.sent = []; // parsed client messages
      this.closedWith = null; // {code, reason} when the client called close()
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }

    // --- the server's side ---
    open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({});
    }
    /** Deliver one frame: an object (one message), an array (coalesced frame) or a raw string. */
    frame(msg) {
      if (this.onmessage) this.onmessage({ data: typeof msg === "string" ? msg : JSON.stringify(msg) });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      if (this.onclose) this.onclose({ code, reason });
    }
    /** Messages the client sent, optionally only those of a type (and channel). */
    sentOf(type, channel) {
      return this.sent.filter((m) => m.type === type && (channel === undefined || m.channel === channel));
    }
    lastOf(type, channel) {
      const all = this.sentOf(type, channel);
      return all[all.length - 1];
    }
  }
  return { FakeWebSocket, sockets };
}

export const SESSION = { client: "edge1-000000000001", version: 1, ping_interval: 25, pong_timeout: 10 };

/** A client on fake sockets, recording its state events. */
export function makeClient(urls = "ws://edge/ws", options = {}) {
  const { FakeWebSocket, sockets } = fakeWebSocket();
  const client = new FanoutClient(urls, { WebSocket: FakeWebSocket, ...options });
  const states = [];
  client.on("state", (state, info) => states.push({ state, ...info }));
  const last = () => sockets[sockets.length - 1];
  return { client, sockets, states, last };
}

/** Open `ws` and answer the client's connect request. */
export function handshake(ws, session = SESSION) {
  ws.open();
  const req = ws.lastOf("connect");
  if (!req) throw new Error("client sent no connect");
  ws.frame({ type: "connected", id: req.id, ...session });
}

/** The `subscribed` reply (an object, not sent) to the client's last subscribe of `channel`. */
export function subscribedReply(ws, channel, fields) {
  const req = ws.lastOf("subscribe", channel);
  if (!req) throw new Error(`client sent no subscribe for ${channel}`);
  return { type: "subscribed", id: req.id, channel, recovered: false, ...fields };
}

/** Send the `subscribed` reply to the client's last subscribe of `channel`. */
export function replySubscribed(ws, channel, fields) {
  ws.frame(subscribedReply(ws, channel, fields));
}

export function pub(channel, offset, data = { v: offset }, extra = {}) {
  return { type: "pub", channel, offset, data, ...extra };
}

/** A subscription that records what it gets. */
export function recorder() {
  const rec = { messages: [], resyncs: [], subscribed: [], gaps: [], errors: [] };
  rec.options = {
    onMessage: (data, meta) => rec.messages.push({ data, ...meta }),
    onResync: (snapshot, info) => rec.resyncs.push({ snapshot, ...info }),
    onSubscribed: (info) => rec.subscribed.push(info),
    onGap: (info) => rec.gaps.push(info),
    onError: (err) => rec.errors.push(err),
  };
  rec.offsets = () => rec.messages.map((m) => m.offset);
  return rec;
}
