"""The agent's copy of its network map: applies typed full maps and deltas, reports what changed.

Messages are parsed by the map contract (`starling_proto.netmap.parse_map_message`) before they get
here. A delta applies only on top of the serial it names (`base_serial`); otherwise `MapGap` tells the
caller to reconnect for a full map. `apply()` returns a `MapChange` listing peers added, removed and
changed, so the daemon touches only those tunnels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starling_proto.firewall import FirewallRule, FirewallSection
from starling_proto.netmap import (
    MAP_VERSION,
    DnsConfig,
    FullMap,
    MapDelta,
    MapMessage,
    PeerEntry,
    RelayCredential,
    SelfEntry,
    SignalConfig,
)
from starling_proto.routes import ForwardEntry, RouteEntry


class MapGap(Exception):
    """A delta does not apply to the map we hold."""


@dataclass
class MapChange:
    added: dict[str, PeerEntry] = field(default_factory=dict)
    removed: dict[str, PeerEntry] = field(default_factory=dict)
    changed: dict[str, tuple[PeerEntry, PeerEntry]] = field(default_factory=dict)  # id -> (old, new)
    firewall: bool = False
    routes: bool = False  # the routes this peer may use changed
    forward: bool = False  # the routes this peer forwards changed (its firewall's masquerade rules)
    full: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.firewall or self.routes or self.forward)


@dataclass
class NetworkMap:
    serial: int = -1
    me: SelfEntry | None = None
    peers: dict[str, PeerEntry] = field(default_factory=dict)
    rules: tuple[FirewallRule, ...] = ()
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dns: DnsConfig = field(default_factory=DnsConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    relays: tuple[RelayCredential, ...] = ()
    routes: tuple[RouteEntry, ...] = ()
    forward: tuple[ForwardEntry, ...] = ()
    version: int = MAP_VERSION

    @property
    def loaded(self) -> bool:
        return self.serial >= 0 and self.me is not None

    def firewall(self) -> FirewallSection:
        return FirewallSection(self.rules, dict(self.sets))

    def apply(self, msg: MapMessage) -> MapChange:
        if isinstance(msg, FullMap):
            return self._apply_full(msg)
        return self._apply_delta(msg)

    def _apply_delta(self, msg: MapDelta) -> MapChange:
        if msg.base_serial != self.serial:
            raise MapGap(f"delta for serial {msg.base_serial} but we hold {self.serial}")
        change = MapChange()
        for pid in msg.peers_remove:
            old = self.peers.pop(pid, None)
            if old is not None:
                change.removed[pid] = old
        for entry in msg.peers_upsert:
            old = self.peers.get(entry.id)
            self.peers[entry.id] = entry
            if old is None:
                change.added[entry.id] = entry
            elif old != entry:
                change.changed[entry.id] = (old, entry)
        if msg.rules is not None:
            self.rules = msg.rules
        for name in msg.sets_remove:
            self.sets.pop(name, None)
        self.sets.update(msg.sets_replace)
        change.firewall = msg.firewall_changed
        if msg.dns is not None:
            self.dns = msg.dns
        if msg.signal is not None:
            self.signal = msg.signal
        if msg.peer is not None:
            self.me = msg.peer
        if msg.relays is not None:
            self.relays = msg.relays
        if msg.routes is not None and msg.routes != self.routes:
            self.routes, change.routes = msg.routes, True
        if msg.forward is not None and msg.forward != self.forward:
            self.forward, change.forward = msg.forward, True
        self.serial, self.version = msg.serial, msg.version
        return change

    def _apply_full(self, msg: FullMap) -> MapChange:
        new_peers = {p.id: p for p in msg.peers}
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
        self.serial, self.version = msg.serial, msg.version
        self.me = msg.peer
        self.peers = new_peers
        self.rules = msg.firewall.rules
        self.sets = dict(msg.firewall.sets)
        self.dns, self.signal, self.relays = msg.dns, msg.signal, msg.relays
        change.routes, change.forward = self.routes != msg.routes, self.forward != msg.forward
        self.routes, self.forward = msg.routes, msg.forward
        return change

    def to_full(self) -> FullMap:
        """What we hold as one full map (the on-disk cache a restart begins with)."""
        if self.me is None:
            raise ValueError("no map yet")
        return FullMap(
            serial=self.serial,
            peer=self.me,
            peers=tuple(self.peers.values()),
            firewall=self.firewall(),
            dns=self.dns,
            signal=self.signal,
            relays=self.relays,
            routes=self.routes,
            forward=self.forward,
            version=self.version,
        )

    def set_my_key(self, public_key: str) -> None:
        """The coordinator now holds `public_key` for us (a rotation it confirmed, or one rolled back)."""
        if self.me is not None:
            self.me = self.me.with_key(public_key)
