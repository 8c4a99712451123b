"""The network map's firewall section: accept rules between this peer and named sets of mesh addresses,
and through network routes.

Directions: `in`/`out` accept traffic from/to the mesh addresses of `peer_set`; `route` (a client)
accepts traffic out through the mesh interface to a route's `prefix`; `forward` (a routing peer) accepts
traffic from the mesh addresses of `peer_set` forwarded to `prefix`. Route rules name their `route_id`;
`in`/`out` rules carry neither `route_id` nor `prefix`, and `route` rules have no `peer_set`.

The coordinator evaluates policies into rules; the agent compiles a `FirewallSection` into nftables
(agent/firewall). Parsing is strict, because a field the agent does not understand could change what
a rule means: unknown keys, unknown protocols or directions, ports outside 1-65535 or with icmp/any,
and addresses outside the mesh range are refused with the failing field named, and the whole section
(hence the whole map) is refused with them.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from starling_proto.routes import wire_prefix
from starling_proto.wire import WireFormatError, array, dumps, obj

PROTOCOLS = ("any", "tcp", "udp", "icmp")
DIRECTIONS = ("in", "out", "route", "forward")
ROUTED = ("route", "forward")
RULE_KEYS = frozenset({"policy_id", "direction", "action", "protocol", "ports", "peer_set", "route_id", "prefix"})
SECTION_KEYS = frozenset({"default_action", "rules", "sets"})

Direction = Literal["in", "out", "route", "forward"]
PortRange = tuple[int, int]


@dataclass(frozen=True, slots=True, order=True)
class FirewallRule:
    """Accept `protocol` traffic (to `ports`, tcp/udp only) from (`in`) or to (`out`) the set `peer_set`;
    out to a route's `prefix` (`route`), or forwarded from `peer_set` to `prefix` (`forward`)."""

    policy_id: str
    direction: Direction
    protocol: str
    ports: tuple[PortRange, ...]
    peer_set: str
    action: str = "accept"
    route_id: str = ""
    prefix: str = ""

    def to_wire(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "policy_id": self.policy_id,
            "direction": self.direction,
            "action": self.action,
            "protocol": self.protocol,
            "ports": [list(p) for p in self.ports],
        }
        if self.direction != "route":
            doc["peer_set"] = self.peer_set
        if self.direction in ROUTED:
            doc["route_id"], doc["prefix"] = self.route_id, self.prefix
        return doc

    @classmethod
    def from_wire(cls, raw: object, where: str) -> FirewallRule:
        if not isinstance(raw, dict):
            raise WireFormatError(f"{where}: must be an object", field=where)
        extra = sorted(map(str, set(raw) - RULE_KEYS))
        if extra:
            raise WireFormatError(f"{where}: unknown keys {', '.join(extra)}", field=where)
        policy_id = raw.get("policy_id")
        if not isinstance(policy_id, str) or not policy_id:
            raise WireFormatError(f"{where}.policy_id: must be a non-empty string", field=f"{where}.policy_id")
        named = f"{where} (policy {policy_id})"
        direction = raw.get("direction")
        if direction not in DIRECTIONS:
            raise WireFormatError(f"{named}: unknown direction {direction!r} (in, out, route or forward)", field=where)
        action = raw.get("action", "accept")
        if action != "accept":
            raise WireFormatError(f"{named}: unknown action {action!r} (only accept)", field=where)
        protocol = raw.get("protocol")
        if protocol not in PROTOCOLS:
            raise WireFormatError(f"{named}: unknown protocol {protocol!r} ({', '.join(PROTOCOLS)})", field=where)
        peer_set = raw.get("peer_set", "")
        if direction == "route":
            if peer_set:
                raise WireFormatError(f"{named}: a route rule has no peer_set", field=where)
        elif not isinstance(peer_set, str) or not peer_set:
            raise WireFormatError(f"{named}: unknown peer_set {peer_set!r}", field=where)
        route_id, prefix = _route_target(raw, direction, named)
        ports = _ports(str(protocol), raw.get("ports", []), named)
        return cls(policy_id, direction, str(protocol), ports, str(peer_set), "accept", route_id, prefix)


def _route_target(raw: dict[object, object], direction: object, where: str) -> tuple[str, str]:
    """(route_id, prefix) of a `route`/`forward` rule, checked; ("", "") for `in`/`out` (which may not have them)."""
    if direction not in ROUTED:
        if "route_id" in raw or "prefix" in raw:
            raise WireFormatError(f"{where}: route_id and prefix belong to route and forward rules only", field=where)
        return "", ""
    route_id = raw.get("route_id")
    if not isinstance(route_id, str) or not route_id or len(route_id) > 64:
        raise WireFormatError(f"{where}.route_id: must be a non-empty string", field=f"{where}.route_id")
    return route_id, wire_prefix(raw.get("prefix"), where)


