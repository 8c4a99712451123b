"""The agent's copy of its network map: applies full maps and deltas, reports what changed.

A delta applies only on top of the serial it names (`base_serial`); otherwise `MapGap` tells the
caller to reconnect for a full map. `apply()` returns a `MapChange` listing peers added, removed
and changed, so the daemon touches only those tunnels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


class MapGap(Exception):
    """A delta does not apply to the map we hold."""


@dataclass
class MapChange:
    added: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)  # id -> (old, new)
    firewall: bool = False
    full: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.firewall)


@dataclass
class NetworkMap:
    serial: int = -1
    me: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    sets: dict[str, list[str]] = field(default_factory=dict)
    dns: dict[str, Any] = field(default_factory=dict)
    signal: dict[str, Any] = field(default_factory=dict)
    relays: list[dict[str, Any]] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.serial >= 0

    def apply(self, msg: dict[str, Any]) -> MapChange:
        kind = msg.get("type")
        if kind == "map":
            return self._apply_full(msg)
        if kind != "delta":
            raise ValueError(f"unknown map message type {kind!r}")
        if msg.get("base_serial") != self.serial:
            raise MapGap(f"delta for serial {msg.get('base_serial')} but we hold {self.serial}")
        change = MapChange()
        for pid in msg.get("peers_remove", []):
            old = self.peers.pop(pid, None)
            if old is not None:
                change.removed[pid] = old
        for entry in msg.get("peers_upsert", []):
            old = self.peers.get(entry["id"])
            self.peers[entry["id"]] = entry
            if old is None:
                change.added[entry["id"]] = entry
            elif old != entry:
                change.changed[entry["id"]] = (old, entry)
        if "rules" in msg:
            self.rules = msg["rules"]
            change.firewall = True
        for name in msg.get("sets_remove", []):
            self.sets.pop(name, None)
            change.firewall = True
        if msg.get("sets_replace"):
            self.sets.update(msg["sets_replace"])
            change.firewall = True
        for key in ("dns", "signal"):
            if key in msg:
                setattr(self, key, msg[key])
        if "peer" in msg:
            self.me = msg["peer"]
        if "relays" in msg:
            self.relays = msg["relays"]
        self.serial = int(msg["serial"])
        return change

    def _apply_full(self, msg: dict[str, Any]) -> MapChange:
        new_peers = {p["id"]: p for p in msg["peers"]}
        change = MapChange(full=True, firewall=True)
        for pid, entry in new_peers.items():
            old = self.peers.get(pid)
            if old is None:
                change.added[pid] = entry
            elif old != entry:
                change.changed[pid] = (old, entry)
        for pid, old in self.peers.items():
            if pid not in new_peers:
                change.removed[pid] = old
        self.serial = int(msg["serial"])
        self.me = msg["peer"]
        self.peers = new_peers
        self.rules = msg["firewall"]["rules"]
        self.sets = msg["firewall"]["sets"]
        self.dns = msg.get("dns", {})
        self.signal = msg.get("signal", {})
        self.relays = msg.get("relays", [])
        return change

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy({"serial": self.serial, "me": self.me, "peers": self.peers})
