"""Read access to the mesh graph for API routes, the dashboard and services.

The graph is changed only by the coordinator's writes, under its lock. Everyone else reads through a
`MeshView`: each method takes the lock for the length of one read and returns values (nodes are
replaced, never changed in place, by writes), so no caller holds the lock or the graph itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from coordinator.engine.consistency import Violation, check_consistency
from coordinator.engine.graph import MeshGraph, PeerNode, SettingsNode


@dataclass(frozen=True, slots=True)
class Consistency:
    peers_checked: int
    violations: tuple[Violation, ...]


class MeshView:
    def __init__(self, graph: MeshGraph, lock: threading.RLock) -> None:
        self._graph = graph
        self._lock = lock

    @property
    def revision(self) -> int:
        return self._graph.revision

    @property
    def peer_count(self) -> int:
        return len(self._graph.peers)

    @property
    def settings(self) -> SettingsNode | None:
        return self._graph.settings

    def has_peer(self, peer_id: str) -> bool:
        return peer_id in self._graph.peers

    def peer(self, peer_id: str) -> PeerNode | None:
        return self._graph.peers.get(peer_id)

    def peer_by_key(self, public_key: str) -> PeerNode | None:
        with self._lock:
            return next((n for n in self._graph.peers.values() if n.public_key == public_key), None)

    def peers(self) -> list[PeerNode]:
        with self._lock:
            return list(self._graph.peers.values())

    def peer_names(self) -> dict[str, str]:
        with self._lock:
            return {pid: node.name for pid, node in self._graph.peers.items()}

    def used_mesh_ips(self) -> set[str]:
        with self._lock:
            return {n.mesh_ip for n in self._graph.peers.values()}

    def group_names(self) -> dict[str, str]:
        with self._lock:
            return dict(self._graph.group_names)

    def map_members(self, peer_id: str) -> set[str]:
        """Ids of the peers in `peer_id`'s map (those it may reach or be reached by)."""
        with self._lock:
            return self._graph.peers_in(self._graph.reach_of(peer_id))

    def reach_matrix(self, peer_ids: list[str]) -> list[list[bool]]:
        """[i][j]: peer_ids[j] is in peer_ids[i]'s map (unknown peers reach nobody)."""
        with self._lock:
            graph = self._graph
            slots = [graph.peers[p].slot if p in graph.peers else -1 for p in peer_ids]
            reach = [graph.reach_of(p) if p in graph.peers else 0 for p in peer_ids]
        return [[j >= 0 and bool(r >> j & 1) for j in slots] for r in reach]

    def consistency(self) -> Consistency:
        with self._lock:
            return Consistency(len(self._graph.peers), tuple(check_consistency(self._graph)))
