"""Prometheus metrics for one process, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "construct_connections", "Open client connections", ["transport"], registry=self.registry
        )
        self.messages_accepted = Counter(
            "construct_messages_accepted", "Messages stored and acknowledged to the sender", registry=self.registry
        )
        self.messages_delivered = Counter(
            "construct_messages_delivered",
            "Messages pushed to a connection, live or from the inbox after a (re)connect",
            ["path"],
            registry=self.registry,
        )
        self.messages_acknowledged = Counter(
            "construct_messages_acknowledged", "Messages removed by the recipient's ackMessage", registry=self.registry
        )
        self.send_to_ack_seconds = Histogram(
            "construct_send_to_ack_seconds",
            "Time from a message's acceptance to its recipient's acknowledgement",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400, 604800),
            registry=self.registry,
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
        self.errors = Counter("construct_errors", "Error replies by code", ["code"], registry=self.registry)
        # Resolved once: a label lookup on every delivery is measurable.
        self._delivered_by_path = {path: self.messages_delivered.labels(path) for path in ("live", "inbox")}

    def connection_opened(self, transport: str) -> None:
        self.connections.labels(transport).inc()

    def connection_closed(self, transport: str) -> None:
        self.connections.labels(transport).dec()

    def delivered(self, path: str, count: int = 1) -> None:
        self._delivered_by_path[path].inc(count)

    def acknowledged(self, latency_seconds: float) -> None:
        self.messages_acknowledged.inc()
        self.send_to_ack_seconds.observe(latency_seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
