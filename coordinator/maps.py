"""MapService: each peer's network map as the stream hub and the read API want it, rendered under the
graph lock with the TURN credentials of the moment.

It is the hub's `MapSource` (coordinator/hub.py): the hub asks for a full map or the delta since what a
stream delivered, and when TURN credentials must be renewed; it never sees the graph or its lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from coordinator.engine.graph import MeshGraph
from coordinator.engine.views import MapRenderer, SentState
from coordinator.turn import credential_window, relay_credentials
from starling_proto.netmap import RelayCredential


@dataclass(frozen=True, slots=True)
class Rendered:
    kind: str  # "map" or "delta"
    text: str
    serial: int


class MapService:
    def __init__(self, graph: MeshGraph, lock: threading.RLock, turn_secret: str) -> None:
        self._graph = graph
        self._lock = lock
        self._renderer = MapRenderer(graph)
        self.turn_secret = turn_secret

    def reset(self) -> None:
        """The graph was reloaded (slots renumbered): forget every cached entry. Call under the lock."""
        self._renderer = MapRenderer(self._graph)

    def relays_for(self, peer_name: str) -> tuple[RelayCredential, ...]:
        settings = self._graph.settings
        if settings is None:
            return ()
        return relay_credentials(self.turn_secret, peer_name, settings.turn_servers, settings.credential_ttl)

    # ----- MapSource ---------------------------------------------------------------------------
    def is_member(self, peer_id: str) -> bool:
        return peer_id in self._graph.peers

    def render(self, peer_id: str, sent: SentState, *, full: bool) -> Rendered | None:
        """A full map (first message) or what changed since `sent`; None: nothing to send, or the peer is gone."""
        with self._lock:
            node = self._graph.peers.get(peer_id)
            if node is None:
                return None
            relays = self.relays_for(node.name)
            if full:
                text = self._renderer.full(peer_id, relays, sent)
                return Rendered("map", text, self._graph.maps[peer_id].serial)
            delta = self._renderer.delta(peer_id, relays, sent)
            if delta is None:
                return None
            return Rendered("map" if delta.startswith('{"type":"map"') else "delta", delta, sent.serial)

    def renewal_in(self) -> float | None:
        """Seconds until TURN credentials in delivered maps must be replaced (None: no TURN servers)."""
        settings = self._graph.settings
        if settings is None or not settings.turn_servers:
            return None
        _, renew_at = credential_window(settings.credential_ttl)
        return renew_at - time.time()

    # ----- reads -------------------------------------------------------------------------------
    def full_json(self, peer_id: str) -> str | None:
        """The peer's complete map as JSON text (None if there is no such peer)."""
        with self._lock:
            node = self._graph.peers.get(peer_id)
            if node is None:
                return None
            return self._renderer.full(peer_id, self.relays_for(node.name))
