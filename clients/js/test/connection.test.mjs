// fanout.js connection life: backoff, URL cycling, heartbeat watchdog, close codes.
// Run: node --test edge/static/test/

import { test, describe } from "node:test";
import assert from "node:assert/strict";

import { FanoutClient, shouldReconnect } from "../src/fanout.js";
import { makeClient, handshake, SESSION } from "./harness.mjs";

const reconnecting = (states) => states.filter((s) => s.state === "reconnecting");

/** Fail the current socket (1006 before open) and let the reconnect timer run. */
function failAndRetry(t, h) {
  h.last().serverClose(1006, "");
  const r = reconnecting(h.states).at(-1);
  t.mock.timers.tick(r.delay);
  return r;
}

describe("backoff", () => {
  test("ceilings grow exponentially from min and are capped at max (Math.random = 1)", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const h = makeClient("ws://a/ws", { backoff: { min: 100, max: 1000 } });
    h.client.connect();
    const delays = [];
    for (let i = 0; i < 7; i++) delays.push(failAndRetry(t, h).delay);
    assert.deepEqual(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
    assert.deepEqual(
      reconnecting(h.states).map((s) => s.attempt),
      [1, 2, 3, 4, 5, 6, 7],
    );
    assert.equal(h.sockets.length, 8, "one new socket per expired delay");
    assert.equal(h.client.counters.reconnects, 7);
  });

  test("full jitter: every delay is within [0, min(max, min * 2^(attempt-1))]", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws", { backoff: { min: 100, max: 3000 } });
    h.client.connect();
    const seen = new Set();
    for (let i = 0; i < 200; i++) {
      const r = failAndRetry(t, h);
      const cap = Math.min(3000, 100 * 2 ** (r.attempt - 1));
      assert.ok(Number.isInteger(r.delay) && r.delay >= 0 && r.delay <= cap, `attempt ${r.attempt}: ${r.delay} > ${cap}`);
      seen.add(r.delay);
    }
    assert.ok(seen.size > 20, "delays are random, not fixed");
  });

  test("Math.random = 0 gives immediate retries (the jitter floor is 0)", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 0);
    const h = makeClient("ws://a/ws");
    h.client.connect();
    for (let i = 0; i < 3; i++) assert.equal(failAndRetry(t, h).delay, 0);
    assert.equal(h.sockets.length, 4);
  });

  test("default backoff is 500 ms .. 20 s", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const delays = [];
    for (let i = 0; i < 8; i++) delays.push(failAndRetry(t, h).delay);
    assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);
  });

  test("the schedule starts over after a successful connect", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const h = makeClient("ws://a/ws", { backoff: { min: 100, max: 10000 } });
    h.client.connect();
    for (let i = 0; i < 4; i++) failAndRetry(t, h);
    assert.equal(reconnecting(h.states).at(-1).delay, 800);
    handshake(h.last());
    assert.equal(h.client.state, "open");
    h.last().serverClose(1006);
    const r = reconnecting(h.states).at(-1);
    assert.equal(r.attempt, 1);
    assert.equal(r.delay, 100);
  });

  test("a socket that opens but never gets `connected` does not reset the schedule", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const h = makeClient("ws://a/ws", { backoff: { min: 100, max: 10000 }, connectTimeout: 5000 });
    h.client.connect();
    failAndRetry(t, h); // attempt 1: 100
    h.last().open(); // socket open, connect request sent, no reply
    t.mock.timers.tick(5000); // connect timeout
    assert.deepEqual(h.sockets[1].closedWith, { code: 4000, reason: "connect timeout" });
    const r = reconnecting(h.states).at(-1);
    assert.equal(r.code, 4000);
    assert.equal(r.attempt, 2);
    assert.equal(r.delay, 200);
  });

  test("reconnectNow() drops the socket and reconnects at once", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    handshake(h.last());
    h.client.reconnectNow();
    assert.equal(h.sockets[0].closedWith.code, 4003);
    assert.equal(reconnecting(h.states).at(-1).delay, 0);
    t.mock.timers.tick(0);
    assert.equal(h.sockets.length, 2);
  });
});

