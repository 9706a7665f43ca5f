// fanout.js subscriptions: offsets, recovery, resync, delivery policies, gaps, coalesced frames.
// Run: node --test edge/static/test/

import { test, describe } from "node:test";
import assert from "node:assert/strict";

import { makeClient, handshake, replySubscribed, subscribedReply, pub, recorder } from "./harness.mjs";

const CH = "trades.MNQ";

/** A connected client with one live subscription at `offset` in epoch "e1". */
function live(t, { delivery = "all", offset = 10, subOptions = {}, channel = CH } = {}) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  t.mock.method(Math, "random", () => 0);
  const h = makeClient("ws://a/ws");
  const rec = recorder();
  const handle = h.client.subscribe(channel, { ...rec.options, ...subOptions });
  h.client.connect();
  handshake(h.last());
  replySubscribed(h.last(), channel, { epoch: "e1", offset, delivery });
  return { ...h, rec, handle, ws: h.last() };
}

/** Lose the connection (1006) and connect again; returns the new socket (subscribe sent, no reply). */
function reconnect(t, h) {
  h.last().serverClose(1006);
  t.mock.timers.tick(0);
  const ws = h.last();
  handshake(ws);
  return ws;
}

describe("subscribe and offsets", () => {
  test("the subscribe is sent after `connected`, before the open state is announced", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    let sentAtOpen = null;
    h.client.on("state", (s) => {
      if (s === "open") sentAtOpen = h.last().sentOf("subscribe").length;
    });
    h.client.subscribe(CH, { snapshot: true });
    h.client.connect();
    const ws = h.last();
    ws.open();
    assert.equal(ws.sentOf("subscribe").length, 0, "not before connected");
    assert.equal(ws.sent[0].type, "connect");
    handshake(ws);
    assert.equal(sentAtOpen, 1);
    const req = ws.lastOf("subscribe", CH);
    assert.equal(req.snapshot, true);
    assert.equal(req.recover, undefined);
    assert.equal(typeof req.id, "number");
  });

  test("a fresh subscribe with snapshot delivers it as `initial` and takes the reply's position", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const rec = recorder();
    const handle = h.client.subscribe(CH, { ...rec.options, snapshot: true });
    h.client.connect();
    handshake(h.last());
    replySubscribed(h.last(), CH, { epoch: "e1", offset: 41, delivery: "drop", snapshot: { "": { p: 1 } } });
    assert.deepEqual(rec.resyncs, [{ snapshot: { "": { p: 1 } }, channel: CH, epoch: "e1", offset: 41, reason: "initial" }]);
    assert.deepEqual(rec.subscribed, [{ channel: CH, epoch: "e1", offset: 41, recovered: false, delivery: "drop" }]);
    assert.deepEqual(handle.position(), { offset: 41, epoch: "e1" });
    assert.equal(handle.delivery(), "drop");
    assert.deepEqual(h.client.positions(), { [CH]: { offset: 41, epoch: "e1" } });
  });

  test("consecutive pubs are delivered with meta and move the position", (t) => {
    const h = live(t);
    h.ws.frame(pub(CH, 11, { a: 1 }));
    h.ws.frame(pub(CH, 12, { a: 2 }, { key: "k" }));
    h.ws.frame(pub(CH, 13, { a: 0 }, { key: "k", deleted: true }));
    assert.deepEqual(h.rec.messages, [
      { data: { a: 1 }, channel: CH, offset: 11, epoch: "e1", key: "", deleted: false },
      { data: { a: 2 }, channel: CH, offset: 12, epoch: "e1", key: "k", deleted: false },
      { data: { a: 0 }, channel: CH, offset: 13, epoch: "e1", key: "k", deleted: true },
    ]);
    assert.deepEqual(h.handle.position(), { offset: 13, epoch: "e1" });
    assert.equal(h.client.counters.messages, 3);
  });

  test("duplicates (offset <= position) are dropped and counted", (t) => {
    const h = live(t);
    h.ws.frame(pub(CH, 11));
    h.ws.frame(pub(CH, 11));
    h.ws.frame(pub(CH, 10));
    h.ws.frame(pub(CH, 3));
    h.ws.frame(pub(CH, 12));
    assert.deepEqual(h.rec.offsets(), [11, 12]);
    assert.equal(h.client.counters.duplicates, 3);
    assert.equal(h.client.counters.messages, 2);
  });

  test("positions are tracked per channel", (t) => {
    const h = live(t);
    const other = recorder();
    h.client.subscribe("quotes.MNQ", other.options);
    replySubscribed(h.ws, "quotes.MNQ", { epoch: "q1", offset: 100, delivery: "conflate" });
    h.ws.frame([pub(CH, 11), pub("quotes.MNQ", 101), pub(CH, 12), pub("quotes.MNQ", 101), pub("quotes.MNQ", 102)]);
    assert.deepEqual(h.rec.offsets(), [11, 12]);
    assert.deepEqual(other.offsets(), [101, 102]);
    assert.deepEqual(h.client.positions(), {
      [CH]: { offset: 12, epoch: "e1" },
      "quotes.MNQ": { offset: 102, epoch: "q1" },
    });
    assert.equal(h.client.counters.duplicates, 1);
  });

  test("pubs before the subscribe reply, of unknown channels, or without a numeric offset are ignored", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const rec = recorder();
    h.client.subscribe(CH, rec.options);
    h.client.connect();
    handshake(h.last());
    const ws = h.last();
    ws.frame(pub(CH, 5)); // still pending
    replySubscribed(ws, CH, { epoch: "e1", offset: 5, delivery: "all" });
    ws.frame(pub("trades.OTHER", 6));
    ws.frame({ type: "pub", channel: CH, offset: "6", data: 1 });
    ws.frame(pub(CH, 6));
    assert.deepEqual(rec.offsets(), [6]);
  });

  test("malformed and binary frames are ignored", (t) => {
    const h = live(t);
    h.ws.frame("{not json");
    h.ws.onmessage({ data: new Uint8Array([1, 2]) });
    h.ws.frame("42");
    h.ws.frame(pub(CH, 11));
    assert.deepEqual(h.rec.offsets(), [11]);
    assert.equal(h.client.state, "open");
  });

  test("pubs after unsubscribe() are ignored; the unsubscribe is sent", (t) => {
    const h = live(t);
    assert.equal(h.handle.unsubscribe(), true);
    assert.ok(h.ws.lastOf("unsubscribe", CH));
    h.ws.frame(pub(CH, 11));
    assert.deepEqual(h.rec.offsets(), []);
    assert.equal(h.handle.unsubscribe(), false);
    assert.deepEqual(h.client.channels(), []);
  });
});

