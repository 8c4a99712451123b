"""Validation and compilation of a network map's `firewall` section into a `CompiledRuleset`.

The coordinator evaluates policies; the agent only checks that what it was given is well formed
and turns it into an nftables model: one named set per peer set that a rule uses (IPv4 mesh
addresses), one rule per map rule in `mesh_in` ("in") or `mesh_out` ("out"). The model is pure
data: `agent.firewall.nftjson` renders it as libnftables JSON commands (a full build, or the diff
from the model installed before), `render_text()` as `nft` text for people.

The section's structure is checked by the map contract (`starling_proto.firewall.FirewallSection`);
a map with any malformed part is rejected as a whole (`FirewallMapError`); nothing is applied.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from starling_proto.firewall import FirewallRule, FirewallSection
from starling_proto.wire import WireFormatError

FAMILY = "inet"
TABLE = "starling"
CHAIN_IN = "mesh_in"
CHAIN_OUT = "mesh_out"
MESH = ipaddress.IPv4Network("100.64.0.0/10")
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


def _comment_of(rule: FirewallRule) -> str:
    return _comment(rule.policy_id, rule.direction, rule.peer_set)


def _comment(policy_id: str, direction: str, peer_set: str) -> str:
    text = _COMMENT_UNSAFE.sub("_", f"{policy_id} {direction} {peer_set}")
    return text[:120]


def _shared_sets(used: set[str], sets: dict[str, frozenset[str]]) -> dict[str, str]:
    """Map set name -> nft set name. Map sets with equal addresses share one nft set, named after
    the smallest of their names: policies on the same groups then cost one set, and a peer joining
    a group is one element added."""
    by_content: dict[frozenset[str], list[str]] = {}
    for name in sorted(used):
        by_content.setdefault(sets[name], []).append(name)
    return {name: nft_set_name(names[0]) for names in by_content.values() for name in names}


def parse_section(firewall: FirewallSection | Mapping[str, object] | object) -> FirewallSection:
    """The typed section (a wire object is parsed by the map contract); FirewallMapError if malformed."""
    if isinstance(firewall, FirewallSection):
        for i, rule in firewall.unknown_sets():  # a delta may have removed a set a rule still names
            at = f"rules[{i}] (policy {rule.policy_id})"
            raise FirewallMapError(f"firewall.{at}: unknown peer_set {rule.peer_set!r}", field=f"rules[{i}]")
        return firewall
    try:
        return FirewallSection.from_wire(firewall)
    except WireFormatError as exc:
        raise FirewallMapError(str(exc), field=exc.field) from exc


def compile_firewall(firewall: FirewallSection | Mapping[str, object] | object, interface: str) -> CompiledRuleset:
    """Compile the map's firewall section (typed, or a wire object parsed first); `FirewallMapError` on
    any malformed part, nothing compiled."""
    check_interface(interface)
    section = parse_section(firewall)
    sets = {name: frozenset(members) for name, members in section.sets.items()}
    checked = [
        (
            r.direction,
            r.protocol,
            merge_ports(list(r.ports)),
            r.peer_set,
            _comment(r.policy_id, r.direction, r.peer_set),
        )
        for r in section.rules
    ]
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
