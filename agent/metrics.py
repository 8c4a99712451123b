"""Prometheus metrics of the agent, collected from its status on each scrape and served on a local
port (`metrics_listen`, e.g. 127.0.0.1:9586; empty = off). Peer labels are peer names."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.status import AgentStatus

PATHS = ("idle", "connecting", "direct", "relayed", "lost")
FIREWALL_STATES = ("absent", "guard", "enforcing", "error", "disabled")


class AgentCollector(Collector):
    def __init__(self, status: Callable[[], AgentStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self.status()
        now = time.time()
        peers = st["peers"]
        by_path = GaugeMetricFamily("starling_agent_peers", "Remote peers by path type", labels=["path"])
        for kind in PATHS:
            by_path.add_metric([kind], sum(1 for p in peers if p["path"] == kind))
        yield by_path
        path = GaugeMetricFamily(
            "starling_agent_peer_path", "1 for the current path of each peer", labels=["peer", "path"]
        )
        age = GaugeMetricFamily(
            "starling_agent_handshake_age_seconds", "Seconds since the last WireGuard handshake", labels=["peer"]
        )
        rx = CounterMetricFamily("starling_agent_peer_received_bytes", "Bytes received from a peer", labels=["peer"])
        tx = CounterMetricFamily("starling_agent_peer_sent_bytes", "Bytes sent to a peer", labels=["peer"])
        changes = CounterMetricFamily("starling_agent_path_changes", "Path state changes per peer", labels=["peer"])
        latency = GaugeMetricFamily(
            "starling_agent_peer_latency_seconds",
            "Round trip of the last WireGuard handshake with a peer (agent/latency.py); absent until measured",
            labels=["peer"],
        )
        relayed = CounterMetricFamily(
            "starling_agent_relayed_bytes", "Bytes carried through a TURN relay", labels=["peer", "direction"]
        )
        for p in peers:
            path.add_metric([p["name"], p["path"]], 1)
            handshake = p["last_handshake"]
            if handshake:
                age.add_metric([p["name"]], max(0.0, now - handshake))
            rx.add_metric([p["name"]], p["rx_bytes"])
            tx.add_metric([p["name"]], p["tx_bytes"])
            changes.add_metric([p["name"]], p["path_changes"])
            if p["latency_ms"] is not None:
                latency.add_metric([p["name"]], p["latency_ms"] / 1000)
            relayed.add_metric([p["name"], "sent"], p["relayed_sent_bytes"])
            relayed.add_metric([p["name"], "received"], p["relayed_received_bytes"])
        yield from (path, age, rx, tx, changes, relayed, latency)
        for service, connected in (
            ("management", st["management"]["connected"]),
            ("signal", st["signal"]["connected"]),
        ):
            gauge = GaugeMetricFamily(f"starling_agent_{service}_connected", f"1 when the {service} connection is up")
            gauge.add_metric([], 1 if connected else 0)
            yield gauge
        fw = GaugeMetricFamily("starling_agent_firewall_state", "1 for the firewall's current state", labels=["state"])
        state = st["firewall"]["state"]
        for s in FIREWALL_STATES:
            fw.add_metric([s], 1 if s == state else 0)
        yield fw
        mapped = GaugeMetricFamily("starling_agent_public_mapping_known", "1 when STUN told us our public mapping")
        mapped.add_metric([], 1 if st["nat"]["reflexive"]["address"] else 0)
        yield mapped
        serial = GaugeMetricFamily("starling_agent_map_serial", "Serial of the network map in use")
        serial.add_metric([], st["map_serial"])
        yield serial
        yield from _routing_metrics(st)


def _routing_metrics(st: AgentStatus) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    routing = st["routing"]
    active = GaugeMetricFamily(
        "starling_agent_route_active_router",
        "1 for the routing peer that carries each route now (route prefixes installed here)",
        labels=["route", "prefix", "router"],
    )
    up = GaugeMetricFamily(
        "starling_agent_route_router_up", "1 when a routing peer of a route is up", labels=["route", "router"]
    )
    for route in routing["routes"]:
        if route["installed"] and route["active_router"]:
            active.add_metric([route["name"], route["prefix"], route["active_router"]], 1)
        for router in route["routers"]:
            up.add_metric([route["name"], router["name"]], 1 if router["up"] else 0)
    failovers = CounterMetricFamily(
        "starling_agent_route_changes", "Times a route moved to another routing peer (failover or fail-back)"
    )
    failovers.add_metric([], routing["failovers"])
    forwarding = GaugeMetricFamily("starling_agent_forwarding", "1 when this peer forwards routed traffic")
    forwarding.add_metric([], 1 if routing["forwarding"] else 0)
    yield from (active, up, failovers, forwarding)


def serve_metrics(listen: str, status: Callable[[], AgentStatus]) -> CollectorRegistry:
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(status))
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return registry
