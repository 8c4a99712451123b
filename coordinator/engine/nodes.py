"""The nodes of the mesh graph (coordinator.engine.graph): peers, policies, routes and settings as the
engine holds them in memory, and one peer's computed map state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from starling_proto.firewall import FirewallRule as Rule  # the map contract's rule: no conversion on render
from starling_proto.routes import ForwardEntry, RouteEntry

__all__ = [
    "ComputeStats",
    "Computed",
    "Direction",
    "Forwards",
    "PeerMapState",
    "PeerNode",
    "PolicyNode",
    "RouteNode",
    "Routes",
    "Rule",
    "SettingsNode",
]

Direction = Literal["in", "out"]


@dataclass(slots=True)
class PeerNode:
    id: str
    name: str
    public_key: str
    mesh_ip: str
    approved: bool
    groups: frozenset[str]
    slot: int = -1
    info_rev: int = 0
    exit_node: str = ""  # the exit node chosen for this peer (a peer id; "": none): only in its own map
    self_rev: int = 0  # revision of the last change to what only its own map shows (exit_node)


@dataclass(slots=True)
class PolicyNode:
    id: str
    name: str
    enabled: bool
    protocol: str
    ports: tuple[tuple[int, int], ...]
    bidirectional: bool
    src_groups: frozenset[str]
    src_peers: frozenset[str]
    dst_groups: frozenset[str]
    dst_peers: frozenset[str]
    dst_routes: frozenset[str] = frozenset()

    def groups(self) -> frozenset[str]:
        return self.src_groups | self.dst_groups

    def peers(self) -> frozenset[str]:
        return self.src_peers | self.dst_peers


@dataclass(slots=True)
class RouteNode:
    """A route: its prefix and routing peers, named directly (peer id -> metric) or by group (group id ->
    metric: every member routes it)."""

    id: str
    name: str
    prefix: str
    masquerade: bool
    enabled: bool
    peers: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)


def _rule_key(rule: Rule) -> tuple[str, str, str, str, tuple[tuple[int, int], ...], str]:
    return (rule.policy_id, rule.direction, rule.peer_set, rule.protocol, rule.ports, rule.route_id)


Routes = tuple[RouteEntry, ...]
Forwards = tuple[ForwardEntry, ...]
Computed = tuple[int, tuple[Rule, ...], dict[str, int], Routes, Forwards]


@dataclass(slots=True)
class SettingsNode:
    mesh_prefix: str
    dns_domain: str
    turn_servers: tuple[str, ...]
    credential_ttl: int
    signal_url: str = ""


@dataclass(slots=True)
class PeerMapState:
    serial: int
    reach: int
    rules: tuple[Rule, ...]
    sets: dict[str, int] = field(default_factory=dict)
    routes: Routes = ()
    forward: Forwards = ()


@dataclass(slots=True)
class ComputeStats:
    maps: int = 0
    changed: int = 0
    seconds: float = 0.0
