// fanout.js tokens: a token function is called before each connection and, when the server
// says how long the token lasts (`expires_in`), again in time to `refresh` it.
// Run: node --test edge/static/test/

import { test, describe } from "node:test";
import assert from "node:assert/strict";

import { makeClient, SESSION } from "./harness.mjs";

/** Let pending promise callbacks (an async token function) run. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** Open the socket, wait for the (async) connect, answer it with `session`. */
async function connectWith(h, session) {
  h.last().open();
  await settle();
  const req = h.last().lastOf("connect");
  assert.ok(req, "client sent no connect");
  h.last().frame({ type: "connected", id: req.id, ...session });
  return req;
}

// No server pings in these tests: without heartbeats the watchdog stays off.
const QUIET = { ...SESSION, ping_interval: 0 };

function tokens() {
  const issued = [];
  const fn = async () => {
    const tok = `token-${issued.length + 1}`;
    issued.push(tok);
    return tok;
  };
  return { issued, fn };
}

describe("token function", () => {
  test("is called before each connection", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
    const { issued, fn } = tokens();
    const h = makeClient("ws://a/ws", { token: fn, backoff: { min: 10, max: 10 } });
    h.client.connect();
    assert.equal((await connectWith(h, SESSION)).token, "token-1");
    h.last().serverClose(3006, "token expired");
    t.mock.timers.tick(10);
    assert.equal((await connectWith(h, SESSION)).token, "token-2");
    assert.deepEqual(issued, ["token-1", "token-2"]);
  });

  test("refreshes a minute before expires_in, then on each refreshed reply", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
    const { issued, fn } = tokens();
    const h = makeClient("ws://a/ws", { token: fn });
    h.client.connect();
    await connectWith(h, { ...QUIET, expires_in: 300 });
    const ws = h.last();
    t.mock.timers.tick(239_999);
    await settle();
    assert.equal(ws.sentOf("refresh").length, 0);
    t.mock.timers.tick(1);
    await settle();
    const req = ws.lastOf("refresh");
    assert.equal(req.token, "token-2");
    ws.frame({ type: "refreshed", id: req.id, expires_in: 100 });
    t.mock.timers.tick(49_999); // short token: half way (max(100 - 60, 100 / 2) = 50 s)
    await settle();
    assert.equal(ws.sentOf("refresh").length, 1);
    t.mock.timers.tick(1);
    await settle();
    assert.equal(ws.lastOf("refresh").token, "token-3");
    assert.deepEqual(issued, ["token-1", "token-2", "token-3"]);
    assert.equal(h.sockets.length, 1, "no reconnect");
  });

  test("a refused refresh is retried within 5 s and reported as an error", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
    const { fn } = tokens();
    const h = makeClient("ws://a/ws", { token: fn });
    const errors = [];
    h.client.on("error", (e) => errors.push(e));
    h.client.connect();
    await connectWith(h, { ...QUIET, expires_in: 100 });
    const ws = h.last();
    t.mock.timers.tick(50_000);
    await settle();
    const first = ws.lastOf("refresh");
    ws.frame({ type: "error", id: first.id, code: "unauthorized", message: "invalid token" });
    assert.equal(errors.at(-1).code, "unauthorized");
    t.mock.timers.tick(5_000); // min(5, 50 s left / 2)
    await settle();
    assert.equal(ws.sentOf("refresh").length, 2);
  });

  test("a failing token function is retried, the connection kept", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
    let calls = 0;
    const fn = async () => {
      calls += 1;
      if (calls === 2) throw new Error("auth service down");
      return `token-${calls}`;
    };
    const h = makeClient("ws://a/ws", { token: fn });
    h.client.connect();
    await connectWith(h, { ...QUIET, expires_in: 20 });
    t.mock.timers.tick(10_000); // half way: the function fails
    await settle();
    assert.equal(h.last().sentOf("refresh").length, 0);
    t.mock.timers.tick(5_000); // min(5, 10 s left / 2)
    await settle();
    assert.equal(h.last().lastOf("refresh").token, "token-3");
    assert.equal(h.sockets.length, 1);
  });

  test("no refresh with a plain token, without expires_in, or after the socket went", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
    const plain = makeClient("ws://a/ws", { token: "static" });
    plain.client.connect();
    await connectWith(plain, { ...QUIET, expires_in: 100 });
    const { fn } = tokens();
    const unauth = makeClient("ws://a/ws", { token: fn });
    unauth.client.connect();
    await connectWith(unauth, QUIET);
    const lostTokens = tokens();
    const lost = makeClient("ws://a/ws", {
      token: lostTokens.fn,
      backoff: { min: 600_000, max: 600_000 },
    });
    lost.client.connect();
    await connectWith(lost, { ...QUIET, expires_in: 100 });
    lost.last().serverClose(1006, "");
    t.mock.timers.tick(100_000);
    await settle();
    for (const h of [plain, unauth, lost]) {
      for (const ws of h.sockets) assert.equal(ws.sentOf("refresh").length, 0);
    }
    assert.deepEqual(lostTokens.issued, ["token-1"], "no token asked for a connection that went");
  });
});
