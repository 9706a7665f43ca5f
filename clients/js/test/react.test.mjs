// react.js hooks (useChannel, useConnectionState) on a minimal fake React.
// Run: node --test edge/static/test/

import { test, describe } from "node:test";
import assert from "node:assert/strict";

import { makeHooks } from "../src/react.js";
import { makeClient, handshake, replySubscribed, pub } from "./harness.mjs";

const CH = "quotes.MNQ";

/** A tiny React: one component at a time, hooks by call order, effects run after each render,
 *  cleanups on dependency change and unmount. setState re-renders synchronously. */
function fakeReact() {
  let current = null; // the instance being rendered
  const same = (a, b) => a && b && a.length === b.length && a.every((v, i) => Object.is(v, b[i]));

  const React = {
    useRef(initial) {
      const inst = current;
      const i = inst.index++;
      if (!(i in inst.hooks)) inst.hooks[i] = { current: initial };
      return inst.hooks[i];
    },
    useState(initial) {
      const inst = current;
      const i = inst.index++;
      if (!(i in inst.hooks)) {
        const hook = { value: typeof initial === "function" ? initial() : initial };
        hook.set = (next) => {
          const value = typeof next === "function" ? next(hook.value) : next;
          if (Object.is(value, hook.value)) return;
          hook.value = value;
          inst.setStates += 1;
          if (inst.mounted && !inst.rendering) inst.render();
        };
        inst.hooks[i] = hook;
      }
      return [inst.hooks[i].value, inst.hooks[i].set];
    },
    useCallback(fn, deps) {
      const inst = current;
      const i = inst.index++;
      const h = inst.hooks[i];
      if (h && same(h.deps, deps)) return h.fn;
      inst.hooks[i] = { fn, deps };
      return fn;
    },
    useEffect(effect, deps) {
      const inst = current;
      const i = inst.index++;
      const h = inst.hooks[i];
      if (!h) inst.hooks[i] = { effect, deps, cleanup: undefined, pending: true };
      else if (!deps || !same(h.deps, deps)) Object.assign(h, { effect, deps, pending: true });
      inst.effects.add(i);
    },
  };

  /** Mount `component(props)`; returns render(props), unmount() and the last output. */
  function mount(component, props) {
    const inst = {
      hooks: [],
      effects: new Set(),
      index: 0,
      props,
      output: undefined,
      renders: 0,
      setStates: 0,
      mounted: true,
      rendering: false,
      render(nextProps) {
        if (nextProps !== undefined) inst.props = nextProps;
        inst.rendering = true;
        current = inst;
        inst.index = 0;
        try {
          inst.output = component(inst.props);
          inst.renders += 1;
        } finally {
          current = null;
          inst.rendering = false;
        }
        // commit: cleanups of changed effects, then the effects, in order
        for (const i of inst.effects) {
          const h = inst.hooks[i];
          if (!h.pending) continue;
          if (typeof h.cleanup === "function") h.cleanup();
          h.cleanup = undefined;
        }
        for (const i of inst.effects) {
          const h = inst.hooks[i];
          if (!h.pending) continue;
          h.pending = false;
          h.cleanup = h.effect();
        }
        return inst.output;
      },
      unmount() {
        inst.mounted = false;
        for (const i of inst.effects) {
          const h = inst.hooks[i];
          if (typeof h.cleanup === "function") h.cleanup();
          h.cleanup = undefined;
        }
      },
    };
    inst.render();
    return inst;
  }

  return { React, mount };
}

/** A connected client (fake socket, mocked timers). */
function connected(t) {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  t.mock.method(Math, "random", () => 0);
  const h = makeClient("ws://a/ws");
  h.client.connect();
  handshake(h.last());
  return { ...h, ws: h.last() };
}

/** Spy on client.subscribe: records every call's channel and options. */
function spySubscribe(t, client) {
  const calls = [];
  const orig = client.subscribe.bind(client);
  t.mock.method(client, "subscribe", (channel, opts) => {
    calls.push({ channel, opts });
    return orig(channel, opts);
  });
  return calls;
}