describe("URL list", () => {
  test("each attempt uses the next URL, cycling", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient(["ws://a/ws", "ws://b/ws", "ws://c/ws"]);
    h.client.connect();
    for (let i = 0; i < 4; i++) failAndRetry(t, h);
    assert.deepEqual(
      h.sockets.map((s) => s.url),
      ["ws://a/ws", "ws://b/ws", "ws://c/ws", "ws://a/ws", "ws://b/ws"],
    );
    handshake(h.last());
    assert.equal(h.client.url, "ws://b/ws");
    const open = h.states.filter((s) => s.state === "open").at(-1);
    assert.equal(open.url, "ws://b/ws");
    assert.equal(open.client, SESSION.client);
  });

  test("a lost connection moves on to the next URL too", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient(["ws://a/ws", "ws://b/ws"]);
    h.client.connect();
    handshake(h.last());
    failAndRetry(t, h);
    assert.equal(h.last().url, "ws://b/ws");
  });

  test("a single URL string is used every time; an empty list is refused", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://only/ws");
    h.client.connect();
    failAndRetry(t, h);
    failAndRetry(t, h);
    assert.deepEqual(new Set(h.sockets.map((s) => s.url)), new Set(["ws://only/ws"]));
    assert.throws(() => makeClient([]), /empty URL list/);
  });

  test("a constructor that throws counts as a failed attempt (4002) and is retried", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const urls = [];
    class Throwing {
      constructor(url) {
        urls.push(url);
        throw new Error("bad url");
      }
    }
    const client = new FanoutClient(["ws://x/ws", "ws://y/ws"], { WebSocket: Throwing, backoff: { min: 10, max: 100 } });
    const states = [];
    client.on("state", (s, info) => states.push({ state: s, ...info }));
    client.connect();
    assert.equal(client.state, "reconnecting");
    assert.equal(states.at(-1).code, 4002);
    t.mock.timers.tick(10);
    t.mock.timers.tick(20);
    assert.deepEqual(urls, ["ws://x/ws", "ws://y/ws", "ws://x/ws"]);
    client.close();
    assert.equal(client.state, "closed");
  });
});

describe("heartbeat watchdog", () => {
  const WATCHDOG_MS = (SESSION.ping_interval + SESSION.pong_timeout) * 1000 + 2000; // 37 s

  test("no ping within ping_interval + pong_timeout + 2 s closes the socket (4001) and schedules a reconnect", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws);
    t.mock.timers.tick(WATCHDOG_MS - 1);
    assert.equal(h.client.state, "open");
    assert.equal(ws.closedWith, null);
    t.mock.timers.tick(1);
    assert.deepEqual(ws.closedWith, { code: 4001, reason: "no ping from server" });
    assert.equal(h.client.state, "reconnecting");
    const r = reconnecting(h.states).at(-1);
    assert.equal(r.code, 4001);
    assert.equal(r.delay, 500);
    t.mock.timers.tick(500);
    assert.equal(h.sockets.length, 2, "a new connection is attempted");
  });

  test("each server ping is answered with a pong and re-arms the watchdog", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws);
    for (let i = 0; i < 5; i++) {
      t.mock.timers.tick(WATCHDOG_MS - 1);
      ws.frame({ type: "ping" });
    }
    assert.equal(ws.sentOf("pong").length, 5);
    assert.deepEqual(ws.lastOf("pong"), { type: "pong" });
    assert.equal(h.client.state, "open");
    assert.equal(ws.closedWith, null);
    t.mock.timers.tick(WATCHDOG_MS);
    assert.equal(ws.closedWith.code, 4001);
  });

  test("a ping inside a coalesced frame counts too", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws);
    t.mock.timers.tick(30000);
    ws.frame([{ type: "pub", channel: "x", offset: 1, data: 1 }, { type: "ping" }]);
    t.mock.timers.tick(WATCHDOG_MS - 1);
    assert.equal(ws.closedWith, null);
    assert.equal(ws.sentOf("pong").length, 1);
  });

  test("other messages do not re-arm it", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws);
    t.mock.timers.tick(30000);
    ws.frame({ type: "pub", channel: "x", offset: 1, data: 1 });
    t.mock.timers.tick(WATCHDOG_MS - 30000);
    assert.equal(ws.closedWith.code, 4001);
  });

  test("the watchdog uses the session's own ping_interval and pong_timeout", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws, { ...SESSION, ping_interval: 1, pong_timeout: 0.5 });
    t.mock.timers.tick(3499);
    assert.equal(ws.closedWith, null);
    t.mock.timers.tick(1);
    assert.equal(ws.closedWith.code, 4001);
  });

  test("no watchdog after the connection is closed by the client", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    handshake(h.last());
    h.client.close();
    assert.equal(h.client.state, "closed");
    t.mock.timers.tick(10 * WATCHDOG_MS);
    assert.equal(h.sockets.length, 1);
    assert.equal(h.client.state, "closed");
  });
});

