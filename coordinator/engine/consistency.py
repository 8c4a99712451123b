"""Both ends of a path get matching firewall rules: a check over the computed network maps.

Each peer enforces its own map (see agent/firewall), so a path A -> B only works when A's map
lets the traffic out and B's map lets it in. For every peer A and every rule of A's map toward
a set that contains B, this check requires B's map to hold the mirror rule: same policy,
protocol and ports, the opposite direction, and a set that contains A. A member of a rule set
must also be in A's reach (a WireGuard tunnel to it exists), and must be a live peer.

The engine computes symmetric maps by construction; this check is an independent audit of that
property (tests run it on random graphs; operators can run it on a live graph).
It works on bit masks grouped by rule key (policy, protocol, ports) and set: all members of a
policy side get the same set, so the work is the size of each distinct set, not peers x members.

Routed paths are checked the same way: a client's `route` rule needs the route in its map, a tunnel to
each routing peer listed there, and on each of them a `forward` rule (same policy, protocol, ports and
route) whose set holds the client; a routing peer's `forward` rule needs, on each member of its set, a
tunnel and the matching `route` rule.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from coordinator.engine.bits import bit_list
from coordinator.engine.graph import MeshGraph

RuleKey = tuple[str, str, tuple[tuple[int, int], ...]]  # policy_id, protocol, ports
RoutedKey = tuple[str, str, tuple[tuple[int, int], ...], str]  # policy_id, protocol, ports, route_id
_MIRROR = {"in": "out", "out": "in", "route": "forward", "forward": "route"}


@dataclass(frozen=True, slots=True, order=True)
class Violation:
    """`peer`'s rule (`direction` toward `other`) has no matching rule on the other end."""

    kind: str  # "missing_mirror" | "missing_set" | "no_tunnel" | "unknown_peer" | "missing_route"
    peer: str
    other: str
    policy_id: str
    direction: str
    protocol: str
    ports: tuple[tuple[int, int], ...]

    def describe(self) -> str:
        ports = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in self.ports) or "all"
        what = f"policy {self.policy_id} {self.direction} {self.protocol}/{ports}"
        if self.kind == "missing_mirror":
            mirror = _MIRROR[self.direction]
            return f"{self.peer} {what} toward {self.other}, but {self.other} has no matching {mirror} rule"
        if self.kind == "missing_route":
            return f"{self.peer} {what}: rule names route {self.other!r}, which the map does not hold"
        if self.kind == "missing_set":
            return f"{self.peer} {what}: rule names set {self.other!r}, which the map does not hold"
        if self.kind == "no_tunnel":
            return f"{self.peer} {what} toward {self.other}, which is not in {self.peer}'s peer list"
        return f"{self.peer} {what} toward {self.other}, which is not a live peer of the mesh"


