// What an application written against the packed @fanout/client looks like: the root and
// both sub-path exports, with React's and zustand's own types (pinned in package.json).
// Type-checked by tsc --strict in tests/integration/test_js_package.py; never run.

import * as React from "react";
import { createStore } from "zustand/vanilla";

import FanoutDefault, {
  FanoutClient,
  shouldReconnect,
  type Bar,
  type GapInfo,
  type Position,
  type Publication,
  type Quote,
  type Snapshot,
  type Subscription,
} from "@fanout/client";
import { makeHooks, type ReactLike } from "@fanout/client/react";
import { bindChannel, type StoreLike, type Unbind } from "@fanout/client/zustand";

const client: FanoutClient = new FanoutDefault(["ws://127.0.0.1:8000/ws"], {
  name: "consumer",
  token: async () => "a token",
  persist: true,
});
const again = new FanoutClient({ debug: true });
const reconnect: boolean = shouldReconnect(3500);

const sub: Subscription = client.subscribe<Quote>("quotes.MNQ", {
  snapshot: true,
  maxRate: 10,
  onResync(snapshot: Snapshot<Quote>) {
    const q: Quote | undefined = snapshot[""];
    if (q) console.log(q.bid.toFixed(2));
  },
  onMessage(data, meta) {
    const offset: number = meta.offset;
    console.log(data.last, offset, meta.key.length);
  },
  onGap(gap: GapInfo) {
    void client.history<Bar>("bars.1m.MNQ", gap.from, gap.to).then((pubs: Publication<Bar>[]) => {
      for (const pub of pubs) console.log(pub.offset, pub.data.c);
    });
  },
});
const pos: Position | null = sub.position();
const positions: Record<string, Position> = client.positions();
client.on("state", (state, info) => console.log(state, info.attempt ?? 0));

// React passes as the hooks' React (its real types, not a stand-in).
const react: ReactLike = React;
const { useChannel, useConnectionState } = makeHooks(React);
export function useQuote(symbol: string): number | undefined {
  const [last, setLast] = React.useState<number | undefined>(undefined);
  useChannel<Quote>(client, `quotes.${symbol}`, { onMessage: (q) => setLast(q.last) });
  const { state } = useConnectionState(client);
  return state === "open" ? last : undefined;
}

// A zustand vanilla store passes as the binding's store.
const store = createStore<Record<string, unknown>>(() => ({}));
const asStore: StoreLike = store;
const unbind: Unbind = bindChannel(store, client, "depth.MNQ", { key: "depth" });
const unbound: boolean = unbind();

export { again, asStore, pos, positions, react, reconnect, unbound };
