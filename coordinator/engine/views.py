"""Renders MeshGraph state as wire messages (JSON text) of the map contract (starling_proto.netmap).

A stream remembers the `SentState` it last delivered; a delta is the difference between that and the
graph now, so a burst of changes coalesces into one message by construction. Peer entries and rule
sets are encoded once and cached (by info revision and by set mask), because one peer's entry
appears in thousands of maps; the contract's `full_json`/`delta_json` put the pieces together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.engine.bits import bit_list
from coordinator.engine.graph import MeshGraph
from coordinator.engine.nodes import Forwards, PeerNode, Routes, Rule
from starling_proto.netmap import (
    DnsConfig,
    MapDelta,
    PeerEntry,
    RelayCredential,
    SelfEntry,
    SignalConfig,
    delta_json,
    full_json,
    relays_json,
)
from starling_proto.wire import dumps as _dumps

Relays = tuple[RelayCredential, ...]


@dataclass(slots=True)
class SentState:
    epoch: int = -1
    serial: int = -1
    revision: int = -1
    reach: int = 0
    rules: tuple[Rule, ...] = ()
    sets: dict[str, int] = field(default_factory=dict)
    routes: Routes = ()
    forward: Forwards = ()
    settings_rev: int = -1
    relays_key: str = ""


class MapRenderer:
    def __init__(self, graph: MeshGraph) -> None:
        self.graph = graph
        self._entries: dict[int, tuple[int, str, PeerEntry, str]] = {}
        self._set_json: dict[int, str] = {}
        self._set_rev = -1

    # ----- pieces ------------------------------------------------------------------------
    def entry(self, node: PeerNode) -> tuple[PeerEntry, str]:
        """A peer's public entry, typed and encoded (cached)."""
        domain = self.graph.settings.dns_domain if self.graph.settings else ""
        cached = self._entries.get(node.slot)
        if cached is not None and cached[0] == node.info_rev and cached[1] == domain:
            return cached[2], cached[3]
        entry = PeerEntry(
            node.id,
            node.name,
            node.public_key,
            node.mesh_ip,
            (node.mesh_ip + "/32",),
            f"{node.name}.{domain}" if domain else node.name,
        )
        encoded = _dumps(entry.to_wire())
        self._entries[node.slot] = (node.info_rev, domain, entry, encoded)
        return entry, encoded

    def entries_json(self, mask: int) -> str:
        """The encoded entries of the peers in `mask` (the hot loop of rendering: cache hits inline)."""
        by_slot, cache, entry = self.graph.by_slot, self._entries, self.entry
        domain = self.graph.settings.dns_domain if self.graph.settings else ""
        parts = []
        for s in bit_list(mask):
            node = by_slot[s]
            if node is None:
                continue
            cached = cache.get(s)
            if cached is not None and cached[0] == node.info_rev and cached[1] == domain:
                parts.append(cached[3])
            else:
                parts.append(entry(node)[1])
        return "[" + ",".join(parts) + "]"

    def set_json(self, mask: int) -> str:
        """The mesh IPs of a peer set, encoded; cached per mask until any peer's info changes."""
        if self._set_rev != len(self.graph.info_log) or len(self._set_json) > 50_000:
            self._set_json.clear()
            self._set_rev = len(self.graph.info_log)
        cached = self._set_json.get(mask)
        if cached is None:
            by_slot = self.graph.by_slot
            cached = _dumps([n.mesh_ip for s in bit_list(mask) if (n := by_slot[s]) is not None])
            self._set_json[mask] = cached
        return cached

    def sets_json(self, sets: dict[str, int]) -> str:
        return "{" + ",".join(f"{_dumps(name)}:{self.set_json(mask)}" for name, mask in sets.items()) + "}"

    def dns(self) -> DnsConfig:
        settings = self.graph.settings
        return DnsConfig(settings.dns_domain if settings else "")

    def signal(self) -> SignalConfig:
        settings = self.graph.settings
        return SignalConfig(settings.signal_url if settings else "")

    def self_entry(self, node: PeerNode) -> SelfEntry:
        settings = self.graph.settings
        e = self.entry(node)[0]
        prefix = settings.mesh_prefix if settings else ""
        return SelfEntry(
            e.id, e.name, e.public_key, e.mesh_ip, e.allowed_ips, e.dns_name, prefix, node.approved, node.exit_node
        )

    # ----- messages ----------------------------------------------------------------------
    def full(self, peer_id: str, relays: Relays, sent: SentState | None = None) -> str:
        """The complete map of one peer as JSON; updates `sent` to what this message delivers."""
        graph = self.graph
        node = graph.peers[peer_id]
        state = graph.maps[peer_id]
        text = full_json(
            serial=state.serial,
            peer=self.self_entry(node),
            dns=self.dns(),
            signal=self.signal(),
            relays=relays,
            routes=state.routes,
            forward=state.forward,
            peers_json=self.entries_json(state.reach),
            rules=state.rules,
            sets_json=self.sets_json(state.sets),
        )
        if sent is not None:
            self._remember(sent, peer_id, relays)
        return text

    def delta(self, peer_id: str, relays: Relays, sent: SentState) -> str | None:
        """What changed since `sent` as JSON (None when nothing did); a full map if history is gone."""
        graph = self.graph
        state = graph.maps[peer_id]
        relays_key = relays_json(relays)
        if (
            sent.epoch == graph.epoch
            and state.serial == sent.serial
            and graph.settings_rev == sent.settings_rev
            and relays_key == sent.relays_key
        ):
            return None
        changed_info = graph.info_changed_since(sent.revision)
        if changed_info is None or sent.epoch != graph.epoch:
            return self.full(peer_id, relays, sent)
        added = state.reach & ~sent.reach
        removed = sent.reach & ~state.reach
        updated = state.reach & sent.reach & changed_info
        replaced = {
            name: mask for name, mask in state.sets.items() if sent.sets.get(name) != mask or mask & changed_info
        }
        node = graph.peers[peer_id]
        settings_changed = graph.settings_rev != sent.settings_rev
        self_changed = node.info_rev > sent.revision or node.self_rev > sent.revision
        head = MapDelta(
            serial=state.serial,
            base_serial=sent.serial,
            peers_remove=tuple(graph.slot_ids[s] for s in bit_list(removed)) if removed else (),
            rules=state.rules if state.rules != sent.rules else None,
            sets_remove=tuple(name for name in sent.sets if name not in state.sets),
            peer=self.self_entry(node) if settings_changed or self_changed else None,
            dns=self.dns() if settings_changed else None,
            signal=self.signal() if settings_changed else None,
            relays=relays if relays_key != sent.relays_key else None,
            routes=state.routes if state.routes != sent.routes else None,
            forward=state.forward if state.forward != sent.forward else None,
        )
        upserts = self.entries_json(added | updated) if added | updated else ""
        self._remember(sent, peer_id, relays)
        return delta_json(
            head, peers_upsert_json=upserts, sets_replace_json=self.sets_json(replaced) if replaced else ""
        )

    def _remember(self, sent: SentState, peer_id: str, relays: Relays) -> None:
        state = self.graph.maps[peer_id]
        sent.epoch = self.graph.epoch
        sent.serial = state.serial
        sent.revision = self.graph.revision
        sent.reach = state.reach
        sent.rules = state.rules
        sent.sets = dict(state.sets)
        sent.routes = state.routes
        sent.forward = state.forward
        sent.settings_rev = self.graph.settings_rev
        sent.relays_key = relays_json(relays)