def _ports(protocol: str, raw: object, where: str) -> tuple[PortRange, ...]:
    at = f"{where}.ports"
    if not isinstance(raw, list):
        raise WireFormatError(f"{at}: must be a list of [start, end] pairs", field=at)
    if raw and protocol not in ("tcp", "udp"):
        raise WireFormatError(f"{at}: ports are only allowed with tcp or udp, not {protocol}", field=at)
    out: list[PortRange] = []
    for j, pair in enumerate(raw):
        here = f"{at}[{j}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise WireFormatError(f"{here}: {pair!r} is not a [start, end] pair", field=here)
        start, end = pair
        for value in (start, end):
            if isinstance(value, bool) or not isinstance(value, int):
                raise WireFormatError(f"{here}: port {value!r} is not an integer", field=here)
            if not 1 <= value <= 65535:
                raise WireFormatError(f"{here}: port {value} is outside 1-65535", field=here)
        if start > end:
            raise WireFormatError(f"{here}: range start {start} is greater than its end {end}", field=here)
        out.append((start, end))
    return tuple(out)


class _AddressChecker:
    """Mesh IPv4 addresses of sets. Sets repeat the same addresses, so each distinct string is checked
    once and a whole set is screened with one C-level set difference."""

    def __init__(self) -> None:
        self.good: set[str] = set()

    def check(self, members: list[object], where: str) -> None:
        try:
            unknown: set[object] | list[object] = set(members) - self.good
        except TypeError:  # an unhashable member (a list, an object): one by one
            unknown = members
        for ip in unknown:
            reason = self._problem(ip)
            if reason is not None:
                raise WireFormatError(f"{where}: {reason}", field=where)
            self.good.add(ip)  # type: ignore[arg-type]  # a string: checked by _problem

    @staticmethod
    def _problem(ip: object) -> str | None:
        if not isinstance(ip, str):
            return f"{ip!r} is not a string"
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            return f"{ip!r} is not an IPv4 address"
        if packed[0] != 100 or packed[1] & 0xC0 != 0x40:
            return f"{ip} is outside the mesh range 100.64.0.0/10"
        return None


def parse_rules(raw: object, where: str) -> tuple[FirewallRule, ...]:
    if not isinstance(raw, list):
        raise WireFormatError(f"{where}: must be a list", field=where)
    return tuple(FirewallRule.from_wire(rule, f"{where}[{i}]") for i, rule in enumerate(raw))


def parse_sets(raw: object, where: str) -> dict[str, tuple[str, ...]]:
    """Set name -> member addresses (in wire order)."""
    if not isinstance(raw, dict):
        raise WireFormatError(f"{where}: must be an object of set name -> list of IPv4 addresses", field=where)
    checker = _AddressChecker()
    out: dict[str, tuple[str, ...]] = {}
    for name, members in raw.items():
        if not isinstance(name, str) or not name:
            raise WireFormatError(f"{where}: set name {name!r} must be a non-empty string", field=where)
        at = f"{where}[{name!r}]"
        checker.check(array(members, at), at)
        out[name] = tuple(members)
    return out


@dataclass(frozen=True, slots=True)
class FirewallSection:
    """Default drop, plus `rules`; each rule names one of `sets` (set name -> mesh addresses)."""

    rules: tuple[FirewallRule, ...] = ()
    sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_action: str = "drop"

    def to_wire(self) -> dict[str, object]:
        return {
            "default_action": self.default_action,
            "rules": [r.to_wire() for r in self.rules],
            "sets": {name: list(members) for name, members in self.sets.items()},
        }

    def unknown_sets(self) -> list[tuple[int, FirewallRule]]:
        """Rules (index, rule) whose set is not in `sets` (a delta may leave a map like that: refuse it)."""
        return [(i, r) for i, r in enumerate(self.rules) if r.direction != "route" and r.peer_set not in self.sets]

    @classmethod
    def from_wire(cls, raw: object, where: str = "firewall") -> FirewallSection:
        if not isinstance(raw, dict):
            raise WireFormatError(f"{where}: must be an object with rules and sets", field=where)
        doc = obj(raw, where)
        unknown = sorted(map(str, set(doc) - SECTION_KEYS))
        if unknown:
            raise WireFormatError(f"{where}: unknown keys {', '.join(unknown)} (agent too old?)", field=where)
        action = doc.get("default_action", "drop")
        if action != "drop":
            raise WireFormatError(
                f"{where}.default_action: {action!r} is not supported (only 'drop')", field="default_action"
            )
        rules = parse_rules(doc.get("rules", []), f"{where}.rules")
        section = cls(rules, parse_sets(doc.get("sets", {}), f"{where}.sets"))
        for i, rule in section.unknown_sets():
            at = f"{where}.rules[{i}] (policy {rule.policy_id})"
            raise WireFormatError(f"{at}: unknown peer_set {rule.peer_set!r}", field=f"{where}.rules[{i}]")
        return section


def rules_json(rules: tuple[FirewallRule, ...]) -> str:
    return dumps([r.to_wire() for r in rules])