describe("useChannel", () => {
  test("subscribes on mount with snapshot and maxRate, and delivers to the callbacks", (t) => {
    const h = connected(t);
    const calls = spySubscribe(t, h.client);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const got = { resyncs: [], messages: [], subscribed: [] };
    let subRef;
    mount(({ channel }) => {
      subRef = useChannel(h.client, channel, {
        snapshot: true,
        maxRate: 5,
        onResync: (snap, info) => got.resyncs.push({ snap, reason: info.reason }),
        onMessage: (data, meta) => got.messages.push({ data, offset: meta.offset }),
        onSubscribed: (info) => got.subscribed.push(info.offset),
      });
    }, { channel: CH });

    assert.equal(calls.length, 1);
    assert.equal(calls[0].channel, CH);
    assert.equal(calls[0].opts.snapshot, true);
    assert.equal(calls[0].opts.maxRate, 5);
    const req = h.ws.lastOf("subscribe", CH);
    assert.ok(req, "subscribe on the wire");
    assert.equal(req.snapshot, true);
    assert.equal(subRef.current.channel, CH, "the ref holds the handle");

    replySubscribed(h.ws, CH, { epoch: "e1", offset: 7, delivery: "conflate", snapshot: { "": { bid: 1 } } });
    h.ws.frame(pub(CH, 8, { ask: 2 }));
    assert.deepEqual(got.resyncs, [{ snap: { "": { bid: 1 } }, reason: "initial" }]);
    assert.deepEqual(got.messages, [{ data: { ask: 2 }, offset: 8 }]);
    assert.deepEqual(got.subscribed, [7]);
  });

  test("no client or no channel: nothing is subscribed", (t) => {
    const h = connected(t);
    const calls = spySubscribe(t, h.client);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const c = mount(({ client, channel }) => useChannel(client, channel, {}), { client: null, channel: CH });
    c.render({ client: h.client, channel: "" });
    assert.equal(calls.length, 0);
    c.render({ client: h.client, channel: CH });
    assert.equal(calls.length, 1);
    c.unmount();
  });

  test("re-rendering with new callbacks does not resubscribe, and the latest callbacks are called", (t) => {
    const h = connected(t);
    const calls = spySubscribe(t, h.client);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const seen = [];
    const c = mount(({ tag }) => {
      useChannel(h.client, CH, { snapshot: true, onMessage: (d, m) => seen.push(`${tag}:${m.offset}`) });
    }, { tag: "a" });
    replySubscribed(h.ws, CH, { epoch: "e1", offset: 1, delivery: "all" });
    h.ws.frame(pub(CH, 2));
    c.render({ tag: "b" });
    c.render({ tag: "c" });
    h.ws.frame(pub(CH, 3));
    assert.equal(calls.length, 1, "one subscribe across re-renders");
    assert.equal(h.ws.sentOf("subscribe", CH).length, 1);
    assert.equal(h.ws.sentOf("unsubscribe", CH).length, 0);
    assert.deepEqual(seen, ["a:2", "c:3"]);
  });

  test("a callback added on re-render is picked up; one removed is no longer called", (t) => {
    const h = connected(t);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const messages = [];
    const c = mount(({ withMsg }) => {
      useChannel(h.client, CH, withMsg ? { onMessage: (d, m) => messages.push(m.offset) } : {});
    }, { withMsg: false });
    replySubscribed(h.ws, CH, { epoch: "e1", offset: 1, delivery: "all" });
    h.ws.frame(pub(CH, 2));
    c.render({ withMsg: true });
    h.ws.frame(pub(CH, 3));
    c.render({ withMsg: false });
    h.ws.frame(pub(CH, 4));
    assert.deepEqual(messages, [3]);
  });

  for (const [what, from, to] of [
    ["channel", { channel: CH }, { channel: "quotes.ES" }],
    ["snapshot", { snapshot: false }, { snapshot: true }],
    ["maxRate", { maxRate: 2 }, { maxRate: 10 }],
  ]) {
    test(`changing ${what} unsubscribes and subscribes again`, (t) => {
      const h = connected(t);
      const calls = spySubscribe(t, h.client);
      const { React, mount } = fakeReact();
      const { useChannel } = makeHooks(React);
      const base = { channel: CH, snapshot: false, maxRate: null };
      const c = mount((p) => useChannel(h.client, p.channel, { snapshot: p.snapshot, maxRate: p.maxRate }), { ...base, ...from });
      replySubscribed(h.ws, CH, { epoch: "e1", offset: 1, delivery: "all" });
      c.render({ ...base, ...from }); // same deps: nothing happens
      assert.equal(calls.length, 1);
      c.render({ ...base, ...to });
      assert.equal(calls.length, 2);
      assert.equal(h.ws.sentOf("unsubscribe", CH).length, 1, "old one unsubscribed");
      const next = { ...base, ...to };
      assert.equal(calls[1].channel, next.channel);
      assert.equal(calls[1].opts.snapshot, next.snapshot);
      assert.equal(calls[1].opts.maxRate, next.maxRate);
      assert.ok(h.ws.lastOf("subscribe", next.channel));
      assert.deepEqual(Array.from(h.client._subs.keys()), [next.channel]);
    });
  }

  test("snapshot truthiness, not identity, is the dependency", (t) => {
    const h = connected(t);
    const calls = spySubscribe(t, h.client);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const c = mount((p) => useChannel(h.client, CH, { snapshot: p.s }), { s: 1 });
    c.render({ s: true });
    c.render({ s: "yes" });
    assert.equal(calls.length, 1);
    c.render({ s: 0 });
    assert.equal(calls.length, 2);
    c.render({ s: undefined });
    assert.equal(calls.length, 2);
  });

  test("unmount unsubscribes and clears the ref; later pubs reach nobody", (t) => {
    const h = connected(t);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const seen = [];
    let subRef;
    const c = mount(() => {
      subRef = useChannel(h.client, CH, { onMessage: (d, m) => seen.push(m.offset) });
    });
    replySubscribed(h.ws, CH, { epoch: "e1", offset: 1, delivery: "all" });
    h.ws.frame(pub(CH, 2));
    c.unmount();
    assert.equal(subRef.current, null);
    assert.equal(h.ws.sentOf("unsubscribe", CH).length, 1);
    assert.equal(h.client._subs.has(CH), false);
    h.ws.frame(pub(CH, 3));
    assert.deepEqual(seen, [2]);
  });

  test("callbacks arriving after cleanup are dropped", (t) => {
    // A stub client keeps the options so we can call them after unsubscribe (a reply in flight).
    const subs = [];
    const client = {
      subscribe(channel, opts) {
        const s = { channel, opts, unsubscribed: 0, unsubscribe: () => (s.unsubscribed += 1, true) };
        subs.push(s);
        return s;
      },
    };
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    const seen = [];
    const cb = (name) => (...a) => seen.push([name, ...a]);
    const c = mount((p) => useChannel(client, p.channel, {
      onMessage: cb("message"), onResync: cb("resync"), onGap: cb("gap"), onSubscribed: cb("subscribed"), onError: cb("error"),
    }), { channel: "a" });
    subs[0].opts.onMessage(1, { offset: 1 });
    c.render({ channel: "b" }); // first subscription cleaned up
    assert.equal(subs[0].unsubscribed, 1);
    for (const name of ["onMessage", "onResync", "onGap", "onSubscribed", "onError"]) subs[0].opts[name]("late");
    subs[1].opts.onResync({}, { reason: "initial" });
    c.unmount();
    assert.equal(subs[1].unsubscribed, 1);
    for (const name of ["onMessage", "onResync", "onGap", "onSubscribed", "onError"]) subs[1].opts[name]("late");
    assert.deepEqual(seen, [["message", 1, { offset: 1 }], ["resync", {}, { reason: "initial" }]]);
  });

  test("a duplicate channel subscribe goes to onError, or throws without one", (t) => {
    const h = connected(t);
    const { React, mount } = fakeReact();
    const { useChannel } = makeHooks(React);
    mount(() => useChannel(h.client, CH, {}));
    const errors = [];
    let subRef;
    const second = mount(() => {
      subRef = useChannel(h.client, CH, { onError: (e) => errors.push(e) });
    });
    assert.equal(errors.length, 1);
    assert.match(errors[0].message, /already subscribed/);
    assert.equal(subRef.current, null);
    second.unmount(); // no cleanup to run, the first stays subscribed
    assert.equal(h.client._subs.has(CH), true);
    assert.throws(() => mount(() => useChannel(h.client, CH, {})), /already subscribed/);
  });
});