def check_consistency(graph: MeshGraph) -> list[Violation]:
    """Every violation of rule symmetry in the graph's current maps (an empty list when consistent)."""
    violations: list[Violation] = []
    # key -> direction -> rule mask -> the peers (as a mask) whose rules with this key have that mask.
    # Every member of a policy side gets the same set, so each key has only a few distinct masks.
    groups: dict[RuleKey, dict[str, dict[int, int]]] = defaultdict(lambda: {"in": {}, "out": {}})
    live = 0
    for pid, peer in graph.peers.items():
        if graph.maps.get(pid) is not None:
            live |= 1 << peer.slot
    violations += _routed(graph, live)
    for pid, state in graph.maps.items():
        node = graph.peers.get(pid)
        if node is None:
            continue
        bit = 1 << node.slot
        merged: dict[tuple[RuleKey, str], int] = {}
        for rule in state.rules:
            if rule.direction == "route":
                continue  # checked by _routed
            mask = state.sets.get(rule.peer_set)
            if mask is None:
                kind, args = "missing_set", (rule.direction, rule.protocol, rule.ports)
                violations.append(Violation(kind, pid, rule.peer_set, rule.policy_id, *args))
                continue
            key = (rule.policy_id, rule.protocol, rule.ports)
            others = mask & ~bit
            for slot in bit_list(others & ~live):
                violations.append(_at(graph, "unknown_peer", pid, slot, rule.direction, key))
            for slot in bit_list(others & live & ~state.reach):
                violations.append(_at(graph, "no_tunnel", pid, slot, rule.direction, key))
            if rule.direction == "forward":
                continue  # its mirror is checked by _routed
            merged[key, rule.direction] = merged.get((key, rule.direction), 0) | mask
        for (key, direction), mask in merged.items():
            by_mask = groups[key][direction]
            by_mask[mask] = by_mask.get(mask, 0) | bit
    for key, by_direction in groups.items():
        for direction, by_mask in by_direction.items():
            mirror = by_direction[_MIRROR[direction]]
            covered: dict[int, int] = {}  # member slot -> peers its mirror rules name
            for mask, holders in by_mask.items():
                for member in bit_list(mask & live):
                    cover = covered.get(member)
                    if cover is None:
                        member_bit = 1 << member
                        cover = 0
                        for mirror_mask, mirror_holders in mirror.items():
                            if mirror_holders & member_bit:
                                cover |= mirror_mask
                        covered[member] = cover
                    missing = holders & ~(1 << member) & ~cover
                    for slot in bit_list(missing):
                        violations.append(_at(graph, "missing_mirror", graph.slot_ids[slot], member, direction, key))
    return sorted(violations)


def _routed(graph: MeshGraph, live: int) -> list[Violation]:
    """Violations of routed paths: route rules against the forward rules of the routing peers, and back."""
    out: list[Violation] = []
    route_rules: dict[RoutedKey, int] = {}  # key -> the peers (mask) holding that route rule
    forward_sets: dict[tuple[RoutedKey, int], int] = {}  # (key, holder slot) -> its forward set
    for pid, state in graph.maps.items():
        node = graph.peers.get(pid)
        if node is None:
            continue
        for rule in state.rules:
            key = (rule.policy_id, rule.protocol, rule.ports, rule.route_id)
            if rule.direction == "route":
                route_rules[key] = route_rules.get(key, 0) | 1 << node.slot
            elif rule.direction == "forward":
                mask = state.sets.get(rule.peer_set, 0)
                forward_sets[key, node.slot] = forward_sets.get((key, node.slot), 0) | mask
    for pid, state in graph.maps.items():
        node = graph.peers.get(pid)
        if node is None:
            continue
        entries = {r.id: r for r in state.routes}
        for rule in state.rules:
            key = (rule.policy_id, rule.protocol, rule.ports, rule.route_id)
            if rule.direction == "route":
                entry = entries.get(rule.route_id)
                if entry is None:
                    out.append(Violation("missing_route", pid, rule.route_id, rule.policy_id, "route", *key[1:3]))
                    continue
                for ref in entry.routers:
                    router = graph.peers.get(ref.peer_id)
                    if router is None or not live >> router.slot & 1:
                        out.append(Violation("unknown_peer", pid, ref.peer_id, rule.policy_id, "route", *key[1:3]))
                    elif not state.reach >> router.slot & 1:
                        out.append(Violation("no_tunnel", pid, ref.peer_id, rule.policy_id, "route", *key[1:3]))
                    elif not forward_sets.get((key, router.slot), 0) >> node.slot & 1:
                        out.append(Violation("missing_mirror", pid, ref.peer_id, rule.policy_id, "route", *key[1:3]))
            elif rule.direction == "forward":
                members = state.sets.get(rule.peer_set, 0) & live & ~(1 << node.slot)
                for slot in bit_list(members & ~route_rules.get(key, 0)):
                    out.append(_at(graph, "missing_mirror", pid, slot, "forward", key[:3]))
    return out


def _at(graph: MeshGraph, kind: str, peer: str, slot: int, direction: str, key: RuleKey) -> Violation:
    other = graph.slot_ids[slot] if 0 <= slot < len(graph.slot_ids) else str(slot)
    return Violation(kind, peer, other, key[0], direction, key[1], key[2])
