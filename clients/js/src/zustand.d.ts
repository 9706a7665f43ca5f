// Types for zustand.js: feed a Zustand-style store from a fanout.js channel.

import type { FanoutClient, MessageMeta, ResyncInfo, ServerError } from "./fanout.js";

/** What bindChannel needs of a store (zustand/vanilla's StoreApi fits). */
export interface StoreLike<S = any> {
  getState(): S;
  setState(partial: S | Partial<S> | ((state: S) => S | Partial<S>)): void;
}

export interface BindOptions<T = any, V = T> {
  /** The store property holding the channel's state; default the channel name. */
  key?: string;
  /** Transform each value (snapshot entry or message data) before it is stored. */
  select?: (value: T, meta: MessageMeta | ResyncInfo) => V;
  /** Combine a message's (selected) value with the stored one: per key on keyed channels, the
   *  whole value on unkeyed ones. Default: replace, but shallow merge on quotes.* and
   *  account.*.balance (as the server merges them). */
  merge?: (prev: V, next: V, meta: MessageMeta) => V;
  /** Whether the channel is keyed; default from the channel name (depth.*,
   *  account.*.orders|positions), or learnt from the first keyed snapshot/message. */
  keyed?: boolean;
  /** Ask for the current state on subscribe; default true. */
  snapshot?: boolean;
  maxRate?: number | null;
  /** The subscription failed for good. */
  onError?: (error: ServerError) => void;
}

/** Unsubscribes; false if already unbound. The store keeps the last state. */
export type Unbind = () => boolean;

/** Keeps store.getState()[key]: a key -> value object for keyed channels, the value (or null)
 *  for unkeyed ones. Throws as client.subscribe does (already subscribed, bad maxRate). */
export function bindChannel<T = any, V = T>(
  store: StoreLike, client: FanoutClient, channel: string, options?: BindOptions<T, V>,
): Unbind;
export default bindChannel;
