"""What one write collects (`Tx`: audit events, graph operations), and the store rows as graph nodes.

Services build a `Tx` inside `ServiceContext.write`; the graph operations run after commit, under the
graph lock, on the graph the coordinator owns (an operation receives it: services never hold it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from coordinator.engine import MeshGraph, PeerNode, PolicyNode, RouteNode, SettingsNode
from coordinator.store.models import AuditEvent, MeshSettings, Peer, Policy, Route

GraphOp = Callable[[MeshGraph, int], set[str]]  # (graph, new revision) -> peers whose maps may change


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Tx:
    """What one write collects: audit events and graph operations to apply after commit."""

    session: Session
    actor: str
    graph_ops: list[GraphOp] = field(default_factory=list)
    touch_all: bool = False
    audits: list[AuditEvent] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    def audit(
        self,
        action: str,
        target_type: str,
        target_id: str,
        target_name: str = "",
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        self.audits.append(
            AuditEvent(
                time=utcnow(),
                actor=self.actor,
                action=action,
                target_type=target_type,
                target_id=target_id,
                target_name=target_name,
                before=before,
                after=after,
            )
        )

    def graph(self, op: GraphOp) -> None:
        """Change the graph after commit: `op(graph, revision)` returns the peers it affects."""
        self.graph_ops.append(op)


def upsert_peer(node: PeerNode) -> GraphOp:
    """The graph operation that puts `node` in the graph (bound now, applied after commit)."""
    return lambda g, rev: g.upsert_peer(node, rev)


def peer_node(peer: Peer) -> PeerNode:
    return PeerNode(
        id=peer.id,
        name=peer.name,
        public_key=peer.public_key,
        mesh_ip=peer.mesh_ip,
        approved=peer.approved,
        groups=frozenset(g.id for g in peer.groups),
        exit_node=peer.exit_node_id or "",
    )


def policy_node(pol: Policy) -> PolicyNode:
    ends = pol.endpoints
    return PolicyNode(
        id=pol.id,
        name=pol.name,
        enabled=pol.enabled,
        protocol=pol.protocol,
        ports=tuple((int(a), int(b)) for a, b in pol.ports),
        bidirectional=pol.bidirectional,
        src_groups=frozenset(ends["sources"]["groups"]),
        src_peers=frozenset(ends["sources"]["peers"]),
        dst_groups=frozenset(ends["destinations"]["groups"]),
        dst_peers=frozenset(ends["destinations"]["peers"]),
        dst_routes=frozenset(ends["destinations"].get("routes", [])),
    )


def route_node(route: Route) -> RouteNode:
    peers: dict[str, int] = {}
    groups: dict[str, int] = {}
    for r in route.routers:
        if r.peer_id is not None:
            peers[r.peer_id] = r.metric
        elif r.group_id is not None:
            groups[r.group_id] = r.metric
    return RouteNode(route.id, route.name, route.prefix, route.masquerade, route.enabled, peers, groups)


def settings_node(row: MeshSettings) -> SettingsNode:
    return SettingsNode(
        mesh_prefix=row.mesh_prefix,
        dns_domain=row.dns_domain,
        turn_servers=tuple(row.turn_servers),
        signal_url=row.signal_url,
        credential_ttl=row.credential_ttl,
    )
