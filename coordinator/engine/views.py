"""Renders MeshGraph state as wire messages (JSON text): the full network map, and deltas.

A stream remembers the `SentState` it last delivered; a delta is the difference between that and the
graph now, so a burst of changes coalesces into one message by construction. Peer entries and rule
sets are encoded once and cached (by info revision and by set mask), because one peer's entry
appears in thousands of maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from coordinator.engine.bits import bit_list
from coordinator.engine.graph import MeshGraph, PeerNode, Rule

_dumps = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(slots=True)
class SentState:
    epoch: int = -1
    serial: int = -1
    revision: int = -1
    reach: int = 0
    rules: tuple[Rule, ...] = ()
    sets: dict[str, int] = field(default_factory=dict)
    settings_rev: int = -1
    relays_key: str = ""


class MapRenderer:
    def __init__(self, graph: MeshGraph) -> None:
        self.graph = graph
        self._entries: dict[int, tuple[int, str, dict[str, Any], str]] = {}
        self._set_json: dict[int, str] = {}
        self._set_rev = -1

    # ----- pieces ------------------------------------------------------------------------
    def entry(self, node: PeerNode) -> tuple[dict[str, Any], str]:
        """A peer's public entry as a dict and as encoded JSON (cached)."""
        domain = self.graph.settings.dns_domain if self.graph.settings else ""
        cached = self._entries.get(node.slot)
        if cached is not None and cached[0] == node.info_rev and cached[1] == domain:
            return cached[2], cached[3]
        entry = {
            "id": node.id,
            "name": node.name,
            "public_key": node.public_key,
            "mesh_ip": node.mesh_ip,
            "allowed_ips": [node.mesh_ip + "/32"],
            "dns_name": f"{node.name}.{domain}" if domain else node.name,
        }
        encoded = _dumps(entry)
        self._entries[node.slot] = (node.info_rev, domain, entry, encoded)
        return entry, encoded

    def entries_json(self, mask: int) -> str:
        by_slot = self.graph.by_slot
        entry = self.entry
        return "[" + ",".join(entry(n)[1] for s in bit_list(mask) if (n := by_slot[s]) is not None) + "]"

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

    @staticmethod
    def rule(rule: Rule) -> dict[str, Any]:
        return {
            "policy_id": rule.policy_id,
            "direction": rule.direction,
            "action": "accept",
            "protocol": rule.protocol,
            "ports": [list(p) for p in rule.ports],
            "peer_set": rule.peer_set,
        }

    def sets_json(self, sets: dict[str, int]) -> str:
        return "{" + ",".join(f"{_dumps(name)}:{self.set_json(mask)}" for name, mask in sets.items()) + "}"

    def dns(self) -> dict[str, Any]:
        settings = self.graph.settings
        return {"domain": settings.dns_domain if settings else ""}

    def signal(self) -> dict[str, Any]:
        settings = self.graph.settings
        return {"url": settings.signal_url if settings else ""}

    def self_entry(self, node: PeerNode) -> dict[str, Any]:
        settings = self.graph.settings
        entry = dict(self.entry(node)[0])
        entry["mesh_prefix"] = settings.mesh_prefix if settings else ""
        entry["approved"] = node.approved
        return entry

    # ----- messages ----------------------------------------------------------------------
    def full(self, peer_id: str, relays: list[dict[str, Any]], sent: SentState | None = None) -> str:
        """The complete map of one peer as JSON; updates `sent` to what this message delivers."""
        graph = self.graph
        node = graph.peers[peer_id]
        state = graph.maps[peer_id]
        head = {
            "type": "map",
            "serial": state.serial,
            "peer": self.self_entry(node),
            "dns": self.dns(),
            "signal": self.signal(),
            "relays": relays,
            "routes": [],
        }
        firewall = (
            '{"default_action":"drop","rules":'
            + _dumps([self.rule(r) for r in state.rules])
            + ',"sets":'
            + self.sets_json(state.sets)
            + "}"
        )
        text = _dumps(head)[:-1] + ',"peers":' + self.entries_json(state.reach) + ',"firewall":' + firewall + "}"
        if sent is not None:
            self._remember(sent, peer_id, relays)
        return text

    def delta(self, peer_id: str, relays: list[dict[str, Any]], sent: SentState) -> str | None:
        """What changed since `sent` as JSON (None when nothing did); a full map if history is gone."""
        graph = self.graph
        state = graph.maps[peer_id]
        relays_key = _dumps(relays)
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
        head: dict[str, Any] = {"type": "delta", "serial": state.serial, "base_serial": sent.serial}
        parts: list[str] = []
        added = state.reach & ~sent.reach
        removed = sent.reach & ~state.reach
        updated = state.reach & sent.reach & changed_info
        if added | updated:
            parts.append('"peers_upsert":' + self.entries_json(added | updated))
        if removed:
            head["peers_remove"] = [graph.slot_ids[s] for s in bit_list(removed)]
        if state.rules != sent.rules:
            head["rules"] = [self.rule(r) for r in state.rules]
        replaced = {
            name: mask for name, mask in state.sets.items() if sent.sets.get(name) != mask or mask & changed_info
        }
        if replaced:
            parts.append('"sets_replace":' + self.sets_json(replaced))
        dropped = [name for name in sent.sets if name not in state.sets]
        if dropped:
            head["sets_remove"] = dropped
        node = graph.peers[peer_id]
        if graph.settings_rev != sent.settings_rev:
            head["dns"] = self.dns()
            head["signal"] = self.signal()
            head["peer"] = self.self_entry(node)
        elif node.info_rev > sent.revision:
            head["peer"] = self.self_entry(node)
        if relays_key != sent.relays_key:
            head["relays"] = relays
        self._remember(sent, peer_id, relays)
        text = _dumps(head)
        return text[:-1] + "," + ",".join(parts) + "}" if parts else text

    def _remember(self, sent: SentState, peer_id: str, relays: list[dict[str, Any]]) -> None:
        state = self.graph.maps[peer_id]
        sent.epoch = self.graph.epoch
        sent.serial = state.serial
        sent.revision = self.graph.revision
        sent.reach = state.reach
        sent.rules = state.rules
        sent.sets = dict(state.sets)
        sent.settings_rev = self.graph.settings_rev
        sent.relays_key = _dumps(relays)