describe("useConnectionState", () => {
  test("follows the client's state events and stops listening on unmount", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 0);
    const h = makeClient("ws://a/ws");
    const { React, mount } = fakeReact();
    const { useConnectionState } = makeHooks(React);
    const c = mount(() => useConnectionState(h.client));
    assert.deepEqual(c.output, { state: "closed", info: {} });
    const rendersBefore = c.renders;

    h.client.connect();
    assert.equal(c.output.state, "connecting");
    assert.equal(c.output.info.url, "ws://a/ws");
    handshake(h.last());
    assert.equal(c.output.state, "open");
    assert.equal(c.output.info.client, "edge1-000000000001");
    assert.ok(c.renders > rendersBefore);

    h.last().serverClose(1006, "gone");
    assert.equal(c.output.state, "reconnecting");
    assert.equal(c.output.info.code, 1006);

    c.unmount();
    const listeners = h.client._listeners.get("state");
    assert.equal(listeners.size, 1, "only the harness's own listener is left");
    const after = c.renders;
    t.mock.timers.tick(0);
    handshake(h.last());
    assert.equal(h.client.state, "open");
    assert.equal(c.renders, after, "no render after unmount");
  });

  test("picks up a state change between render and effect", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const h = makeClient("ws://a/ws");
    const { React, mount } = fakeReact();
    const { useConnectionState } = makeHooks(React);
    // Move the client while the component renders (after useState read the state, before effects).
    const c = mount(() => {
      const v = useConnectionState(h.client);
      if (h.client.state === "closed") h.client.connect();
      return v;
    });
    assert.equal(c.output.state, "connecting");
    assert.deepEqual(c.output.info, {});
  });

  test("no client: closed, and no listener", () => {
    const { React, mount } = fakeReact();
    const { useConnectionState } = makeHooks(React);
    const c = mount(() => useConnectionState(null));
    assert.deepEqual(c.output, { state: "closed", info: {} });
    c.unmount();
  });

  test("switching clients moves the listener", (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const a = makeClient("ws://a/ws");
    const b = makeClient("ws://b/ws");
    const { React, mount } = fakeReact();
    const { useConnectionState } = makeHooks(React);
    const c = mount((p) => useConnectionState(p.client), { client: a.client });
    c.render({ client: b.client });
    a.client.connect();
    assert.equal(c.output.state, "closed", "old client ignored");
    b.client.connect();
    assert.equal(c.output.state, "connecting");
    assert.equal(a.client._listeners.get("state").size, 1);
  });
});
