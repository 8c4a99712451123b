"""Validation and compilation of a network map's `firewall` section into a `CompiledRuleset`.

The coordinator evaluates policies; the agent only checks that what it was given is well formed
and turns it into an nftables model: one named set per peer set that a rule uses (IPv4 mesh
addresses), one rule per map rule in `mesh_in` ("in") or `mesh_out` ("out"). The model is pure
data: `agent.firewall.nftjson` renders it as libnftables JSON commands (a full build, or the diff
from the model installed before), `render_text()` as `nft` text for people.

A map with any malformed part is rejected as a whole (`FirewallMapError`); nothing is applied.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FAMILY = "inet"
TABLE = "starling"
CHAIN_IN = "mesh_in"
CHAIN_OUT = "mesh_out"
PROTOCOLS = ("any", "tcp", "udp", "icmp")
DIRECTIONS = ("in", "out")
MESH = ipaddress.IPv4Network("100.64.0.0/10")
RULE_KEYS = frozenset({"policy_id", "direction", "action", "protocol", "ports", "peer_set"})
FIREWALL_KEYS = frozenset({"default_action", "rules", "sets"})
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9:._ -]")

Direction = Literal["in", "out"]


class FirewallError(Exception):
    """An operator-facing reason why the firewall could not be configured; `field` names the bad part."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class FirewallMapError(FirewallError):
    """The map's firewall section is malformed: it was rejected whole. Retrying the same map cannot
    succeed; wait for the next map (unlike other `FirewallError`s, which are worth a retry)."""


def check_interface(name: str) -> str:
    """The mesh interface name, checked (nft matches it by name: it may not exist yet)."""
    if not isinstance(name, str) or not _IFNAME.match(name):
        raise FirewallError(f"interface {name!r} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)")
    return name


def nft_set_name(map_name: str) -> str:
    """Deterministic nft set name for a map set name (those hold ':' and ids): `s_` + 16 hex digits."""
    return "s_" + hashlib.sha256(map_name.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True, order=True)
class RuleSpec:
    """One accept rule: traffic between this peer and the addresses of nft set `set_name`."""

    direction: Direction
    set_name: str
    protocol: str
    ports: tuple[tuple[int, int], ...]
    comment: str = field(default="", compare=True)

    def text(self) -> str:
        field_ = "saddr" if self.direction == "in" else "daddr"
        parts = [f"ip {field_} @{self.set_name}"]
        if self.protocol in ("tcp", "udp") and self.ports:
            items = [str(a) if a == b else f"{a}-{b}" for a, b in self.ports]
            value = items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"
            parts.append(f"{self.protocol} dport {value}")
        elif self.protocol != "any":
            parts.append(f"meta l4proto {self.protocol}")
        parts.append("accept")
        if self.comment:
            parts.append(f'comment "{self.comment}"')
        return " ".join(parts)


@dataclass(frozen=True)
class CompiledRuleset:
    """What our table must contain. `guard` is the fail-closed baseline (no sets, no rules)."""

    interface: str
    guard: bool = False
    sets: Mapping[str, frozenset[str]] = field(default_factory=dict)  # nft set name -> IPv4 addresses
    set_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # nft set name -> map set names
    rules_in: tuple[RuleSpec, ...] = ()
    rules_out: tuple[RuleSpec, ...] = ()

    @property
    def rule_count(self) -> int:
        return len(self.rules_in) + len(self.rules_out)

    @property
    def element_count(self) -> int:
        return sum(len(v) for v in self.sets.values())

    def chain_rules(self, chain: str) -> tuple[RuleSpec, ...]:
        return self.rules_in if chain == CHAIN_IN else self.rules_out

    def render_text(self) -> str:
        """The table as `nft list table` would show it (for `starling status`, docs and tests)."""
        iface = self.interface
        lines = [f"table {FAMILY} {TABLE} {{"]
        for name in sorted(self.sets):
            lines += [f"\tset {name} {{", "\t\ttype ipv4_addr"]
            if self.sets[name]:
                lines.append("\t\telements = { " + ", ".join(sorted_ips(self.sets[name])) + " }")
            lines += ["\t}", ""]
        for chain in (CHAIN_IN, CHAIN_OUT):
            lines.append(f"\tchain {chain} {{")
            if not self.guard:
                lines.append("\t\tct state established,related accept")
                lines += ["\t\t" + r.text() for r in self.chain_rules(chain)]
            lines += ["\t\tdrop", "\t}", ""]
        hooks = (("input", f'iifname "{iface}" jump {CHAIN_IN}'), ("output", f'oifname "{iface}" jump {CHAIN_OUT}'))
        for hook, rule in hooks:
            lines += [f"\tchain {hook} {{", f"\t\ttype filter hook {hook} priority filter; policy accept;"]
            lines += [f"\t\t{rule}", "\t}", ""]
        lines += ["\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;"]
        lines += [f'\t\tiifname "{iface}" drop', f'\t\toifname "{iface}" drop', "\t}", "}"]
        return "\n".join(lines) + "\n"


