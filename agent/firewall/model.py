"""Validation and compilation of a network map's `firewall` section (and, on a routing peer, its
`forward` list) into a `CompiledRuleset`.

The coordinator evaluates policies; the agent only checks that what it was given is well formed
and turns it into an nftables model: one named set per peer set that a rule uses (IPv4 mesh
addresses), one rule per map rule in `mesh_in` ("in"), `mesh_out` ("out", and "route": out through
the mesh interface to a route's prefix) or `mesh_fwd` ("forward": from a peer set, forwarded to a
route's prefix). `mesh_fwd` exists only when there are forward rules, and the nat chain
`postrouting` only when a forwarded route is masqueraded: a peer that routes nothing gets exactly
the table it had before routes existed. The model is pure data: `agent.firewall.nftjson` renders
it as libnftables JSON commands (a full build, or the diff from the model installed before),
`render_text()` as `nft` text for people.

The section's structure is checked by the map contract (`starling_proto.firewall.FirewallSection`,
`starling_proto.routes.ForwardEntry`); a map with any malformed part, or a forward rule for a route
this peer does not forward, is rejected as a whole (`FirewallMapError`); nothing is applied.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from starling_proto.firewall import FirewallRule, FirewallSection
from starling_proto.routes import ForwardEntry, forward_from_wire
from starling_proto.wire import WireFormatError

FAMILY = "inet"
TABLE = "starling"
CHAIN_IN = "mesh_in"
CHAIN_OUT = "mesh_out"
CHAIN_FWD = "mesh_fwd"
CHAIN_NAT = "postrouting"
MESH = ipaddress.IPv4Network("100.64.0.0/10")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9:._ -]")

Direction = Literal["in", "out", "route", "forward"]


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
    """One accept rule: traffic between this peer and the addresses of nft set `set_name` (in, out),
    to a route's `prefix` (route), or from the set's addresses forwarded to `prefix` (forward)."""

    direction: Direction
    set_name: str
    protocol: str
    ports: tuple[tuple[int, int], ...]
    comment: str = field(default="", compare=True)
    prefix: str = ""

    def text(self) -> str:
        parts = []
        if self.direction in ("in", "forward"):
            parts.append(f"ip saddr @{self.set_name}")
        if self.direction == "out":
            parts.append(f"ip daddr @{self.set_name}")
        if self.prefix:
            parts.append(f"ip daddr {self.prefix.removesuffix('/32')}")
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


@dataclass(frozen=True, slots=True, order=True)
class NatSpec:
    """A forwarded route's source NAT: `masquerade` (behind the outgoing interface's address) or not
    (`accept`: the LAN routes the mesh range back; listed so that a broader masqueraded prefix
    does not cover it). Ordered longest prefix first, as the rules must be."""

    order: tuple[int, int]  # (-prefix length, network address as int)
    prefix: str
    masquerade: bool
    comment: str = ""

    def text(self, interface: str) -> str:
        verdict = "masquerade" if self.masquerade else "accept"
        comment = f' comment "{self.comment}"' if self.comment else ""
        prefix = self.prefix.removesuffix("/32")
        return f'iifname "{interface}" oifname != "{interface}" ip daddr {prefix} {verdict}{comment}'


@dataclass(frozen=True)
class CompiledRuleset:
    """What our table must contain. `guard` is the fail-closed baseline (no sets, no rules)."""

    interface: str
    guard: bool = False
    sets: Mapping[str, frozenset[str]] = field(default_factory=dict)  # nft set name -> IPv4 addresses
    set_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # nft set name -> map set names
    rules_in: tuple[RuleSpec, ...] = ()
    rules_out: tuple[RuleSpec, ...] = ()  # "out" and "route" rules
    rules_fwd: tuple[RuleSpec, ...] = ()
    nat: tuple[NatSpec, ...] = ()  # empty unless at least one forwarded route is masqueraded

    @property
    def rule_count(self) -> int:
        return len(self.rules_in) + len(self.rules_out) + len(self.rules_fwd)

    @property
    def element_count(self) -> int:
        return sum(len(v) for v in self.sets.values())

    @property
    def route_count(self) -> int:
        """Rules toward routes: "route" rules (a client) and "forward" rules (a routing peer)."""
        return sum(1 for r in self.rules_out if r.direction == "route") + len(self.rules_fwd)

    @property
    def masqueraded(self) -> tuple[str, ...]:
        return tuple(n.prefix for n in self.nat if n.masquerade)

    def chain_rules(self, chain: str) -> tuple[RuleSpec, ...]:
        return {CHAIN_IN: self.rules_in, CHAIN_OUT: self.rules_out, CHAIN_FWD: self.rules_fwd}.get(chain, ())

    def regular_chains(self) -> tuple[str, ...]:
        return (CHAIN_IN, CHAIN_OUT, CHAIN_FWD) if self.rules_fwd else (CHAIN_IN, CHAIN_OUT)

    def base_chains(self) -> tuple[str, ...]:
        return ("input", "output", "forward", CHAIN_NAT) if self.nat else ("input", "output", "forward")

    def render_text(self) -> str:
        """The table as `nft list table` would show it (for `starling status`, docs and tests)."""
        iface = self.interface
        lines = [f"table {FAMILY} {TABLE} {{"]
        for name in sorted(self.sets):
            lines += [f"\tset {name} {{", "\t\ttype ipv4_addr"]
            if self.sets[name]:
                lines.append("\t\telements = { " + ", ".join(sorted_ips(self.sets[name])) + " }")
            lines += ["\t}", ""]
        for chain in self.regular_chains():
            lines.append(f"\tchain {chain} {{")
            if not self.guard and chain != CHAIN_FWD:
                lines.append("\t\tct state established,related accept")
            lines += ["\t\t" + r.text() for r in self.chain_rules(chain)]
            lines += ["\t\tdrop", "\t}", ""]
        hooks = (("input", f'iifname "{iface}" jump {CHAIN_IN}'), ("output", f'oifname "{iface}" jump {CHAIN_OUT}'))
        for hook, rule in hooks:
            lines += [f"\tchain {hook} {{", f"\t\ttype filter hook {hook} priority filter; policy accept;"]
            lines += [f"\t\t{rule}", "\t}", ""]
        lines += ["\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;"]
        if self.rules_fwd:
            lines.append("\t\tct state established,related accept")
            lines.append(f'\t\tiifname "{iface}" oifname != "{iface}" jump {CHAIN_FWD}')
        lines += [f'\t\tiifname "{iface}" drop', f'\t\toifname "{iface}" drop', "\t}"]
        if self.nat:
            lines += ["", f"\tchain {CHAIN_NAT} {{", "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
            lines += ["\t\t" + n.text(iface) for n in self.nat]
            lines.append("\t}")
        lines.append("}")
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
    """The policy, direction and peer set of a rule, and for routed rules the route (nft comments
    are limited to 128 bytes: cut at 120)."""
    parts = [rule.policy_id, rule.direction, rule.peer_set, rule.route_id and f"route {rule.route_id}"]
    return _COMMENT_UNSAFE.sub("_", " ".join(p for p in parts if p))[:120]


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


def parse_forward(forward: Sequence[ForwardEntry] | object) -> tuple[ForwardEntry, ...]:
    """The map's `forward` list (typed, or a wire list parsed first); FirewallMapError if malformed."""
    if isinstance(forward, (list, tuple)) and all(isinstance(e, ForwardEntry) for e in forward):
        return _checked_forward(tuple(forward))
    return _forward_from_wire(forward)