describe("recovery after a reconnect", () => {
  test("resubscribes with recover {offset, epoch} of the last delivered pub", (t) => {
    const h = live(t, { subOptions: { snapshot: true } });
    h.ws.frame([pub(CH, 11), pub(CH, 12)]);
    const ws = reconnect(t, h);
    const req = ws.lastOf("subscribe", CH);
    assert.deepEqual(req.recover, { offset: 12, epoch: "e1" });
    assert.equal(req.channel, CH);
  });

  test("recovered: position kept (not the reply's offset), replayed pubs delivered, no snapshot", (t) => {
    const h = live(t);
    h.ws.frame([pub(CH, 11), pub(CH, 12)]);
    const ws = reconnect(t, h);
    replySubscribed(ws, CH, { epoch: "e1", offset: 15, recovered: true, delivery: "all" });
    assert.deepEqual(h.handle.position(), { offset: 12, epoch: "e1" });
    ws.frame([pub(CH, 13), pub(CH, 14), pub(CH, 15)]);
    assert.deepEqual(h.rec.offsets(), [11, 12, 13, 14, 15]);
    assert.equal(h.rec.resyncs.length, 0);
    assert.equal(h.client.counters.recovered, 1);
    assert.equal(h.client.counters.resynced, 0);
    assert.deepEqual(h.rec.subscribed.at(-1), { channel: CH, epoch: "e1", offset: 12, recovered: true, delivery: "all" });
  });

  test("not recovered: the snapshot comes as a `recover_failed` resync and the position is the reply's", (t) => {
    const h = live(t);
    h.ws.frame(pub(CH, 11));
    const ws = reconnect(t, h);
    replySubscribed(ws, CH, { epoch: "e2", offset: 3, recovered: false, delivery: "all", snapshot: { "": { s: 1 } } });
    assert.deepEqual(h.rec.resyncs, [{ snapshot: { "": { s: 1 } }, channel: CH, epoch: "e2", offset: 3, reason: "recover_failed" }]);
    assert.deepEqual(h.handle.position(), { offset: 3, epoch: "e2" });
    assert.equal(h.client.counters.resynced, 1);
    assert.equal(h.client.counters.recovered, 0);
    ws.frame([pub(CH, 3), pub(CH, 4)]);
    assert.deepEqual(h.rec.offsets(), [11, 4], "offset 3 is in the snapshot: a duplicate");
    assert.equal(h.rec.subscribed.at(-1).recovered, false);
  });

  test("not recovered without a snapshot field still resyncs (with {})", (t) => {
    const h = live(t);
    const ws = reconnect(t, h);
    replySubscribed(ws, CH, { epoch: "e2", offset: 0, recovered: false, delivery: "all" });
    assert.equal(h.rec.resyncs.length, 1);
    assert.deepEqual(h.rec.resyncs[0].snapshot, {});
  });

  test("a subscription given `recover` sends it on the first subscribe", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const handle = h.client.subscribe(CH, { recover: { offset: 7, epoch: "e9" } });
    assert.deepEqual(handle.position(), { offset: 7, epoch: "e9" });
    h.client.connect();
    handshake(h.last());
    assert.deepEqual(h.last().lastOf("subscribe", CH).recover, { offset: 7, epoch: "e9" });
  });

  test("a reconnect while the subscribe is in flight resubscribes from the old position", (t) => {
    const h = live(t);
    h.ws.frame(pub(CH, 11));
    let ws = reconnect(t, h); // subscribe with recover 11 in flight
    ws = reconnect(t, h);
    assert.deepEqual(ws.lastOf("subscribe", CH).recover, { offset: 11, epoch: "e1" });
    assert.equal(ws.sentOf("subscribe", CH).length, 1);
  });

  test("server resync: state replaced, position moved to its epoch/offset", (t) => {
    const h = live(t);
    h.ws.frame(pub(CH, 11));
    h.ws.frame({ type: "resync", channel: CH, epoch: "e2", offset: 3, snapshot: { "": 9 } });
    assert.deepEqual(h.rec.resyncs, [{ snapshot: { "": 9 }, channel: CH, epoch: "e2", offset: 3, reason: "resync" }]);
    assert.deepEqual(h.handle.position(), { offset: 3, epoch: "e2" });
    h.ws.frame(pub(CH, 4));
    assert.deepEqual(h.rec.messages.at(-1), { data: { v: 4 }, channel: CH, offset: 4, epoch: "e2", key: "", deleted: false });
    assert.equal(h.client.counters.resynced, 1);
  });

  test("a resync right after the subscribed reply in the same frame applies", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const rec = recorder();
    h.client.subscribe(CH, rec.options);
    h.client.connect();
    handshake(h.last());
    const ws = h.last();
    ws.frame([
      subscribedReply(ws, CH, { epoch: "e1", offset: 10, delivery: "all" }),
      { type: "resync", channel: CH, epoch: "e2", offset: 1, snapshot: {} },
      pub(CH, 2),
    ]);
    assert.equal(rec.resyncs.length, 1);
    assert.deepEqual(rec.offsets(), [2]);
    assert.equal(rec.messages[0].epoch, "e2");
  });
});