def guard_ruleset(interface: str) -> CompiledRuleset:
    return CompiledRuleset(check_interface(interface), guard=True)


def sorted_ips(ips: frozenset[str] | set[str]) -> list[str]:
    return sorted(ips, key=lambda ip: socket.inet_aton(ip))


def merge_ports(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, with overlapping and adjacent ranges merged (nft refuses overlapping set intervals)."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((a, b) for a, b in merged)


def _comment(policy_id: str, direction: str, peer_set: str) -> str:
    text = _COMMENT_UNSAFE.sub("_", f"{policy_id} {direction} {peer_set}")
    return text[:120]


class _IpChecker:
    """Validates IPv4 mesh addresses. Sets repeat the same addresses, so each distinct string is
    checked once and whole sets are screened with one C-level set difference."""

    def __init__(self) -> None:
        self.good: set[str] = set()

    def first_problem(self, members: list[Any]) -> str | None:
        try:
            unknown: Any = set(members) - self.good
        except TypeError:  # an unhashable member (a list, an object): check one by one
            unknown = members
        for ip in unknown:
            reason = self._problem(ip)
            if reason is not None:
                return reason
            self.good.add(ip)
        return None

    @staticmethod
    def _problem(ip: Any) -> str | None:
        if not isinstance(ip, str):
            return f"{ip!r} is not a string"
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            return f"{ip!r} is not an IPv4 address"
        if packed[0] != 100 or packed[1] & 0xC0 != 0x40:  # 100.64.0.0/10
            return f"{ip} is outside the mesh range {MESH}"
        return None


def _check_ports(protocol: str, ports: Any, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(ports, list):
        raise FirewallMapError(f"{where}.ports: must be a list of [start, end] pairs", field=f"{where}.ports")
    if ports and protocol not in ("tcp", "udp"):
        raise FirewallMapError(
            f"{where}.ports: ports are only allowed with tcp or udp, not {protocol}", field=f"{where}.ports"
        )
    ranges: list[tuple[int, int]] = []
    for j, pair in enumerate(ports):
        at = f"{where}.ports[{j}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise FirewallMapError(f"{at}: {pair!r} is not a [start, end] pair", field=at)
        start, end = pair
        for value in (start, end):
            if isinstance(value, bool) or not isinstance(value, int):
                raise FirewallMapError(f"{at}: port {value!r} is not an integer", field=at)
            if not 1 <= value <= 65535:
                raise FirewallMapError(f"{at}: port {value} is outside 1-65535", field=at)
        if start > end:
            raise FirewallMapError(f"{at}: range start {start} is greater than its end {end}", field=at)
        ranges.append((start, end))
    return merge_ports(ranges)


def _check_sets(sets: Any) -> dict[str, frozenset[str]]:
    if not isinstance(sets, dict):
        raise FirewallMapError("firewall.sets: must be an object of set name -> list of IPv4 addresses", field="sets")
    checker = _IpChecker()
    out: dict[str, frozenset[str]] = {}
    for name, members in sets.items():
        at = f"sets[{name!r}]"
        if not isinstance(name, str) or not name:
            raise FirewallMapError(f"firewall.sets: set name {name!r} must be a non-empty string", field="sets")
        if not isinstance(members, list):
            raise FirewallMapError(f"firewall.{at}: must be a list of IPv4 addresses", field=at)
        reason = checker.first_problem(members)
        if reason is not None:
            raise FirewallMapError(f"firewall.{at}: {reason}", field=at)
        out[name] = frozenset(members)
    return out


def _shared_sets(used: set[str], sets: dict[str, frozenset[str]]) -> dict[str, str]:
    """Map set name -> nft set name. Map sets with equal addresses share one nft set, named after
    the smallest of their names: policies on the same groups then cost one set, and a peer joining
    a group is one element added."""
    by_content: dict[frozenset[str], list[str]] = {}
    for name in sorted(used):
        by_content.setdefault(sets[name], []).append(name)
    return {name: nft_set_name(names[0]) for names in by_content.values() for name in names}


def compile_firewall(firewall: Any, interface: str) -> CompiledRuleset:
    """Validate the map's firewall section and compile it; raises `FirewallMapError` on any malformed part."""
    check_interface(interface)
    if not isinstance(firewall, dict):
        raise FirewallMapError("firewall: must be an object with rules and sets")
    unknown = sorted(set(firewall) - FIREWALL_KEYS)
    if unknown:
        raise FirewallMapError(
            f"firewall: unknown keys {', '.join(map(str, unknown))} (agent too old?)", field="firewall"
        )
    action = firewall.get("default_action", "drop")
    if action != "drop":
        raise FirewallMapError(
            f"firewall.default_action: {action!r} is not supported (only 'drop')", field="default_action"
        )
    rules = firewall.get("rules", [])
    if not isinstance(rules, list):
        raise FirewallMapError("firewall.rules: must be a list", field="rules")
    sets = _check_sets(firewall.get("sets", {}))
    checked: list[tuple[Direction, str, tuple[tuple[int, int], ...], str, str]] = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise FirewallMapError(f"firewall.{where}: must be an object", field=where)
        extra = sorted(set(rule) - RULE_KEYS)
        if extra:
            raise FirewallMapError(f"firewall.{where}: unknown keys {', '.join(map(str, extra))}", field=where)
        policy_id = rule.get("policy_id")
        if not isinstance(policy_id, str) or not policy_id:
            raise FirewallMapError(
                f"firewall.{where}.policy_id: must be a non-empty string", field=f"{where}.policy_id"
            )
        where = f"rules[{i}] (policy {policy_id})"
        direction = rule.get("direction")
        if direction not in DIRECTIONS:
            raise FirewallMapError(f"firewall.{where}: unknown direction {direction!r} (in or out)", field=where)
        if rule.get("action", "accept") != "accept":
            raise FirewallMapError(
                f"firewall.{where}: unknown action {rule.get('action')!r} (only accept)", field=where
            )
        protocol = rule.get("protocol")
        if protocol not in PROTOCOLS:
            known = ", ".join(PROTOCOLS)
            raise FirewallMapError(f"firewall.{where}: unknown protocol {protocol!r} ({known})", field=where)
        ports = _check_ports(protocol, rule.get("ports", []), f"firewall.{where}")
        peer_set = rule.get("peer_set")
        if not isinstance(peer_set, str) or peer_set not in sets:
            raise FirewallMapError(f"firewall.{where}: unknown peer_set {peer_set!r}", field=where)
        checked.append((direction, protocol, ports, peer_set, _comment(policy_id, direction, peer_set)))
    used = _shared_sets({c[3] for c in checked}, sets)
    specs: dict[str, set[RuleSpec]] = {"in": set(), "out": set()}
    for direction, protocol, ports, peer_set, comment in checked:
        specs[direction].add(RuleSpec(direction, used[peer_set], protocol, ports, comment))
    names: dict[str, list[str]] = {}
    for map_name, nft_name in sorted(used.items()):
        names.setdefault(nft_name, []).append(map_name)
    return CompiledRuleset(
        interface=interface,
        sets={nft_name: sets[members[0]] for nft_name, members in names.items()},
        set_names={nft_name: tuple(members) for nft_name, members in names.items()},
        rules_in=tuple(sorted(specs["in"])),
        rules_out=tuple(sorted(specs["out"])),
    )
