"""Edge counters as plain integers, exported through a Prometheus collector.

The fan-out loop touches these once per message per client; a prometheus-client Counter
costs a lock and a method call each time, a plain attribute increment does not. The
collector reads them when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


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
    subscribes_fresh: int = 0
    subscribes_recovered: int = 0
    subscribes_not_recovered: int = 0
    messages_recovered: int = 0
    gaps_filled: int = 0
    resyncs: int = 0
    pubsub_reconnects: int = 0
    queue_messages: int = 0
    queue_bytes: int = 0
    disconnects: dict[str, int] = field(default_factory=dict)
    request_errors: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # by namespace
    conflated: dict[str, int] = field(default_factory=dict)  # by namespace

    def count_queue(self, messages: int, size: int) -> None:
        """Messages and bytes that entered (or, negative, left) a client's send queue."""
        self.queue_messages += messages
        self.queue_bytes += size

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def count_error(self, code: str) -> None:
        self.request_errors[code] = self.request_errors.get(code, 0) + 1

    def count_dropped(self, namespace: str, n: int = 1) -> None:
        self.dropped[namespace] = self.dropped.get(namespace, 0) + n

    def count_conflated(self, namespace: str) -> None:
        self.conflated[namespace] = self.conflated.get(namespace, 0) + 1


class EdgeCollector(Collector):
    def __init__(self, stats: EdgeStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats

        def gauge(name: str, doc: str, value: float) -> Metric:
            return GaugeMetricFamily(f"fanout_edge_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> Metric:
            return CounterMetricFamily(f"fanout_edge_{name}", doc, value=value)

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
        subs = CounterMetricFamily(
            "fanout_edge_subscribes", "Subscribes by outcome.", labels=["outcome"]
        )
        subs.add_metric(["fresh"], s.subscribes_fresh)
        subs.add_metric(["recovered"], s.subscribes_recovered)
        subs.add_metric(["not_recovered"], s.subscribes_not_recovered)
        yield subs
        yield counter("recovered_messages", "Messages replayed by recovery.", s.messages_recovered)
        yield counter("gaps_filled", "Live gaps filled from the stream.", s.gaps_filled)
        yield counter("resyncs", "Channel resyncs pushed (epoch change, history lost).",
                      s.resyncs)
        yield counter("pubsub_reconnects", "Redis pub/sub reconnects.", s.pubsub_reconnects)
        yield gauge("queue_messages", "Messages queued for clients.", s.queue_messages)
        yield gauge("queue_bytes", "Bytes queued for clients.", s.queue_bytes)
        disc = CounterMetricFamily(
            "fanout_edge_disconnects", "Connections closed, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s.disconnects.items()):
            disc.add_metric([reason], n)
        yield disc
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
