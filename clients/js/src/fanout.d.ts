// Types for fanout.js (@fanout/client), the browser client of the fanout edge WebSocket protocol.

/** Where a client is in a channel: the last offset delivered, in which epoch. */
export interface Position {
  offset: number;
  epoch: string;
}

/** A channel's state: key -> value; unkeyed channels (quotes, trades, bars) use the key "". */
export type Snapshot<T = unknown> = Record<string, T>;

/** quotes.SYM data (the simulated feed's shape; publications may carry only changed fields). */
export interface Quote {
  symbol: string;
  bid: number;
  ask: number;
  bid_size: number;
  ask_size: number;
  last: number;
  change: number;
  volume: number;
  ts: number;
}

/** trades.SYM data. */
export interface Trade {
  symbol: string;
  price: number;
  size: number;
  side: string;
  ts: number;
}

/** bars.<interval>.SYM data. */
export interface Bar {
  t: number;
  o: number;
  h: number;
  l: number;
  c: number;
  v: number;
  n: number;
  interval: string;
}

/** What a channel's live publications look like for a client that falls behind (or sets
 *  maxRate), from the subscribe reply:
 *  - "all": every offset, consecutively (a slow client is disconnected and recovers);
 *  - "conflate": offsets increase but may skip; each message carries the latest value of its
 *    key (quotes: partial updates merged server-side). Not a gap;
 *  - "drop": dropped ranges are announced by gap notices (onGap, the "gap" event). */
export type Delivery = "all" | "conflate" | "drop";

export type ConnectionState = "connecting" | "open" | "closed" | "reconnecting";

export interface StateInfo {
  /** connecting, reconnecting: the attempt number since the last successful connect. */
  attempt?: number;
  /** reconnecting: ms until the next attempt. */
  delay?: number;
  /** connecting, open: the URL being used. */
  url?: string;
  /** open: the client id the server gave. */
  client?: string;
  /** reconnecting, closed: the close code and reason that ended the last connection.
   *  4000-4003 are the client's own: connect timeout, no ping, connect failed, reconnect asked. */
  code?: number;
  reason?: string;
  /** closed: true when the server said not to reconnect (close codes 3500-3999). */
  final?: boolean;
}

export interface Backoff {
  /** ms; default 500 */
  min?: number;
  /** ms; default 20000 */
  max?: number;
}

export interface FanoutOptions {
  /**
   * Sent in the connect frame; a function is called before each connection, and again
   * before the token expires (a `refresh` request: a minute before the end, half way for
   * short tokens) when the server says when it does (authentication on).
   */
  token?: string | null | (() => string | null | Promise<string | null>);
  /** A name for this client, sent in the connect frame (at most 64 characters). */
  name?: string | null;
  /** Log frames and state changes with console.debug. */
  debug?: boolean;
  backoff?: Backoff;
  /** ms from opening a socket to the `connected` reply before giving up on it; default 10000. */
  connectTimeout?: number;
  /** A WebSocket constructor to use instead of the global one (tests, Node). */
  WebSocket?: { new (url: string): WebSocket };
  /**
   * Keep positions across page reloads: true = sessionStorage, or any Storage-like object.
   * A channel subscribed without `recover` then recovers from its stored position.
   */
  persist?: boolean | Pick<Storage, "getItem" | "setItem">;
  /** The storage key of the positions; default "fanout.positions". */
  persistKey?: string;
}

export interface MessageMeta {
  channel: string;
  offset: number;
  epoch: string;
  /** The snapshot key of a keyed channel's message (depth: "bid:21000.25"); "" otherwise. */
  key: string;
  /** The publication removed `key` from the channel's snapshot (a closed position, say). */
  deleted: boolean;
}

export interface ResyncInfo {
  channel: string;
  epoch: string;
  /** Publications after this offset follow. */
  offset: number;
  /** initial: the snapshot asked for with `snapshot: true`; recover_failed: recovery after a
   *  reconnect or a gap was impossible; resync: the server pushed a resync. */
  reason: "initial" | "recover_failed" | "resync";
}

export interface SubscribedInfo {
  channel: string;
  epoch: string;
  offset: number;
  recovered: boolean;
  /** "all" when the server does not say (older servers). */
  delivery: Delivery;
}

/** Publications `from`..`to` (inclusive) of a "drop" channel were dropped for this client.
 *  The position is now `to`; client.history(channel, from, to) may fetch them while retained. */
export interface GapInfo {
  channel: string;
  from: number;
  to: number;
  /** The epoch the offsets belong to. */
  epoch: string;
}

/** A publication as sent by the server (in a history reply). */
export interface Publication<T = any> {
  type: "pub";
  channel: string;
  offset: number;
  /** Present for keyed messages only. */
  key?: string;
  /** Present (true) when the publication removed its key from a keyed snapshot. */
  deleted?: boolean;
  data: T;
}

/** The rejection of client.history(). */
export interface HistoryError extends Error {
  /** The server's error code (history_unavailable: gone, do not retry; unavailable: retry
   *  later; bad_request; bad_channel); undefined when not connected or the connection went. */
  code?: string;
  channel: string;
  from: number;
  to: number;
  epoch: string;
}

