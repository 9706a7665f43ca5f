// React hooks for fanout.js. React is not bundled or imported: pass yours in.
//
//   import React from "react";
//   import { makeHooks } from "@fanout/client/react"; // or "/static/react.js"
//   const { useChannel, useConnectionState } = makeHooks(React);
//
//   function Quote({ client, symbol }) {
//     const [q, setQ] = React.useState({});
//     useChannel(client, `quotes.${symbol}`, {
//       snapshot: true,
//       onResync: (snap) => setQ(snap[""] || {}),
//       onMessage: (data) => setQ((prev) => ({ ...prev, ...data })),
//     });
//     const { state } = useConnectionState(client);
//     ...
//   }
//
// useChannel subscribes on mount and when client, channel, snapshot or maxRate change, and
// unsubscribes on unmount. The callbacks are read from a ref on every call, so new function
// identities on re-render never resubscribe. A client allows one subscription per channel:
// two mounted components using the same channel make the second subscribe throw (reported to
// its onError, or rethrown when it has none).

/** { useChannel, useConnectionState } bound to the given React (anything with useEffect,
 *  useRef and useState). */
export function makeHooks(React) {
  return { useChannel: makeUseChannel(React), useConnectionState: makeUseConnectionState(React) };
}

export function makeUseChannel(React) {
  const { useEffect, useRef } = React;
  return function useChannel(client, channel, options) {
    const opts = options || {};
    const latest = useRef(opts);
    latest.current = opts; // render-time write: the newest callbacks, whatever renders later
    const subRef = useRef(null);
    const snapshot = !!opts.snapshot;
    const maxRate = opts.maxRate ?? null;

    useEffect(() => {
      if (!client || !channel) return undefined;
      let active = true; // callbacks after cleanup (a reply in flight) are dropped
      const call = (name) => (...args) => {
        const fn = active && latest.current[name];
        if (typeof fn === "function") fn(...args);
      };
      let sub;
      try {
        sub = client.subscribe(channel, {
          snapshot,
          maxRate,
          onMessage: call("onMessage"),
          onResync: call("onResync"),
          onGap: call("onGap"),
          onSubscribed: call("onSubscribed"),
          onError: call("onError"),
        });
      } catch (err) {
        const onError = latest.current.onError;
        if (typeof onError !== "function") throw err;
        onError(err);
        return undefined;
      }
      subRef.current = sub;
      return () => {
        active = false;
        if (subRef.current === sub) subRef.current = null;
        sub.unsubscribe();
      };
    }, [client, channel, snapshot, maxRate]);

    return subRef;
  };
}

export function makeUseConnectionState(React) {
  const { useEffect, useState } = React;
  return function useConnectionState(client) {
    const [value, setValue] = useState(() => ({ state: client ? client.state : "closed", info: {} }));
    useEffect(() => {
      if (!client) return undefined;
      // The state may have moved between render and this effect.
      setValue((prev) => (prev.state === client.state ? prev : { state: client.state, info: {} }));
      return client.on("state", (state, info) => setValue({ state, info: info || {} }));
    }, [client]);
    return value;
  };
}

export default makeHooks;
