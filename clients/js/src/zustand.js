// Feed a Zustand-style store from a fanout.js channel. Zustand is not imported: any store with
// getState() and setState(partial | fn) works (zustand/vanilla createStore, useStore's api).
//
//   import { createStore } from "zustand/vanilla";
//   import { bindChannel } from "@fanout/client/zustand"; // or "/static/zustand.js"
//   const store = createStore(() => ({}));
//   const unbind = bindChannel(store, client, "quotes.MNQ", { key: "mnq" });
//   // store.getState().mnq -> the quote; unbind() unsubscribes.
//
// The channel's state lives under one property of the store (`key`, default the channel name):
//   keyed channels (depth, account orders/positions): an object, message key -> value;
//   unkeyed channels (quotes, trades, bars, balance): the value itself (null before any).
// Every snapshot (the initial one and every resync) replaces that property. A message on a
// keyed channel sets (or, with merge, merges) its key; deleted keys (a null/undefined value,
// or meta.deleted) are removed. On an unkeyed channel a message replaces the value, except on
// channels whose server snapshot merges fields (quotes, account balance), where it is merged
// shallowly, as the server does. `merge` overrides both.

const KEYED = /^(depth\.|account\.[^.]+\.(orders|positions)$)/;
const MERGED = /^(quotes\.|account\.[^.]+\.balance$)/;

const shallowMerge = (prev, next) =>
  prev && next && typeof prev === "object" && typeof next === "object" && !Array.isArray(next)
    ? { ...prev, ...next }
    : next;

/**
 * Subscribe `client` to `channel` and keep `store.getState()[key]` up to date.
 * options: key, select(value, meta|info), merge(prev, value, meta), keyed, snapshot (default
 * true), maxRate, onError. Returns unbind(): unsubscribes (the store keeps its last state).
 */
export function bindChannel(store, client, channel, options) {
  const o = options || {};
  const prop = o.key ?? channel;
  const select = typeof o.select === "function" ? o.select : (v) => v;
  const merge = typeof o.merge === "function" ? o.merge : MERGED.test(channel) ? shallowMerge : null;
  let keyed = typeof o.keyed === "boolean" ? o.keyed : KEYED.test(channel) ? true : null; // null: not known yet
  let active = true;

  const put = (value) => store.setState((state) => ({ ...state, [prop]: value }));

  const sub = client.subscribe(channel, {
    snapshot: o.snapshot ?? true,
    maxRate: o.maxRate ?? null,
    onResync(snapshot, info) {
      if (!active) return;
      const keys = Object.keys(snapshot || {});
      if (keyed === null && keys.some((k) => k !== "")) keyed = true;
      if (keyed) {
        const map = {};
        for (const k of keys) if (snapshot[k] != null) map[k] = select(snapshot[k], info);
        put(map);
      } else {
        put(snapshot && snapshot[""] != null ? select(snapshot[""], info) : null);
      }
    },
    onMessage(data, meta) {
      if (!active) return;
      if (keyed === null && meta.key) keyed = true;
      const state = store.getState() || {};
      if (keyed) {
        const map = { ...(state[prop] && typeof state[prop] === "object" ? state[prop] : {}) };
        if (data == null || meta.deleted) delete map[meta.key];
        else {
          const value = select(data, meta);
          map[meta.key] = merge && meta.key in map ? merge(map[meta.key], value, meta) : value;
        }
        put(map);
      } else {
        const value = data == null ? null : select(data, meta);
        put(merge && state[prop] != null && value != null ? merge(state[prop], value, meta) : value);
      }
    },
    onError(err) {
      if (active && typeof o.onError === "function") o.onError(err);
    },
  });

  return function unbind() {
    if (!active) return false;
    active = false;
    return sub.unsubscribe();
  };
}

export default bindChannel;
