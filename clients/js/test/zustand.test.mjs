// zustand.js bindChannel on a tiny vanilla store, driven through the fake socket.
// Run: node --test edge/static/test/

import { test, describe } from "node:test";
import assert from "node:assert/strict";

import { bindChannel } from "../src/zustand.js";
import { makeClient, handshake, replySubscribed, pub } from "./harness.mjs";

/** A minimal Zustand-like store: getState, setState(partial | fn) merged shallowly. */
function createStore(initial = {}) {
  let state = initial;
  const store = {
    updates: 0,
    getState: () => state,
    setState(partial) {
      const next = typeof partial === "function" ? partial(state) : partial;
      if (Object.is(next, state)) return;
      state = { ...state, ...next };
      store.updates += 1;
    },
  };
  return store;
}

/** A connected client on a fake socket. */
function connected(t) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  t.mock.method(Math, "random", () => 0);
  const h = makeClient("ws://a/ws");
  h.client.connect();
  handshake(h.last());
  return { ...h, ws: h.last() };
}

/** Bind `channel` and answer its subscribe with `snapshot` (epoch e1, offset 10). */
function bound(t, channel, snapshot, options) {
  const h = connected(t);
  const store = createStore({ other: 1 });
  const unbind = bindChannel(store, h.client, channel, options);
  replySubscribed(h.ws, channel, { epoch: "e1", offset: 10, delivery: "all", snapshot });
  return { ...h, store, unbind, state: () => store.getState() };
}

describe("subscribe", () => {
  test("subscribes with snapshot by default, maxRate passed through", (t) => {
    const h = connected(t);
    const store = createStore();
    bindChannel(store, h.client, "quotes.MNQ", { maxRate: 4 });
    const req = h.ws.lastOf("subscribe", "quotes.MNQ");
    assert.equal(req.snapshot, true);
    assert.equal(h.client._subs.get("quotes.MNQ").maxRate, 4);
    bindChannel(store, h.client, "trades.MNQ", { snapshot: false });
    assert.ok(!h.ws.lastOf("subscribe", "trades.MNQ").snapshot);
  });
});

describe("keyed channels", () => {
  for (const channel of ["depth.MNQ", "account.7.orders", "account.7.positions"]) {
    test(`${channel}: snapshot replaces, message sets key, deleted removes key`, (t) => {
      const h = bound(t, channel, { a: { q: 1 }, b: { q: 2 }, gone: null });
      assert.deepEqual(h.state()[channel], { a: { q: 1 }, b: { q: 2 } }, "null entries skipped");
      assert.equal(h.state().other, 1, "the rest of the store is kept");

      h.ws.frame(pub(channel, 11, { q: 3 }, { key: "c" }));
      h.ws.frame(pub(channel, 12, { q: 9 }, { key: "a" }));
      assert.deepEqual(h.state()[channel], { a: { q: 9 }, b: { q: 2 }, c: { q: 3 } }, "set replaces the key's value");

      h.ws.frame(pub(channel, 13, { q: 0 }, { key: "b", deleted: true }));
      h.ws.frame(pub(channel, 14, null, { key: "c" }));
      assert.deepEqual(h.state()[channel], { a: { q: 9 } });

      h.ws.frame({ type: "resync", channel, epoch: "e2", offset: 1, snapshot: { z: { q: 5 } } });
      assert.deepEqual(h.state()[channel], { z: { q: 5 } }, "resync replaces the whole map");
      assert.equal(h.state().other, 1);
    });
  }

  test("keyed maps are new objects on every update (no mutation of prior state)", (t) => {
    const h = bound(t, "depth.MNQ", { a: 1 });
    const before = h.state()["depth.MNQ"];
    h.ws.frame(pub("depth.MNQ", 11, 2, { key: "b" }));
    assert.deepEqual(before, { a: 1 });
    assert.notEqual(h.state()["depth.MNQ"], before);
  });

  test("an empty keyed snapshot is an empty map", (t) => {
    const h = bound(t, "depth.MNQ", {});
    assert.deepEqual(h.state()["depth.MNQ"], {});
  });

  test("unknown channel with keys in the snapshot is treated as keyed", (t) => {
    const h = bound(t, "custom.thing", { x: 1 });
    assert.deepEqual(h.state()["custom.thing"], { x: 1 });
    h.ws.frame(pub("custom.thing", 11, 2, { key: "y" }));
    assert.deepEqual(h.state()["custom.thing"], { x: 1, y: 2 });
  });
});

