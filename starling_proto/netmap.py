"""The network map: what the coordinator tells one peer about itself, its reachable peers and its rules.

Two messages travel on the map stream (docs/api.md, "Network map"), both JSON objects:

* `FullMap` (`"type": "map"`): the whole map at `serial`.
* `MapDelta` (`"type": "delta"`): what changed from `base_serial` to `serial`; absent keys did not change.

Both carry `"version"` (`MAP_VERSION`). An agent refuses a version it does not know
(`UnsupportedMapVersion`) and says so in its status, rather than guessing at fields whose meaning may
have changed; maps written before the field existed are version 1. Within a version, new optional keys
may appear: outside the firewall section they are ignored, inside it they are refused (an unknown rule
field could change what the rule allows).

The coordinator renders through `full_json()`/`delta_json()` with pre-encoded peer entries and sets (one
entry appears in thousands of maps: it is encoded once); `FullMap.to_json()` builds the same document
from typed parts, and tests hold the two equal on the golden fixtures in tests/fixtures/golden/.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from starling_proto.firewall import FirewallRule, FirewallSection, parse_rules, parse_sets, rules_json
from starling_proto.routes import ForwardEntry, RouteEntry, forward_from_wire, routes_from_wire
from starling_proto.wire import (
    WireFormatError,
    array,
    dumps,
    flag,
    integer,
    mesh_ip,
    obj,
    optional_text,
    strings,
    text,
)

MAP_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


class UnsupportedMapVersion(WireFormatError):
    """The map is of a version this agent does not know: it keeps its map and asks for an upgrade."""


def _public_key(doc: Mapping[str, object], where: str) -> str:
    value = doc.get("public_key")
    ok = isinstance(value, str) and len(value) == 44
    if ok:
        try:
            ok = len(base64.b64decode(str(value), validate=True)) == 32
        except (binascii.Error, ValueError):
            ok = False
    if not ok:
        raise WireFormatError(f"{where}.public_key: must be a base64 32-byte key", field=f"{where}.public_key")
    return str(value)


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """A peer as its neighbours see it."""

    id: str
    name: str
    public_key: str
    mesh_ip: str
    allowed_ips: tuple[str, ...]
    dns_name: str = ""

    def to_wire(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "public_key": self.public_key,
            "mesh_ip": self.mesh_ip,
            "allowed_ips": list(self.allowed_ips),
            "dns_name": self.dns_name,
        }

    @staticmethod
    def fields_from_wire(raw: object, where: str) -> tuple[str, str, str, str, tuple[str, ...], str]:
        doc = obj(raw, where)
        allowed = array(doc.get("allowed_ips"), f"{where}.allowed_ips", 4096)
        for i, net in enumerate(allowed):
            if not isinstance(net, str) or not net or len(net) > 43:
                at = f"{where}.allowed_ips[{i}]"
                raise WireFormatError(f"{at}: {net!r} is not an address prefix", field=at)
        return (
            text(doc, "id", where, empty=False, limit=64),
            text(doc, "name", where, limit=253),
            _public_key(doc, where),
            mesh_ip(doc, "mesh_ip", where),
            tuple(allowed),  # type: ignore[arg-type]  # strings: checked above
            optional_text(doc, "dns_name", where),
        )

    @classmethod
    def from_wire(cls, raw: object, where: str = "peer") -> PeerEntry:
        return cls(*cls.fields_from_wire(raw, where))


@dataclass(frozen=True, slots=True)
class SelfEntry(PeerEntry):
    """This peer's own entry: also the mesh prefix (for the interface address), its approval, and the exit
    node the administrator chose for it (a peer id; "": none; the agent's own setting takes precedence)."""

    mesh_prefix: str = ""
    approved: bool = True
    exit_node: str = ""

    def to_wire(self) -> dict[str, object]:
        doc = {**PeerEntry.to_wire(self), "mesh_prefix": self.mesh_prefix, "approved": self.approved}
        if self.exit_node:
            doc["exit_node"] = self.exit_node
        return doc

    @classmethod
    def from_wire(cls, raw: object, where: str = "peer") -> SelfEntry:
        doc = obj(raw, where)
        return cls(
            *PeerEntry.fields_from_wire(doc, where),
            mesh_prefix=optional_text(doc, "mesh_prefix", where),
            approved=flag(doc, "approved", where, True),
            exit_node=optional_text(doc, "exit_node", where),
        )

    def with_key(self, public_key: str) -> SelfEntry:
        """The same entry with another public key (a rotation the coordinator confirmed)."""
        return dataclasses.replace(self, public_key=public_key)


@dataclass(frozen=True, slots=True)
class RelayCredential:
    """STUN/TURN servers (`stun:`/`turn:` URLs) and a TURN credential valid until `expires_at` (unix time)."""

    urls: tuple[str, ...]
    username: str = ""
    password: str = ""
    expires_at: int = 0

    def to_wire(self) -> dict[str, object]:
        return {
            "urls": list(self.urls),
            "username": self.username,
            "password": self.password,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_wire(cls, raw: object, where: str = "relays[0]") -> RelayCredential:
        doc = obj(raw, where)
        return cls(
            strings(doc.get("urls", []), f"{where}.urls"),
            optional_text(doc, "username", where),
            optional_text(doc, "password", where),
            integer(doc, "expires_at", where) if "expires_at" in doc else 0,
        )


@dataclass(frozen=True, slots=True)
class DnsConfig:
    domain: str = ""

    def to_wire(self) -> dict[str, object]:
        return {"domain": self.domain}

    @classmethod
    def from_wire(cls, raw: object, where: str = "dns") -> DnsConfig:
        return cls(optional_text(obj(raw, where), "domain", where))


@dataclass(frozen=True, slots=True)
class SignalConfig:
    url: str = ""

    def to_wire(self) -> dict[str, object]:
        return {"url": self.url}

    @classmethod
    def from_wire(cls, raw: object, where: str = "signal") -> SignalConfig:
        return cls(optional_text(obj(raw, where), "url", where))


def relays_from_wire(raw: object, where: str = "relays") -> tuple[RelayCredential, ...]:
    return tuple(RelayCredential.from_wire(r, f"{where}[{i}]") for i, r in enumerate(array(raw, where, 64)))


def relays_json(relays: Iterable[RelayCredential]) -> str:
    return dumps([r.to_wire() for r in relays])


def peers_from_wire(raw: object, where: str) -> tuple[PeerEntry, ...]:
    return tuple(PeerEntry.from_wire(p, f"{where}[{i}]") for i, p in enumerate(array(raw, where)))


def _version(doc: Mapping[str, object]) -> int:
    version = doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise WireFormatError("version: must be an integer", field="version")
    if version not in SUPPORTED_VERSIONS:
        known = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
        raise UnsupportedMapVersion(
            f"map version {version} is not supported by this agent (it knows {known}): upgrade the agent",
            field="version",
        )
    return version


@dataclass(frozen=True, slots=True)
class FullMap:
    serial: int
    peer: SelfEntry
    peers: tuple[PeerEntry, ...] = ()
    firewall: FirewallSection = field(default_factory=FirewallSection)
    dns: DnsConfig = field(default_factory=DnsConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    relays: tuple[RelayCredential, ...] = ()
    routes: tuple[RouteEntry, ...] = ()  # routes this peer may use
    forward: tuple[ForwardEntry, ...] = ()  # routes this peer is a routing peer of
    version: int = MAP_VERSION

    def to_wire(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "type": "map",
            "version": self.version,
            "serial": self.serial,
            "peer": self.peer.to_wire(),
            "dns": self.dns.to_wire(),
            "signal": self.signal.to_wire(),
            "relays": [r.to_wire() for r in self.relays],
            "routes": [r.to_wire() for r in self.routes],
        }
        if self.forward:
            doc["forward"] = [f.to_wire() for f in self.forward]
        doc["peers"] = [p.to_wire() for p in self.peers]
        doc["firewall"] = self.firewall.to_wire()
        return doc

    def to_json(self) -> str:
        """The same text the coordinator's renderer sends for this map."""
        return full_json(
            serial=self.serial,
            peer=self.peer,
            dns=self.dns,
            signal=self.signal,
            relays=self.relays,
            routes=self.routes,
            forward=self.forward,
            peers_json=dumps([p.to_wire() for p in self.peers]),
            rules=self.firewall.rules,
            sets_json=dumps({n: list(m) for n, m in self.firewall.sets.items()}),
        )

    @classmethod
    def from_wire(cls, raw: object) -> FullMap:
        doc = obj(raw, "map")
        if doc.get("type") != "map":
            raise WireFormatError(f"type: {doc.get('type')!r} is not a full map", field="type")
        version = _version(doc)
        return cls(
            serial=integer(doc, "serial", "map"),
            peer=SelfEntry.from_wire(doc.get("peer")),
            peers=peers_from_wire(doc.get("peers"), "peers"),
            firewall=FirewallSection.from_wire(doc.get("firewall")),
            dns=DnsConfig.from_wire(doc.get("dns", {})),
            signal=SignalConfig.from_wire(doc.get("signal", {})),
            relays=relays_from_wire(doc.get("relays", [])),
            routes=routes_from_wire(doc.get("routes", [])),
            forward=forward_from_wire(doc.get("forward", [])),
            version=version,
        )


@dataclass(frozen=True, slots=True)
class MapDelta:
    """Changes from `base_serial` to `serial`. None / empty: that part did not change."""

    serial: int
    base_serial: int
    peers_upsert: tuple[PeerEntry, ...] = ()
    peers_remove: tuple[str, ...] = ()
    rules: tuple[FirewallRule, ...] | None = None
    sets_replace: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sets_remove: tuple[str, ...] = ()
    peer: SelfEntry | None = None
    dns: DnsConfig | None = None
    signal: SignalConfig | None = None
    relays: tuple[RelayCredential, ...] | None = None
    routes: tuple[RouteEntry, ...] | None = None  # the whole list, when it changed
    forward: tuple[ForwardEntry, ...] | None = None
    version: int = MAP_VERSION

    @property
    def firewall_changed(self) -> bool:
        return self.rules is not None or bool(self.sets_replace) or bool(self.sets_remove)

    def to_wire(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "type": "delta",
            "version": self.version,
            "serial": self.serial,
            "base_serial": self.base_serial,
        }
        if self.peers_upsert:
            doc["peers_upsert"] = [p.to_wire() for p in self.peers_upsert]
        if self.peers_remove:
            doc["peers_remove"] = list(self.peers_remove)
        if self.rules is not None:
            doc["rules"] = [r.to_wire() for r in self.rules]
        if self.sets_replace:
            doc["sets_replace"] = {n: list(m) for n, m in self.sets_replace.items()}
        if self.sets_remove:
            doc["sets_remove"] = list(self.sets_remove)
        for key in ("peer", "dns", "signal"):
            part = getattr(self, key)
            if part is not None:
                doc[key] = part.to_wire()
        if self.relays is not None:
            doc["relays"] = [r.to_wire() for r in self.relays]
        if self.routes is not None:
            doc["routes"] = [r.to_wire() for r in self.routes]
        if self.forward is not None:
            doc["forward"] = [f.to_wire() for f in self.forward]
        return doc

    @classmethod
    def from_wire(cls, raw: object) -> MapDelta:
        doc = obj(raw, "delta")
        if doc.get("type") != "delta":
            raise WireFormatError(f"type: {doc.get('type')!r} is not a map delta", field="type")
        version = _version(doc)
        return cls(
            serial=integer(doc, "serial", "delta"),
            base_serial=integer(doc, "base_serial", "delta"),
            peers_upsert=peers_from_wire(doc.get("peers_upsert", []), "peers_upsert"),
            peers_remove=strings(doc.get("peers_remove", []), "peers_remove"),
            rules=parse_rules(doc["rules"], "rules") if "rules" in doc else None,
            sets_replace=parse_sets(doc.get("sets_replace", {}), "sets_replace"),
            sets_remove=strings(doc.get("sets_remove", []), "sets_remove"),
            peer=SelfEntry.from_wire(doc["peer"]) if "peer" in doc else None,
            dns=DnsConfig.from_wire(doc["dns"]) if "dns" in doc else None,
            signal=SignalConfig.from_wire(doc["signal"]) if "signal" in doc else None,
            relays=relays_from_wire(doc["relays"]) if "relays" in doc else None,
            routes=routes_from_wire(doc["routes"]) if "routes" in doc else None,
            forward=forward_from_wire(doc["forward"]) if "forward" in doc else None,
            version=version,
        )


MapMessage = FullMap | MapDelta


def parse_map_message(raw: object) -> MapMessage:
    """A map stream message (already JSON-decoded) as `FullMap` or `MapDelta`; WireFormatError if malformed."""
    doc = obj(raw, "message")
    kind = doc.get("type")
    if kind == "map":
        return FullMap.from_wire(doc)
    if kind == "delta":
        return MapDelta.from_wire(doc)
    raise WireFormatError(f"type: unknown map message type {kind!r}", field="type")


# ----- the coordinator's fast path: the same documents from pre-encoded parts ---------------------------
def full_json(
    *,
    serial: int,
    peer: SelfEntry,
    dns: DnsConfig,
    signal: SignalConfig,
    relays: Iterable[RelayCredential],
    routes: Iterable[RouteEntry] = (),
    forward: Iterable[ForwardEntry] = (),
    peers_json: str,
    rules: tuple[FirewallRule, ...],
    sets_json: str,
) -> str:
    """A full map as JSON text; `peers_json` is the encoded list of peer entries, `sets_json` the sets object."""
    head = dumps(
        {
            "type": "map",
            "version": MAP_VERSION,
            "serial": serial,
            "peer": peer.to_wire(),
            "dns": dns.to_wire(),
            "signal": signal.to_wire(),
            "relays": [r.to_wire() for r in relays],
            "routes": [r.to_wire() for r in routes],
            **({"forward": fw} if (fw := [f.to_wire() for f in forward]) else {}),
        }
    )
    firewall = '{"default_action":"drop","rules":' + rules_json(rules) + ',"sets":' + sets_json + "}"
    return head[:-1] + ',"peers":' + peers_json + ',"firewall":' + firewall + "}"


def delta_json(head: MapDelta, *, peers_upsert_json: str = "", sets_replace_json: str = "") -> str:
    """A delta as JSON text: `head` carries the small parts (its peers_upsert and sets_replace must be
    empty); the large ones come pre-encoded (empty string: absent)."""
    if head.peers_upsert or head.sets_replace:
        raise ValueError("delta_json: pass peers_upsert and sets_replace pre-encoded")
    text_ = dumps(head.to_wire())
    parts = []
    if peers_upsert_json:
        parts.append('"peers_upsert":' + peers_upsert_json)
    if sets_replace_json:
        parts.append('"sets_replace":' + sets_replace_json)
    return text_[:-1] + "," + ",".join(parts) + "}" if parts else text_
