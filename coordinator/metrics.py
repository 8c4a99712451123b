"""Prometheus metrics of the coordinator (one registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "starling_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "starling_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.peers_total = Gauge("starling_peers_total", "Peers in the mesh", registry=r)
        self.peers_connected = Gauge("starling_peers_connected", "Peers with an open map stream", registry=r)
        self.stream_clients = Gauge("starling_stream_clients", "Open map streams", registry=r)
        self.map_computations = Counter("starling_map_computations_total", "Peer maps computed", ["kind"], registry=r)
        self.map_duration = Histogram(
            "starling_map_computation_seconds",
            "Time to recompute the maps affected by one change (kind=incremental) or all maps (kind=full)",
            ["kind"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.stream_messages = Counter(
            "starling_stream_messages_total", "Messages sent on map streams", ["type"], registry=r
        )
        self.revision = Gauge("starling_mesh_revision", "Store revision of the mesh", registry=r)
        self.auth_failures = Counter(
            "starling_coordinator_auth_failures_total", "Failed authentications", ["kind"], registry=r
        )
        self.auth_throttled = Counter(
            "starling_coordinator_auth_throttled_total",
            "Authentication attempts refused (429) because their source address failed too often",
            ["kind"],
            registry=r,
        )

    def observe_compute(self, maps: int, seconds: float, *, full: bool) -> None:
        kind = "full" if full else "incremental"
        self.map_computations.labels(kind).inc(maps)
        self.map_duration.labels(kind).observe(seconds)
