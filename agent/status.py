"""What `starling status`, `starling explain` and the metrics endpoint show: the typed documents the
daemon produces (sent as JSON over the control socket), and one upstream service's connection state
(`ServiceStatus`: management, signal)."""

from __future__ import annotations

import time
from typing import TypedDict


class ServiceState(TypedDict):
    connected: bool
    last_error: str | None
    since: float


class ManagementState(ServiceState):
    url: str


class KeyState(TypedDict):
    source: str
    version: int | None


class CandidateWire(TypedDict):
    address: str
    kind: str


class ReflexiveStatus(TypedDict):
    address: str | None  # the WireGuard port's public mapping (STUN)
    server: str | None
    mapped_to_wireguard_port: bool
    learned_at: float | None
    error: str | None


class NatStatus(TypedDict):
    reflexive: ReflexiveStatus
    stun_servers: list[str]


class ProxyStatus(TypedDict):
    listen: str
    pair: str
    transport: str  # how our side reaches the TURN relay: udp, tcp or tls
    to_peer_bytes: int
    from_peer_bytes: int
    to_peer_packets: int
    from_peer_packets: int
    dropped: int


class DriftEvent(TypedDict):
    time: float
    description: str


class FirewallStatus(TypedDict):
    mode: str
    state: str
    message: str
    interface: str
    installed: str | None
    last_error: str | None
    rules: int
    sets: int
    elements: int
    route_rules: int  # of `rules`: "route" (client) and "forward" (routing peer) rules
    masquerade: list[str]  # forwarded prefixes whose traffic is masqueraded
    last_apply_ms: float | None
    drift_repairs: int
    last_drift: DriftEvent | None
    drift_detection: str


class LatencyStatus(TypedDict):
    """How peer latency is measured (agent.latency) and whether that works here."""

    method: str
    active: bool
    error: str | None
    samples: int  # handshake round trips attributed to a peer since start
    unattributed: int  # ... whose remote address matched no peer's endpoint


class PeerStatus(TypedDict):
    peer_id: str
    name: str
    public_key: str
    mesh_ip: str
    path: str
    endpoint: str | None
    proxied: bool
    relay_server: str | None
    relay_transport: str | None  # relayed: how we reach the relay (udp, tcp, tls)
    local_candidate: str | None
    remote_candidate: str | None
    candidates: list[CandidateWire]
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    latency_ms: float | None  # the last WireGuard handshake round trip (agent.latency)
    latency_at: float | None  # when it was measured (unix time)
    since: float
    path_changes: int
    last_error: str | None
    proxy: ProxyStatus | None
    relayed_sent_bytes: int
    relayed_received_bytes: int


class RouterStatus(TypedDict):
    name: str
    metric: int
    up: bool


class RouteStatus(TypedDict):
    id: str
    name: str
    prefix: str
    active_router: str | None
    reason: str
    installed: bool
    routers: list[RouterStatus]


class RoutingStatus(TypedDict):
    routes: list[RouteStatus]
    exit_node: str | None
    exit_reason: str
    forwarding: bool
    failovers: int
    last_error: str | None


class RoutePolicy(TypedDict):
    policy_id: str
    protocol: str
    ports: list[list[int]]


class RouteExplanation(TypedDict):
    """`starling explain <address>` for an address outside the mesh: which route, router and policies."""

    address: str
    route: RouteStatus | None
    policies: list[RoutePolicy]
    verdict: str


class AgentStatus(TypedDict):
    version: str
    name: str
    peer_id: str
    mesh_ip: str
    public_key: str
    key: KeyState
    interface: str
    backend: str
    listen_port: int
    management: ManagementState
    signal: ServiceState
    map_serial: int
    firewall: FirewallStatus
    nat: NatStatus
    routing: RoutingStatus
    latency: LatencyStatus
    uptime: float
    peers: list[PeerStatus]


class Explanation(TypedDict):
    peer: PeerStatus
    our_candidates: list[CandidateWire]
    reflexive: ReflexiveStatus
    controlling: bool
    history: list[str]
    turn_renewals: int


class PathReport(TypedDict):
    """One peer's path as the agent reports it to the coordinator (POST /api/v1/peer/state)."""

    peer_id: str
    path: str
    endpoint: str | None
    latency_ms: float | None
    rx_bytes: int
    tx_bytes: int
    last_handshake: str | None


class ServiceStatus:
    """Connected or not, since when, and the last error."""

    def __init__(self) -> None:
        self.connected = False
        self.last_error: str | None = None
        self.since = time.time()

    def set(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            self.since = time.time()
        self.connected, self.last_error = connected, error

    def as_dict(self) -> ServiceState:
        return {"connected": self.connected, "last_error": self.last_error, "since": self.since}