describe("unkeyed channels", () => {
  test("quotes: snapshot sets the value, messages merge partial updates", (t) => {
    const h = bound(t, "quotes.MNQ", { "": { bid: 1, ask: 2 } }, { key: "mnq" });
    assert.deepEqual(h.state().mnq, { bid: 1, ask: 2 });
    assert.equal(h.state()["quotes.MNQ"], undefined, "stored under `key`");
    h.ws.frame(pub("quotes.MNQ", 11, { ask: 3 }));
    h.ws.frame(pub("quotes.MNQ", 12, { last: 2.5 }));
    assert.deepEqual(h.state().mnq, { bid: 1, ask: 3, last: 2.5 });
  });

  test("quotes without a snapshot: the first message is the value", (t) => {
    const h = bound(t, "quotes.MNQ", {});
    assert.equal(h.state()["quotes.MNQ"], null);
    h.ws.frame(pub("quotes.MNQ", 11, { bid: 4 }));
    assert.deepEqual(h.state()["quotes.MNQ"], { bid: 4 });
  });

  test("account balance merges like quotes", (t) => {
    const h = bound(t, "account.7.balance", { "": { cash: 10, margin: 1 } });
    h.ws.frame(pub("account.7.balance", 11, { cash: 12 }));
    assert.deepEqual(h.state()["account.7.balance"], { cash: 12, margin: 1 });
  });

  test("trades: each message replaces the value", (t) => {
    const h = bound(t, "trades.MNQ", { "": { p: 1, s: 2 } });
    assert.deepEqual(h.state()["trades.MNQ"], { p: 1, s: 2 });
    h.ws.frame(pub("trades.MNQ", 11, { p: 3 }));
    assert.deepEqual(h.state()["trades.MNQ"], { p: 3 });
    h.ws.frame(pub("trades.MNQ", 12, null));
    assert.equal(h.state()["trades.MNQ"], null);
  });

  test("resync replaces the value (no merge with the old one)", (t) => {
    const h = bound(t, "quotes.MNQ", { "": { bid: 1, ask: 2 } });
    h.ws.frame(pub("quotes.MNQ", 11, { last: 5 }));
    h.ws.frame({ type: "resync", channel: "quotes.MNQ", epoch: "e2", offset: 1, snapshot: { "": { bid: 7 } } });
    assert.deepEqual(h.state()["quotes.MNQ"], { bid: 7 });
    h.ws.frame({ type: "resync", channel: "quotes.MNQ", epoch: "e3", offset: 1, snapshot: {} });
    assert.equal(h.state()["quotes.MNQ"], null);
  });

  test("select and merge options are applied", (t) => {
    const h = connected(t);
    const store = createStore();
    bindChannel(store, h.client, "trades.MNQ", {
      select: (v) => v.p,
      merge: (prev, next) => prev + next,
    });
    replySubscribed(h.ws, "trades.MNQ", { epoch: "e1", offset: 1, delivery: "all", snapshot: { "": { p: 10 } } });
    h.ws.frame(pub("trades.MNQ", 2, { p: 5 }));
    assert.equal(store.getState()["trades.MNQ"], 15);
  });
});

describe("unbind", () => {
  test("stops updates, unsubscribes once, keeps the last state", (t) => {
    const h = bound(t, "depth.MNQ", { a: 1 });
    h.ws.frame(pub("depth.MNQ", 11, 2, { key: "b" }));
    const updates = h.store.updates;
    assert.equal(h.unbind(), true);
    assert.equal(h.ws.sentOf("unsubscribe", "depth.MNQ").length, 1);
    assert.equal(h.client._subs.has("depth.MNQ"), false);
    h.ws.frame(pub("depth.MNQ", 12, 3, { key: "c" }));
    h.ws.frame({ type: "resync", channel: "depth.MNQ", epoch: "e2", offset: 1, snapshot: {} });
    assert.equal(h.store.updates, updates);
    assert.deepEqual(h.state()["depth.MNQ"], { a: 1, b: 2 });
    assert.equal(h.unbind(), false, "second unbind is a no-op");
    assert.equal(h.ws.sentOf("unsubscribe", "depth.MNQ").length, 1);
  });

  test("callbacks the client still holds after unbind are ignored", (t) => {
    const h = bound(t, "trades.MNQ", { "": 1 });
    const sub = h.client._subs.get("trades.MNQ");
    h.unbind();
    sub.onMessage(2, { key: "", offset: 11 });
    sub.onResync({ "": 3 }, { reason: "resync" });
    assert.equal(h.state()["trades.MNQ"], 1);
  });

  test("after unbind the channel can be bound again", (t) => {
    const h = bound(t, "trades.MNQ", { "": 1 });
    h.unbind();
    const store2 = createStore();
    bindChannel(store2, h.client, "trades.MNQ");
    replySubscribed(h.ws, "trades.MNQ", { epoch: "e1", offset: 20, delivery: "all", snapshot: { "": 5 } });
    assert.equal(store2.getState()["trades.MNQ"], 5);
    assert.equal(h.state()["trades.MNQ"], 1);
  });
});
