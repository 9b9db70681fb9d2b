"""Prometheus metrics for one process, in a registry of its own (no global state).

The per-message figures (accepted, delivered, acknowledged, send-to-ack latency, error replies)
are plain tallies read at scrape time: prometheus_client's own types take a lock and check their state
on every update, a measurable share of what a message costs.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

SEND_TO_ACK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400, 604800)
DELIVERY_PATHS = ("live", "inbox")


class _MessageTallies:
    """Collector of the per-message counters and the send-to-ack histogram."""

    def __init__(self) -> None:
        self.accepted = 0
        self.delivered = dict.fromkeys(DELIVERY_PATHS, 0)
        self.acknowledged = 0
        # Error replies by code: a server shedding load answers thousands a second.
        self.errors: dict[str, int] = {}
        # One count per bucket of SEND_TO_ACK_BUCKETS, and one for above the last.
        self.ack_latency_counts = [0] * (len(SEND_TO_ACK_BUCKETS) + 1)
        self.ack_latency_sum = 0.0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "construct_messages_accepted", "Messages stored and acknowledged to the sender", value=self.accepted
        )
        delivered = CounterMetricFamily(
            "construct_messages_delivered",
            "Messages pushed to a connection, live or from the inbox after a (re)connect",
            labels=["path"],
        )
        for path, count in self.delivered.items():
            delivered.add_metric([path], count)
        yield delivered
        errors = CounterMetricFamily("construct_errors", "Error replies by code", labels=["code"])
        for code, count in self.errors.items():
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily(
            "construct_messages_acknowledged",
            "Messages removed by the recipient's ackMessage",
            value=self.acknowledged,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*SEND_TO_ACK_BUCKETS, float("inf")), self.ack_latency_counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
        yield HistogramMetricFamily(
            "construct_send_to_ack_seconds",
            "Time from a message's acceptance to its recipient's acknowledgement",
            buckets=buckets,
            sum_value=self.ack_latency_sum,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._tallies = _MessageTallies()
        self.registry.register(self._tallies)
        self.connections = Gauge(
            "construct_connections", "Open client connections", ["transport"], registry=self.registry
        )
        self.inbox_depth = Gauge(
            "construct_inbox_depth", "Unacknowledged messages in all inboxes, at the last sweep", registry=self.registry
        )
        self.messages_expired = Counter(
            "construct_messages_expired", "Messages removed unacknowledged after their TTL", registry=self.registry
        )
        self.worker_drains = Counter(
            "construct_worker_drains", "Backlogs the worker woke an instance to drain", registry=self.registry
        )
        self.worker_redeliveries = Counter(
            "construct_worker_redeliveries",
            "Users whose unacknowledged messages the worker had pushed again",
            registry=self.registry,
        )

    def connection_opened(self, transport: str) -> None:
        self.connections.labels(transport).inc()

    def connection_closed(self, transport: str) -> None:
        self.connections.labels(transport).dec()

    def accepted(self) -> None:
        self._tallies.accepted += 1

    def delivered(self, path: str, count: int = 1) -> None:
        self._tallies.delivered[path] += count

    def acknowledged(self, latencies_seconds: Iterable[float]) -> None:
        tallies = self._tallies
        counts = tallies.ack_latency_counts
        for latency in latencies_seconds:
            tallies.acknowledged += 1
            tallies.ack_latency_sum += latency
            counts[bisect_left(SEND_TO_ACK_BUCKETS, latency)] += 1

    def error(self, code: str) -> None:
        errors = self._tallies.errors
        errors[code] = errors.get(code, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