export interface ServerError {
  type: "error";
  id?: number | null;
  code: string;
  message: string;
  /** Set when the error answers a subscribe. */
  channel?: string;
}

export interface SubscribeOptions<T = any> {
  /** Each publication at most once, in offset order. On "conflate" channels (and with
   *  maxRate) offsets may skip: each message carries the latest value of its key. */
  onMessage?: (data: T, meta: MessageMeta) => void;
  /** Replace the channel's state with this snapshot (the initial one, and every resync). */
  onResync?: (snapshot: Snapshot<T>, info: ResyncInfo) => void;
  /** After each subscribe reply (the first one and after every reconnect). */
  onSubscribed?: (info: SubscribedInfo) => void;
  /** The subscription failed for good (bad channel, permission denied, ...) and was dropped. */
  onError?: (error: ServerError) => void;
  /** The server dropped a range of publications ("drop" channels): see GapInfo. */
  onGap?: (info: GapInfo) => void;
  /** Ask for the channel's current state on the first subscribe. */
  snapshot?: boolean;
  /** Resume from a position saved earlier (e.g. before a page reload). */
  recover?: Position;
  /** At most this many updates per second for this channel (0 < maxRate <= 1000; sent as
   *  max_rate). Offsets then skip as on "conflate". Out of range throws a RangeError. */
  maxRate?: number | null;
}

export interface Subscription {
  readonly channel: string;
  unsubscribe(): boolean;
  position(): Position | null;
  /** The channel's delivery from the last subscribe reply; null before the first. */
  delivery(): Delivery | null;
}

export interface Counters {
  /** Subscriptions resumed exactly after a reconnect or a gap. */
  recovered: number;
  /** Snapshots that replaced a channel's state: failed recoveries and server resyncs. */
  resynced: number;
  /** Gaps: gap notices of "drop" channels (the position moves past them), and publications
   *  that skipped offsets without one (each triggers a recovery). Conflation skips are not gaps. */
  gaps: number;
  /** Publications at or below the channel's position (ignored). */
  duplicates: number;
  /** Publications delivered to onMessage. */
  messages: number;
  /** Reconnects scheduled (including reconnectNow). */
  reconnects: number;
}

export interface ConnectedReply {
  type: "connected";
  id: number;
  client: string;
  version: number;
  ping_interval: number;
  pong_timeout: number;
}

export interface Session {
  client: string;
  version: number;
  /** seconds */
  pingInterval: number;
  /** seconds */
  pongTimeout: number;
}

export interface FanoutEvents {
  state: (state: ConnectionState, info: StateInfo) => void;
  connected: (reply: ConnectedReply) => void;
  error: (error: ServerError) => void;
  /** A gap notice on any subscribed "drop" channel (after the subscription's onGap). */
  gap: (info: GapInfo) => void;
}

/** Whether a close code says to reconnect (all but 3500-3999). */
export function shouldReconnect(code: number): boolean;

/** The reconnect delay (ms) a server advises in a close reason (`retry_after_ms=N`), or 0. */
export function advisedDelay(reason: string | null | undefined): number;

/** When (ms) to resend a subscribe that got a retryable error reply: its `retry_after_ms`
 * plus up to half again (random), or 1-5 s without advice; at most 60 s plus half. */
export function subscribeRetryDelay(reply: { retry_after_ms?: number } | null | undefined): number;

export class FanoutClient {
  /** Default URL: ws(s)://<location.host>/ws. A list of URLs is cycled through on reconnects. */
  constructor(urls?: string | string[], options?: FanoutOptions);
  constructor(options: FanoutOptions);

  readonly urls: string[];
  readonly options: FanoutOptions;
  readonly state: ConnectionState;
  /** URL of the current or last connection. */
  readonly url: string | null;
  /** The open connection's session, null when not open. */
  readonly session: Session | null;
  /** Live counters (the same object, updated in place). */
  readonly counters: Counters;

  connect(): this;
  close(): void;
  /** Drop the connection and connect again at once, recovering every channel. */
  reconnectNow(): void;

  subscribe<T = any>(channel: string, options?: SubscribeOptions<T>): Subscription;
  unsubscribe(channel: string): boolean;
  /** {channel: {offset, epoch}} for every subscribed channel with a known position. */
  positions(): Record<string, Position>;
  channels(): string[];
  /** Round-trip time in ms. */
  ping(): Promise<number>;
  /** The publications `from`..`to` (inclusive) of a channel, in offset order (e.g. a gap's range).
   *  `epoch` defaults to the subscription's. Rejects with a HistoryError. Not ordered with the
   *  live flow: use the result to fill a record of past messages, not to overwrite newer state. */
  history<T = any>(channel: string, from: number, to: number, epoch?: string): Promise<Publication<T>[]>;

  on<E extends keyof FanoutEvents>(event: E, fn: FanoutEvents[E]): () => void;
  off<E extends keyof FanoutEvents>(event: E, fn: FanoutEvents[E]): void;
}

export default FanoutClient;
