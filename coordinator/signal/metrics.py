"""Prometheus metrics of the signal service, in a registry of its own (several apps per process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

DROP_REASONS = ("offline", "rate_limited", "too_large", "malformed")
CONNECTION_RESULTS = ("accepted", "unauthorized", "expired", "unavailable", "full")


class SignalMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected_peers = Gauge(
            "starling_signal_connected_peers", "Peers with an open signal connection", registry=r
        )
        self.forwarded = Counter(
            "starling_signal_messages_forwarded_total", "Boxes forwarded to a connected recipient", registry=r
        )
        self.dropped = Counter(
            "starling_signal_messages_dropped_total", "Client frames not forwarded, by reason", ["reason"], registry=r
        )
        self.connections = Counter(
            "starling_signal_connections_total", "WebSocket handshakes, by result", ["result"], registry=r
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for result in CONNECTION_RESULTS:
            self.connections.labels(result)