describe("delivery policies and gaps", () => {
  test("conflate: skipped offsets are not gaps", (t) => {
    const h = live(t, { delivery: "conflate", channel: "quotes.MNQ" });
    h.ws.frame([pub("quotes.MNQ", 15), pub("quotes.MNQ", 40)]);
    assert.deepEqual(h.rec.offsets(), [15, 40]);
    assert.equal(h.client.counters.gaps, 0);
    assert.equal(h.ws.sentOf("unsubscribe").length, 0);
    assert.deepEqual(h.handle.position(), { offset: 40, epoch: "e1" });
  });

  test("maxRate: skipped offsets are accepted even on an `all` channel", (t) => {
    const h = live(t, { delivery: "all", subOptions: { maxRate: 4 } });
    assert.equal(h.ws.lastOf("subscribe", CH).max_rate, 4);
    h.ws.frame(pub(CH, 20));
    assert.deepEqual(h.rec.offsets(), [20]);
    assert.equal(h.client.counters.gaps, 0);
  });

  test("maxRate must be in (0, 1000]", (t) => {
    const h = makeClient("ws://a/ws");
    assert.throws(() => h.client.subscribe("a", { maxRate: 0 }), RangeError);
    assert.throws(() => h.client.subscribe("b", { maxRate: 1001 }), RangeError);
    assert.throws(() => h.client.subscribe("c", { maxRate: "4" }), RangeError);
    h.client.subscribe("d", { maxRate: 1000 });
  });

  test("a reply without `delivery` means `all`", (t) => {
    const h = live(t, { delivery: undefined });
    assert.equal(h.handle.delivery(), "all");
  });

  test("drop: a gap notice moves the position to `to`, counts, calls onGap and emits `gap`", (t) => {
    const h = live(t, { delivery: "drop" });
    const events = [];
    h.client.on("gap", (info) => events.push(info));
    h.ws.frame([pub(CH, 11), { type: "gap", channel: CH, from: 12, to: 20 }, pub(CH, 21)]);
    const info = { channel: CH, from: 12, to: 20, epoch: "e1" };
    assert.deepEqual(h.rec.gaps, [info]);
    assert.deepEqual(events, [info]);
    assert.equal(h.client.counters.gaps, 1);
    assert.deepEqual(h.rec.offsets(), [11, 21]);
    assert.equal(h.ws.sentOf("unsubscribe").length, 0, "no refill");
    assert.deepEqual(h.handle.position(), { offset: 21, epoch: "e1" });
  });

  test("drop: a gap notice at or below the position needs nothing", (t) => {
    const h = live(t, { delivery: "drop" });
    h.ws.frame({ type: "gap", channel: CH, from: 5, to: 10 });
    assert.equal(h.client.counters.gaps, 0);
    assert.equal(h.rec.gaps.length, 0);
    assert.deepEqual(h.handle.position(), { offset: 10, epoch: "e1" });
  });

  test("drop: an overlapping gap notice moves the position to `to`", (t) => {
    const h = live(t, { delivery: "drop" });
    h.ws.frame({ type: "gap", channel: CH, from: 8, to: 12 });
    assert.deepEqual(h.handle.position(), { offset: 12, epoch: "e1" });
    assert.equal(h.client.counters.gaps, 1);
  });

  test("drop: a gap notice starting past position+1 is a real gap: refill", (t) => {
    const h = live(t, { delivery: "drop" });
    h.ws.frame({ type: "gap", channel: CH, from: 13, to: 20 });
    assert.equal(h.rec.gaps.length, 0);
    assert.equal(h.client.counters.gaps, 1);
    assert.ok(h.ws.lastOf("unsubscribe", CH));
    assert.deepEqual(h.handle.position(), { offset: 10, epoch: "e1" });
  });

  test("drop: a skip without a notice is a real gap", (t) => {
    const h = live(t, { delivery: "drop" });
    h.ws.frame(pub(CH, 12));
    assert.deepEqual(h.rec.offsets(), []);
    assert.ok(h.ws.lastOf("unsubscribe", CH));
  });

  test("all: a skipped offset triggers unsubscribe, then subscribe with recover from the position", (t) => {
    const h = live(t, { delivery: "all" });
    h.ws.frame([pub(CH, 11), pub(CH, 13), pub(CH, 14)]);
    assert.deepEqual(h.rec.offsets(), [11], "nothing after the gap is delivered");
    assert.equal(h.client.counters.gaps, 1);
    const unsub = h.ws.lastOf("unsubscribe", CH);
    assert.ok(unsub);
    assert.equal(h.ws.sentOf("subscribe", CH).length, 1, "no subscribe before the unsubscribed reply");
    h.ws.frame(pub(CH, 15)); // still in flight: ignored
    h.ws.frame({ type: "unsubscribed", id: unsub.id, channel: CH });
    const req = h.ws.lastOf("subscribe", CH);
    assert.equal(h.ws.sentOf("subscribe", CH).length, 2);
    assert.deepEqual(req.recover, { offset: 11, epoch: "e1" });
    h.ws.frame([
      subscribedReply(h.ws, CH, { epoch: "e1", offset: 15, recovered: true, delivery: "all" }),
      pub(CH, 12),
      pub(CH, 13),
      pub(CH, 14),
      pub(CH, 15),
    ]);
    assert.deepEqual(h.rec.offsets(), [11, 12, 13, 14, 15]);
    assert.equal(h.client.counters.recovered, 1);
  });

  test("unsubscribe() during a refill does not resubscribe", (t) => {
    const h = live(t, { delivery: "all" });
    h.ws.frame(pub(CH, 12));
    const unsub = h.ws.lastOf("unsubscribe", CH);
    h.handle.unsubscribe();
    assert.equal(h.ws.sentOf("unsubscribe", CH).length, 1, "the refill's unsubscribe is already on the wire");
    h.ws.frame({ type: "unsubscribed", id: unsub.id, channel: CH });
    assert.equal(h.ws.sentOf("subscribe", CH).length, 1);
  });

  test("a connection lost during a refill recovers on the next connection", (t) => {
    const h = live(t, { delivery: "all" });
    h.ws.frame([pub(CH, 11), pub(CH, 13)]);
    const ws = reconnect(t, h);
    assert.deepEqual(ws.lastOf("subscribe", CH).recover, { offset: 11, epoch: "e1" });
  });
});

