// A delay the server advises in its close reason ("... retry_after_ms=N") is honoured.
import { test } from "node:test";
import assert from "node:assert/strict";
import { advisedDelay, subscribeRetryDelay } from "../src/fanout.js";
import { handshake, makeClient } from "./harness.mjs";

test("advisedDelay reads the token, and only a well-formed one", () => {
  assert.equal(advisedDelay("slow consumer retry_after_ms=1500"), 1500);
  assert.equal(advisedDelay("retry_after_ms=20"), 20);
  assert.equal(advisedDelay("slow consumer"), 0);
  assert.equal(advisedDelay("retry_after_ms=15x"), 0);
  assert.equal(advisedDelay(undefined), 0);
});

test("a close with an advised delay waits at least that long, plus up to half again", (t) => {
  t.mock.method(Math, "random", () => 0.5);
  const h = makeClient("ws://edge/ws", { backoff: { min: 100, max: 1000 } });
  h.client.connect();
  handshake(h.last());
  h.last().serverClose(3001, "slow consumer retry_after_ms=4000");
  const r = h.states.filter((s) => s.state === "reconnecting").at(-1);
  assert.equal(r.advised, 4000);
  assert.equal(r.delay, 5000); // 4000 + 0.5 * 2000; the backoff alone would be 50
  h.client.close();
});

test("without advice the backoff alone decides", (t) => {
  t.mock.method(Math, "random", () => 0.5);
  const h = makeClient("ws://edge/ws", { backoff: { min: 100, max: 1000 } });
  h.client.connect();
  handshake(h.last());
  h.last().serverClose(3001, "slow consumer");
  const r = h.states.filter((s) => s.state === "reconnecting").at(-1);
  assert.equal(r.delay, 50);
  h.client.close();
});

test("subscribeRetryDelay: the reply's advice plus up to half again, else 1-5 s", (t) => {
  t.mock.method(Math, "random", () => 0.5);
  assert.equal(subscribeRetryDelay({ code: "unavailable", retry_after_ms: 800 }), 1000);
  assert.equal(subscribeRetryDelay({ code: "unavailable" }), 3000);
  assert.equal(subscribeRetryDelay({ code: "unavailable", retry_after_ms: "800" }), 3000);
  assert.equal(subscribeRetryDelay({ code: "unavailable", retry_after_ms: -5 }), 3000);
  assert.equal(subscribeRetryDelay({ code: "unavailable", retry_after_ms: 600000 }), 75000);
});

test("a subscribe deferred with retry_after_ms is resent after the advice, not 1-5 s", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  t.mock.method(Math, "random", () => 0.5);
  const h = makeClient("ws://edge/ws");
  h.client.subscribe("quotes.MNQ");
  h.client.connect();
  handshake(h.last());
  const ws = h.last();
  ws.frame({ type: "error", id: ws.lastOf("subscribe", "quotes.MNQ").id, code: "unavailable",
             message: "edge busy recovering, retry", retry_after_ms: 400 });
  t.mock.timers.tick(499);
  assert.equal(ws.sentOf("subscribe", "quotes.MNQ").length, 1);
  t.mock.timers.tick(1); // 400 + 0.5 * 200
  assert.equal(ws.sentOf("subscribe", "quotes.MNQ").length, 2);
  h.client.close();
});