describe("close codes", () => {
  test("shouldReconnect: only 3500-3999 say stop", () => {
    for (const code of [1000, 1001, 1006, 1009, 1011, 1012, 3000, 3001, 3002, 3003, 3004, 3005, 3499, 4000, 4001, 4002, 4003]) {
      assert.equal(shouldReconnect(code), true, String(code));
    }
    for (const code of [3500, 3501, 3502, 3503, 3750, 3999]) assert.equal(shouldReconnect(code), false, String(code));
  });

  for (const code of [3500, 3501, 3503, 3999]) {
    test(`${code} from the server stops reconnecting (closed, final)`, (t) => {
      t.mock.timers.enable({ apis: ["setTimeout"] });
      const h = makeClient("ws://a/ws");
      h.client.connect();
      handshake(h.last());
      h.last().serverClose(code, "bad request");
      assert.equal(h.client.state, "closed");
      const last = h.states.at(-1);
      assert.deepEqual(last, { state: "closed", code, reason: "bad request", final: true });
      t.mock.timers.tick(10 * 60 * 1000);
      assert.equal(h.sockets.length, 1, "no new socket");
      assert.equal(h.client.counters.reconnects, 0);
    });
  }

  test("a final close before `connected` stops too", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    h.last().open();
    h.last().serverClose(3500, "bad connect: token");
    assert.equal(h.client.state, "closed");
    t.mock.timers.tick(60000);
    assert.equal(h.sockets.length, 1);
  });

  test("connect() after a final close starts again", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    handshake(h.last());
    h.last().serverClose(3500);
    h.client.connect();
    assert.equal(h.sockets.length, 2);
    assert.equal(h.client.state, "connecting");
  });

  for (const code of [1000, 1001, 1006, 1011, 1012, 3000, 3001, 3002, 3003, 3004, 3005, 3499]) {
    test(`${code} from the server reconnects with backoff`, (t) => {
      t.mock.timers.enable({ apis: ["setTimeout"] });
      t.mock.method(Math, "random", () => 0.5);
      const h = makeClient("ws://a/ws");
      h.client.connect();
      handshake(h.last());
      h.last().serverClose(code, "why");
      assert.equal(h.client.state, "reconnecting");
      const r = h.states.at(-1);
      assert.equal(r.code, code);
      assert.equal(r.reason, "why");
      assert.equal(r.attempt, 1);
      assert.equal(r.delay, 250);
      t.mock.timers.tick(249);
      assert.equal(h.sockets.length, 1);
      t.mock.timers.tick(1);
      assert.equal(h.sockets.length, 2);
      assert.equal(h.client.state, "connecting");
    });
  }

  test("a socket error without a close event is treated as 1006 after 100 ms", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws);
    ws.onerror({});
    assert.equal(h.client.state, "open");
    t.mock.timers.tick(100);
    assert.equal(h.client.state, "reconnecting");
    assert.equal(h.states.at(-1).code, 1006);
    assert.equal(ws.closedWith.code, 1000, "1006 cannot be sent: the client closes with 1000");
  });

  test("a socket error followed by its close event reconnects once", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    const ws = h.last();
    handshake(ws);
    ws.onerror({});
    ws.serverClose(1006);
    t.mock.timers.tick(100);
    assert.equal(reconnecting(h.states).length, 1);
  });

  test("close() while waiting to reconnect cancels the attempt", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    h.client.connect();
    handshake(h.last());
    h.last().serverClose(1006);
    h.client.close();
    assert.equal(h.client.state, "closed");
    t.mock.timers.tick(60000);
    assert.equal(h.sockets.length, 1);
  });

  test("a connect error reply closes with 4002 and reconnects", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const errors = [];
    h.client.on("error", (e) => errors.push(e));
    h.client.connect();
    const ws = h.last();
    ws.open();
    ws.frame({ type: "error", id: ws.lastOf("connect").id, code: "bad_request", message: "no" });
    assert.equal(errors.length, 1);
    assert.equal(ws.closedWith.code, 4002);
    assert.equal(h.client.state, "reconnecting");
  });
});