describe("coalesced frames", () => {
  test("reply then replayed pubs in one array: handled in order", (t) => {
    const h = live(t);
    const ws = reconnect(t, h);
    ws.frame([
      subscribedReply(ws, CH, { epoch: "e1", offset: 13, recovered: true, delivery: "all" }),
      pub(CH, 11),
      pub(CH, 12),
      pub(CH, 13),
    ]);
    assert.deepEqual(h.rec.offsets(), [11, 12, 13]);
    assert.equal(h.client.counters.gaps, 0);
  });

  test("a long replay: the reply and its first pubs in one array, the rest in more arrays", (t) => {
    const h = live(t);
    const ws = reconnect(t, h);
    const pubs = Array.from({ length: 1200 }, (_, i) => pub(CH, 11 + i));
    ws.frame([subscribedReply(ws, CH, { epoch: "e1", offset: 1210, recovered: true, delivery: "all" }), ...pubs.slice(0, 499)]);
    ws.frame(pubs.slice(499, 999));
    ws.frame(pubs.slice(999));
    ws.frame(pub(CH, 1211)); // live, after the replay
    assert.deepEqual(h.rec.offsets(), Array.from({ length: 1201 }, (_, i) => 11 + i));
    assert.equal(h.client.counters.gaps, 0);
    assert.deepEqual(h.handle.position(), { offset: 1211, epoch: "e1" });
  });

  test("a fresh subscribe reply and the live pubs after it in one array", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const rec = recorder();
    const order = [];
    h.client.subscribe(CH, {
      ...rec.options,
      snapshot: true,
      onResync: (s, info) => order.push(`snapshot@${info.offset}`),
      onMessage: (d, meta) => order.push(`pub@${meta.offset}`),
    });
    h.client.connect();
    handshake(h.last());
    const ws = h.last();
    ws.frame([subscribedReply(ws, CH, { epoch: "e1", offset: 5, delivery: "all", snapshot: { "": 1 } }), pub(CH, 6), pub(CH, 7)]);
    assert.deepEqual(order, ["snapshot@5", "pub@6", "pub@7"]);
  });

  test("mixed messages in one frame: reply, pubs of two channels, ping, gap", (t) => {
    const h = live(t, { delivery: "drop" });
    const other = recorder();
    h.client.subscribe("quotes.X", other.options);
    const ws = h.ws;
    ws.frame([
      pub(CH, 11),
      subscribedReply(ws, "quotes.X", { epoch: "q", offset: 0, delivery: "conflate" }),
      pub("quotes.X", 1),
      { type: "ping" },
      { type: "gap", channel: CH, from: 12, to: 12 },
      pub(CH, 13),
      pub("quotes.X", 5),
    ]);
    assert.deepEqual(h.rec.offsets(), [11, 13]);
    assert.deepEqual(other.offsets(), [1, 5]);
    assert.equal(ws.sentOf("pong").length, 1);
  });

  test("a handler that drops the connection stops the rest of the frame", (t) => {
    const h = live(t, {
      subOptions: {
        onMessage: (d, meta) => {
          seen.push(meta.offset);
          if (meta.offset === 11) h.client.reconnectNow();
        },
      },
    });
    const seen = [];
    h.ws.frame([pub(CH, 11), pub(CH, 12)]);
    assert.deepEqual(seen, [11]);
  });
});

