"""Edge counters as plain integers, exported through a Prometheus collector.

The fan-out loop touches these once per message per client; a prometheus-client Counter
costs a lock and a method call each time, a plain attribute increment does not. The
collector reads them when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Why a connection was refused before it became a WebSocket (docs/architecture.md#metrics);
# every reason is exported from the start, at 0, so that rates and alerts see them all.
REFUSAL_REASONS = ("origin", "total_limit", "ip_limit", "connection_rate", "handshake_timeout")
# Load admission (edge/admission.py): what is admitted or deferred (told to retry later).
ADMISSION_KINDS = ("connection", "recovery")
ADMISSION_OUTCOMES = ("admitted", "deferred")
# Where a subscribe's position came from (edge/hub.py): memory (the hub's recent window or
# its live position, no broker read), shared (an identical broker read already under way),
# broker (a read of its own).
SUBSCRIBE_SOURCES = ("memory", "shared", "broker")


# Seconds: a delivery takes ~1-50 ms when all is well; seconds mean trouble.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)


class Histogram:
    """A Prometheus histogram as plain numbers: an observation is a bisect and two adds
    (prometheus-client's takes a lock), cheap enough for every delivered message."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per `le`, as the exposition format has them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class EdgeStats:
    connections: int = 0
    connections_total: int = 0
    subscriptions: int = 0
    channels: int = 0
    frames_sent: int = 0
    frames_direct: int = 0  # of frames_sent, written past the queue (edge/wire.py)
    writes: int = 0  # socket writes of frames (direct and from the writer)
    messages_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    live_messages: int = 0
    # Live reader paced after an expensive flush (edge/hub.py `Hub.pace`): times, seconds.
    live_paced: int = 0
    live_paced_seconds: float = 0.0
    subscribes_fresh: int = 0
    subscribes_recovered: int = 0
    subscribes_not_recovered: int = 0
    messages_recovered: int = 0
    gaps_filled: int = 0
    resyncs: int = 0
    lost_writes: int = 0  # channels whose stream lost what this edge had delivered
    pubsub_reconnects: int = 0
    queue_messages: int = 0
    queue_bytes: int = 0
    disconnects: dict[str, int] = field(default_factory=dict)
    # connections refused before the upgrade (edge/admission.py), by reason
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    request_errors: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # by namespace
    conflated: dict[str, int] = field(default_factory=dict)  # by namespace
    # Clients found max_lag behind while still reading (edge/heartbeat.py): their queue's
    # policy applied until they caught up.
    clients_behind: int = 0
    jwks_fetches: dict[str, int] = field(default_factory=dict)  # by result: ok, error
    jwks_keys: int = 0  # keys of the JWKS in use
    admission: dict[tuple[str, str], int] = field(default_factory=lambda: {
        (k, o): 0 for k in ADMISSION_KINDS for o in ADMISSION_OUTCOMES})
    subscribe_sources: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SUBSCRIBE_SOURCES, 0))
    history_reads: int = 0  # broker history reads (subscribes, history requests, repairs)
    history_batches: int = 0  # broker calls that carried subscribes' reads (many each)
    window_messages: int = 0  # publications held in the hubs' recent windows

    # Upstream receive -> written to every client that keeps up, by namespace (edge/hub.py).
    delivery: dict[str, Histogram] = field(default_factory=dict)
    # A ping's round trip: the ping waits behind everything queued for the client and in
    # its socket, so this is how far behind the client is, in seconds (edge/session.py).
    client_lag: Histogram = field(default_factory=Histogram)

    def delivery_histogram(self, namespace: str) -> Histogram:
        hist = self.delivery.get(namespace)
        if hist is None:
            hist = self.delivery[namespace] = Histogram()
        return hist

    def count_queue(self, messages: int, size: int) -> None:
        """Messages and bytes that entered (or, negative, left) a client's send queue."""
        self.queue_messages += messages
        self.queue_bytes += size

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def count_refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_admission(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self.admission[key] = self.admission.get(key, 0) + 1

    def count_error(self, code: str) -> None:
        self.request_errors[code] = self.request_errors.get(code, 0) + 1

    def count_dropped(self, namespace: str, n: int = 1) -> None:
        self.dropped[namespace] = self.dropped.get(namespace, 0) + n

    def count_conflated(self, namespace: str) -> None:
        self.conflated[namespace] = self.conflated.get(namespace, 0) + 1

    def count_jwks_fetch(self, result: str) -> None:
        self.jwks_fetches[result] = self.jwks_fetches.get(result, 0) + 1


class EdgeCollector(Collector):
    def __init__(self, stats: EdgeStats, ready: Callable[[], bool] = lambda: True) -> None:
        self.stats = stats
        self.ready = ready  # what /readyz says, short of its Redis PING (for alerts)

    def collect(self) -> Iterator[Metric]:
        s = self.stats

        def gauge(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(f"fanout_edge_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> Metric:
            return CounterMetricFamily(f"fanout_edge_{name}", doc, value=value)

        yield gauge("ready", "1 while the pub/sub connection is up and probed, token keys are "
                    "loaded and the edge is not draining (/readyz, but its Redis PING).",
                    1 if self.ready() else 0)
        yield gauge("connections", "Open client connections.", s.connections)
        yield counter("connections_accepted", "Client connections accepted.",
                      s.connections_total)
        yield gauge("subscriptions", "Active client subscriptions.", s.subscriptions)
        yield gauge("channels", "Channels this node is subscribed to in Redis.", s.channels)
        yield counter("frames_sent", "WebSocket frames sent to clients.", s.frames_sent)
        yield counter("frames_direct", "Frames written straight to the socket, past the "
                      "send queue.", s.frames_direct)
        yield counter("writes", "Socket writes to clients (one may carry several frames).",
                      s.writes)
        yield counter("messages_sent", "Messages sent to clients.", s.messages_sent)
        yield counter("bytes_sent", "Payload bytes sent to clients.", s.bytes_sent)
        yield counter("frames_received", "Frames received from clients.", s.frames_received)
        yield counter("live_messages", "Live messages received from Redis.", s.live_messages)
        yield counter("live_paced", "Flushes after which the live reader held its next reply "
                      "(the flush was expensive: more gathers for the next one).", s.live_paced)
        yield counter("live_paced_seconds", "Seconds the live reader held replies after "
                      "expensive flushes.", s.live_paced_seconds)
        subs = CounterMetricFamily(
            "fanout_edge_subscribes", "Subscribes by outcome.", labels=["outcome"]
        )
        subs.add_metric(["fresh"], s.subscribes_fresh)
        subs.add_metric(["recovered"], s.subscribes_recovered)
        subs.add_metric(["not_recovered"], s.subscribes_not_recovered)
        yield subs
        sources = CounterMetricFamily(
            "fanout_edge_subscribe_sources",
            "Subscribes by where their position and replay came from: memory (no broker "
            "read), shared (an identical read under way), broker (a read of their own).",
            labels=["source"],
        )
        for source, n in sorted(s.subscribe_sources.items()):
            sources.add_metric([source], n)
        yield sources
        yield counter("history_reads", "Broker history reads (subscribes, history requests, "
                      "gap fills and resyncs).", s.history_reads)
        yield counter("history_batches", "Broker calls carrying subscribes' history reads "
                      "(the reads of one event-loop turn go in one).", s.history_batches)
        yield gauge("window_messages", "Publications held in the channels' recent windows "
                    "(FANOUT_RECENT_WINDOW_*).", s.window_messages)
        admission = CounterMetricFamily(
            "fanout_edge_admission",
            "Load admission: new connections and recovering subscribes' broker reads, "
            "admitted or deferred (told to retry later).", labels=["kind", "outcome"],
        )
        for (kind, outcome), n in sorted(s.admission.items()):
            admission.add_metric([kind, outcome], n)
        yield admission
        yield counter("recovered_messages", "Messages replayed by recovery.", s.messages_recovered)
        yield counter("gaps_filled", "Live gaps filled from the stream.", s.gaps_filled)
        yield counter("resyncs", "Channel resyncs pushed (epoch change, history lost).",
                      s.resyncs)
        yield counter("lost_writes", "Channels found to have lost messages this edge had "
                      "delivered (Redis lost acknowledged writes): given a new epoch, resynced.",
                      s.lost_writes)
        yield counter("pubsub_reconnects", "Redis pub/sub reconnects.", s.pubsub_reconnects)
        yield counter("clients_behind", "Clients found max_lag behind while still reading "
                      "(slow consumers: their queue's policy applied until they caught up).",
                      s.clients_behind)
        yield gauge("queue_messages", "Messages queued for clients.", s.queue_messages)
        yield gauge("queue_bytes", "Bytes queued for clients.", s.queue_bytes)
        disc = CounterMetricFamily(
            "fanout_edge_disconnects", "Connections closed, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s.disconnects.items()):
            disc.add_metric([reason], n)
        yield disc
        refused = CounterMetricFamily(
            "fanout_edge_connections_refused",
            "Connections refused before the WebSocket upgrade, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        for name, doc, values in (
            ("messages_dropped", "Messages dropped for slow clients (drop policy), by namespace.",
             s.dropped),
            ("messages_conflated",
             "Messages replaced by a newer value for slow or rate-limited clients, by namespace.",
             s.conflated),
        ):
            family = CounterMetricFamily(f"fanout_edge_{name}", doc, labels=["namespace"])
            for namespace, n in sorted(values.items()):
                family.add_metric([namespace], n)
            yield family
        errs = CounterMetricFamily(
            "fanout_edge_request_errors", "Error replies, by code.", labels=["code"]
        )
        for code, n in sorted(s.request_errors.items()):
            errs.add_metric([code], n)
        yield errs
        delivery = HistogramMetricFamily(
            "fanout_edge_delivery_latency_seconds",
            "Upstream receive (ingest) to written to every client that keeps up, per live "
            "message, by namespace (clocks of ingest and edge hosts must agree: NTP).",
            labels=["namespace"],
        )
        for namespace, hist in sorted(s.delivery.items()):
            delivery.add_metric([namespace], hist.buckets(), hist.total)
        yield delivery
        lag = HistogramMetricFamily(
            "fanout_edge_client_lag_seconds",
            "Round trip of the edge's pings: a ping waits behind all that is queued for the "
            "client and in its socket, so this is how far behind clients are.",
        )
        lag.add_metric([], s.client_lag.buckets(), s.client_lag.total)
        yield lag
        jwks = CounterMetricFamily(
            "fanout_edge_jwks_fetches", "JWKS fetches (token keys), by result: ok, error.",
            labels=["result"],
        )
        for result, n in sorted(s.jwks_fetches.items()):
            jwks.add_metric([result], n)
        yield jwks
        yield gauge("jwks_keys", "Keys in the JWKS in use (0 without a JWKS URL, or before "
                    "its first fetch).", s.jwks_keys)