@functools.lru_cache(maxsize=4)
def _checked_forward(entries: tuple[ForwardEntry, ...]) -> tuple[ForwardEntry, ...]:
    """Typed entries may be built by hand: they are checked as their wire form. Each map apply passes
    the map's same list again, so a list that passed is not checked again (a failure is not cached)."""
    _forward_from_wire([e.to_wire() for e in entries])
    return entries


def _forward_from_wire(wire: object) -> tuple[ForwardEntry, ...]:
    try:
        return forward_from_wire(wire)
    except WireFormatError as exc:
        raise FirewallMapError(str(exc), field=exc.field) from exc


@functools.lru_cache(maxsize=4)
def _nat(entries: tuple[ForwardEntry, ...]) -> tuple[NatSpec, ...]:
    """The postrouting rules for the forwarded routes, longest prefix first; none unless one of them
    is masqueraded (then a route without masquerade gets an `accept` that keeps a broader
    masqueraded prefix from covering it)."""
    if not any(e.masquerade for e in entries):
        return ()
    specs = set()
    for e in entries:
        net = ipaddress.IPv4Network(e.prefix)
        order = (-net.prefixlen, int(net.network_address))
        specs.add(NatSpec(order, e.prefix, e.masquerade, _COMMENT_UNSAFE.sub("_", f"route {e.route_id}")[:120]))
    return tuple(sorted(specs))


def _check_forward_rules(section: FirewallSection, entries: tuple[ForwardEntry, ...]) -> None:
    """A forward rule must name a route this peer forwards, with the same prefix (fail closed: the
    map's two halves disagree, so neither is trusted)."""
    prefixes = {e.route_id: e.prefix for e in entries}
    for i, r in enumerate(section.rules):
        if r.direction != "forward":
            continue
        at = f"firewall.rules[{i}] (policy {r.policy_id})"
        if r.route_id not in prefixes:
            raise FirewallMapError(
                f"{at}: forward rule for route {r.route_id!r}, which is not in this peer's forward list",
                field=f"rules[{i}]",
            )
        if prefixes[r.route_id] != r.prefix:
            raise FirewallMapError(
                f"{at}: forward rule prefix {r.prefix} differs from {prefixes[r.route_id]} of route {r.route_id!r}",
                field=f"rules[{i}]",
            )


def compile_firewall(
    firewall: FirewallSection | Mapping[str, object] | object,
    interface: str,
    forward: Sequence[ForwardEntry] | object = (),
) -> CompiledRuleset:
    """Compile the map's firewall section (typed, or a wire object parsed first) and, on a routing
    peer, the map's `forward` list (masquerade); `FirewallMapError` on any malformed part, nothing
    compiled."""
    check_interface(interface)
    section = parse_section(firewall)
    entries = parse_forward(forward)
    _check_forward_rules(section, entries)
    sets = {name: frozenset(members) for name, members in section.sets.items()}
    used = _shared_sets({r.peer_set for r in section.rules if r.direction != "route"}, sets)
    specs: dict[str, set[RuleSpec]] = {"in": set(), "out": set(), "forward": set()}
    for r in section.rules:
        chain = "out" if r.direction == "route" else r.direction
        set_name = used[r.peer_set] if r.direction != "route" else ""
        ports = merge_ports(list(r.ports))
        specs[chain].add(RuleSpec(r.direction, set_name, r.protocol, ports, _comment_of(r), r.prefix))
    names: dict[str, list[str]] = {}
    for map_name, nft_name in sorted(used.items()):
        names.setdefault(nft_name, []).append(map_name)
    return CompiledRuleset(
        interface=interface,
        sets={nft_name: sets[members[0]] for nft_name, members in names.items()},
        set_names={nft_name: tuple(members) for nft_name, members in names.items()},
        rules_in=tuple(sorted(specs["in"])),
        rules_out=tuple(sorted(specs["out"])),
        rules_fwd=tuple(sorted(specs["forward"])),
        nat=_nat(entries),
    )