describe("subscribe errors", () => {
  test("unavailable is retried after 1-5 s on the same connection", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 0.5);
    const h = makeClient("ws://a/ws");
    const errors = [];
    h.client.on("error", (e) => errors.push(e));
    h.client.subscribe(CH);
    h.client.connect();
    handshake(h.last());
    const ws = h.last();
    ws.frame({ type: "error", id: ws.lastOf("subscribe", CH).id, code: "unavailable", message: "redis" });
    assert.equal(errors.length, 1);
    assert.equal(errors[0].channel, CH);
    t.mock.timers.tick(2999);
    assert.equal(ws.sentOf("subscribe", CH).length, 1);
    t.mock.timers.tick(1);
    assert.equal(ws.sentOf("subscribe", CH).length, 2);
  });

  test("bad_channel is final: the subscription is dropped and onError called", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const rec = recorder();
    h.client.subscribe("nope", rec.options);
    h.client.connect();
    handshake(h.last());
    const ws = h.last();
    ws.frame({ type: "error", id: ws.lastOf("subscribe", "nope").id, code: "bad_channel", message: "x" });
    assert.equal(rec.errors.length, 1);
    assert.equal(rec.errors[0].code, "bad_channel");
    assert.deepEqual(h.client.channels(), []);
    t.mock.timers.tick(60000);
    assert.equal(ws.sentOf("subscribe").length, 1);
  });
});
