// Types for react.js: React hooks for fanout.js (React is passed in, not imported).

import type {
  FanoutClient, ConnectionState, StateInfo, Subscription, SubscribeOptions, ServerError,
} from "./fanout.js";

/** The parts of React the hooks use. */
export interface ReactLike {
  useEffect(effect: () => void | (() => void), deps?: readonly unknown[]): void;
  useRef<T>(initial: T): { current: T };
  useState<S>(initial: S | (() => S)): [S, (next: S | ((prev: S) => S)) => void];
}

export interface UseChannelOptions<T = any> {
  onMessage?: SubscribeOptions<T>["onMessage"];
  onResync?: SubscribeOptions<T>["onResync"];
  onGap?: SubscribeOptions<T>["onGap"];
  onSubscribed?: SubscribeOptions<T>["onSubscribed"];
  /** A server error for the subscription, or the Error subscribe() threw (already subscribed
   *  to the channel, bad maxRate). Without onError such an Error is rethrown from the effect. */
  onError?: (error: ServerError | Error) => void;
  /** Changing it resubscribes. */
  snapshot?: boolean;
  /** Changing it resubscribes. */
  maxRate?: number | null;
}

/** Subscribes while mounted (a null client or empty channel subscribes nothing). Returns a ref
 *  holding the current subscription (null while none). */
export type UseChannel = <T = any>(
  client: FanoutClient | null | undefined,
  channel: string | null | undefined,
  options?: UseChannelOptions<T>,
) => { readonly current: Subscription | null };

export interface ConnectionStateValue {
  state: ConnectionState;
  info: StateInfo;
}

export type UseConnectionState = (client: FanoutClient | null | undefined) => ConnectionStateValue;

export function makeHooks(React: ReactLike): { useChannel: UseChannel; useConnectionState: UseConnectionState };
export function makeUseChannel(React: ReactLike): UseChannel;
export function makeUseConnectionState(React: ReactLike): UseConnectionState;
export default makeHooks;
