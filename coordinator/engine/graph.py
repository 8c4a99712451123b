"""MeshGraph: peers, groups and policies in memory, and each peer's network map state.

Peer sets are bit masks over peer slots, so a map is a handful of integer ORs. Every mutation
returns the ids of the peers whose map may have changed; `recompute()` re-evaluates only those
and stamps the ones that really changed with the store revision as their serial.
Reachability is symmetric (if A's map lists B, B's map lists A): this is what lets a change to a
peer find every affected map through that peer's own reach.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from coordinator.engine.bits import iter_bits
from starling_proto.firewall import FirewallRule as Rule  # the map contract's rule: no conversion on render

__all__ = ["ComputeStats", "Direction", "MeshGraph", "PeerMapState", "PeerNode", "PolicyNode", "Rule", "SettingsNode"]

Direction = Literal["in", "out"]
INFO_LOG_MAX = 20_000


@dataclass(slots=True)
class PeerNode:
    id: str
    name: str
    public_key: str
    mesh_ip: str
    approved: bool
    groups: frozenset[str]
    slot: int = -1
    info_rev: int = 0


@dataclass(slots=True)
class PolicyNode:
    id: str
    name: str
    enabled: bool
    protocol: str
    ports: tuple[tuple[int, int], ...]
    bidirectional: bool
    src_groups: frozenset[str]
    src_peers: frozenset[str]
    dst_groups: frozenset[str]
    dst_peers: frozenset[str]

    def groups(self) -> frozenset[str]:
        return self.src_groups | self.dst_groups

    def peers(self) -> frozenset[str]:
        return self.src_peers | self.dst_peers


def _rule_key(rule: Rule) -> tuple[str, str, str, str, tuple[tuple[int, int], ...]]:
    return (rule.policy_id, rule.direction, rule.peer_set, rule.protocol, rule.ports)


@dataclass(slots=True)
class SettingsNode:
    mesh_prefix: str
    dns_domain: str
    turn_servers: tuple[str, ...]
    credential_ttl: int
    signal_url: str = ""


@dataclass(slots=True)
class PeerMapState:
    serial: int
    reach: int
    rules: tuple[Rule, ...]
    sets: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ComputeStats:
    maps: int = 0
    changed: int = 0
    seconds: float = 0.0


class MeshGraph:
    """Not thread-safe by itself: callers serialize mutations (the coordinator's write lock)."""

    def __init__(self) -> None:
        self.epoch = 0  # incremented by load(): slots are renumbered, so old masks mean nothing
        self.revision = 0
        self.settings_rev = 0
        self.settings: SettingsNode | None = None
        self.peers: dict[str, PeerNode] = {}
        self.by_slot: list[PeerNode | None] = []
        self.slot_ids: list[str] = []  # slot -> peer id, kept after deletion so streams can name removals
        self.group_names: dict[str, str] = {}
        self.group_mask: dict[str, int] = {}
        self.policies: dict[str, PolicyNode] = {}
        self.group_refs: dict[str, set[str]] = {}
        self.peer_refs: dict[str, set[str]] = {}
        self.eligible = 0
        self.maps: dict[str, PeerMapState] = {}
        self.info_log: list[tuple[int, int]] = []  # (revision, slot) of public-info changes
        self._side_cache: dict[tuple[str, str], int] = {}
        self._group_cache: dict[str, tuple[int, tuple[Rule, ...], dict[str, int]]] = {}
        self.last_stats = ComputeStats()
        self._touched: set[str] = set()

    # ----- reading -------------------------------------------------------------------------
    def peer_by_slot(self, slot: int) -> PeerNode | None:
        return self.by_slot[slot] if 0 <= slot < len(self.by_slot) else None

    def side_mask(self, policy_id: str, side: str) -> int:
        key = (policy_id, side)
        cached = self._side_cache.get(key)
        if cached is not None:
            return cached
        pol = self.policies[policy_id]
        groups, peers = (pol.src_groups, pol.src_peers) if side == "src" else (pol.dst_groups, pol.dst_peers)
        mask = 0
        for gid in groups:
            mask |= self.group_mask.get(gid, 0)
        for pid in peers:
            node = self.peers.get(pid)
            if node is not None:
                mask |= 1 << node.slot
        self._side_cache[key] = mask
        return mask

    def policies_of(self, node: PeerNode) -> set[str]:
        found: set[str] = set(self.peer_refs.get(node.id, ()))
        for gid in node.groups:
            refs = self.group_refs.get(gid)
            if refs:
                found |= refs
        return found

    def compute(self, node: PeerNode) -> tuple[int, tuple[Rule, ...], dict[str, int]]:
        """The reach mask, firewall rules and rule sets of one peer (pure function of the graph).

        Peers that no policy names directly get their map from per-group contributions, cached
        until the graph changes; the others take the general path. Both give identical results.
        """
        if not node.approved:
            return 0, (), {}
        bit = 1 << node.slot
        if self.peer_refs.get(node.id):
            reach, rules, sets = self._evaluate(node.groups, self.policies_of(node), bit)
        elif len(node.groups) == 1:
            (gid,) = node.groups
            reach, rules, sets = self._group_contribution(gid)
        else:
            reach = 0
            merged: set[Rule] = set()
            sets = {}
            for gid in node.groups:
                g_reach, g_rules, g_sets = self._group_contribution(gid)
                reach |= g_reach
                merged.update(g_rules)
                sets.update(g_sets)
            rules = tuple(sorted(merged, key=_rule_key))
        return reach & self.eligible & ~bit, rules, sets

    def _group_contribution(self, gid: str) -> tuple[int, tuple[Rule, ...], dict[str, int]]:
        cached = self._group_cache.get(gid)
        if cached is None:
            cached = self._evaluate(frozenset((gid,)), self.group_refs.get(gid, set()), 0)
            self._group_cache[gid] = cached
        return cached

    def _evaluate(
        self, groups: frozenset[str], policy_ids: set[str], bit: int
    ) -> tuple[int, tuple[Rule, ...], dict[str, int]]:
        """Reach (not yet masked), rules and sets for a member of `groups` whose own bit is `bit`."""
        reach = 0
        rules: set[Rule] = set()
        sets: dict[str, int] = {}
        eligible = self.eligible
        for pid in policy_ids:
            pol = self.policies[pid]
            if not pol.enabled:
                continue
            proto, ports = pol.protocol, pol.ports
            in_src = bool(groups & pol.src_groups) or bool(self.side_mask(pid, "src") & bit)
            in_dst = bool(groups & pol.dst_groups) or bool(self.side_mask(pid, "dst") & bit)
            if in_src:
                dst = self.side_mask(pid, "dst")
                reach |= dst
                name = pid + ":dst"
                sets[name] = dst & eligible
                rules.add(Rule(pid, "out", proto, ports, name))
                if pol.bidirectional:
                    rules.add(Rule(pid, "in", proto, ports, name))
            if in_dst:
                src = self.side_mask(pid, "src")
                reach |= src
                name = pid + ":src"
                sets[name] = src & eligible
                rules.add(Rule(pid, "in", proto, ports, name))
                if pol.bidirectional:
                    rules.add(Rule(pid, "out", proto, ports, name))
        return reach, tuple(sorted(rules, key=_rule_key)), sets

    def reach_of(self, peer_id: str) -> int:
        state = self.maps.get(peer_id)
        return state.reach if state else 0

    def info_changed_since(self, revision: int) -> int | None:
        """Mask of peers whose public info changed after `revision`; None if the log no longer reaches back."""
        log = self.info_log
        if log and log[0][0] > revision and len(log) >= INFO_LOG_MAX:
            return None
        mask = 0
        for rev, slot in reversed(log):
            if rev <= revision:
                break
            mask |= 1 << slot
        return mask

    def peers_in(self, mask: int) -> set[str]:
        out: set[str] = set()
        for slot in iter_bits(mask):
            node = self.by_slot[slot]
            if node is not None:
                out.add(node.id)
        return out

    # ----- recomputation -------------------------------------------------------------------
    def recompute(self, peer_ids: set[str] | None, revision: int) -> set[str]:
        """Recompute the maps of `peer_ids` (all peers when None); returns the ids whose map changed."""
        started = time.perf_counter()
        self.revision = max(self.revision, revision)
        targets = self.peers.keys() if peer_ids is None else peer_ids
        changed: set[str] = set()
        count = 0
        for pid in targets:
            node = self.peers.get(pid)
            if node is None:
                continue
            count += 1
            reach, rules, sets = self.compute(node)
            old = self.maps.get(pid)
            if old is None:
                self.maps[pid] = PeerMapState(revision, reach, rules, sets)
                changed.add(pid)
            elif old.reach != reach or old.rules != rules or old.sets != sets:
                old.serial, old.reach, old.rules, old.sets = revision, reach, rules, sets
                changed.add(pid)
        self.last_stats = ComputeStats(count, len(changed), time.perf_counter() - started)
        return changed

    def touch(self, peer_ids: set[str], revision: int) -> None:
        """Bump the serial of maps whose content changed without a reach/rule change (peer info, settings)."""
        for pid in peer_ids:
            state = self.maps.get(pid)
            if state is not None:
                state.serial = revision
                self._touched.add(pid)

    def take_touched(self) -> set[str]:
        touched, self._touched = self._touched, set()
        return touched

    # ----- mutations (each returns the peers to recompute) ---------------------------------
    def load(
        self,
        settings: SettingsNode,
        groups: dict[str, str],
        policies: list[PolicyNode],
        peers: list[PeerNode],
        revision: int,
    ) -> None:
        """Replace the whole graph (start-up, or another replica changed the store) and compute every map."""
        epoch = self.epoch + 1
        self.__init__()  # type: ignore[misc]
        self.epoch = epoch
        self.settings, self.settings_rev, self.revision = settings, revision, revision
        for gid, name in groups.items():
            self.group_names[gid] = name
            self.group_mask[gid] = 0
        for pol in policies:
            self.policies[pol.id] = pol
            for gid in pol.groups():
                self.group_refs.setdefault(gid, set()).add(pol.id)
            for pid in pol.peers():
                self.peer_refs.setdefault(pid, set()).add(pol.id)
        for node in peers:
            node.slot = len(self.by_slot)
            node.info_rev = revision
            self.by_slot.append(node)
            self.slot_ids.append(node.id)
            self.peers[node.id] = node
            bit = 1 << node.slot
            if node.approved:
                self.eligible |= bit
            for gid in node.groups:
                self.group_mask[gid] = self.group_mask.get(gid, 0) | bit
        self.recompute(None, revision)

    def set_settings(self, settings: SettingsNode, revision: int) -> set[str]:
        self.settings = settings
        self.settings_rev = revision
        return set(self.peers)

    def upsert_group(self, group_id: str, name: str) -> set[str]:
        self.group_names[group_id] = name
        self.group_mask.setdefault(group_id, 0)
        return set()

    def remove_group(self, group_id: str) -> set[str]:
        affected: set[str] = set()
        mask = self.group_mask.pop(group_id, 0)
        self.group_names.pop(group_id, None)
        for pid in self.peers_in(mask):
            node = self.peers[pid]
            affected |= self._set_groups(node, node.groups - {group_id})
        self._invalidate_policies(self.group_refs.pop(group_id, set()))
        return affected

    def upsert_peer(self, node: PeerNode, revision: int) -> set[str]:
        """Add or update a peer; public-info changes are logged so streams resend that peer's entry."""
        old = self.peers.get(node.id)
        affected: set[str] = {node.id}
        if old is None:
            node.slot = len(self.by_slot)
            self.by_slot.append(node)
            self.slot_ids.append(node.id)
            self.peers[node.id] = node
            node.info_rev = revision
            node_groups, node.groups = node.groups, frozenset()
            if node.approved:
                self.eligible |= 1 << node.slot
            affected |= self._set_groups(node, node_groups)
            self._invalidate_policies(self.policies_of(node))
            affected |= self._neighbourhood(node)
            return affected
        info_changed = (old.name, old.public_key, old.mesh_ip) != (node.name, node.public_key, node.mesh_ip)
        old.name, old.public_key, old.mesh_ip = node.name, node.public_key, node.mesh_ip
        affected |= self.peers_in(self.reach_of(old.id))
        if info_changed:
            old.info_rev = revision
            self.info_log.append((revision, old.slot))
            if len(self.info_log) > INFO_LOG_MAX:
                del self.info_log[: len(self.info_log) - INFO_LOG_MAX]
            # Its neighbours' maps carry its name/key/address, and its own map its self entry.
            self.touch(self.peers_in(self.reach_of(old.id)) | {old.id}, revision)
        if old.approved != node.approved:
            old.approved = node.approved
            self.eligible ^= 1 << old.slot
            self._invalidate_policies(self.policies_of(old))
        affected |= self._set_groups(old, node.groups)
        affected |= self._neighbourhood(old)
        return affected

    def remove_peer(self, peer_id: str) -> set[str]:
        node = self.peers.get(peer_id)
        if node is None:
            return set()
        affected = self.peers_in(self.reach_of(peer_id))
        affected |= self._set_groups(node, frozenset())
        self.eligible &= ~(1 << node.slot)
        self._invalidate_policies(self.peer_refs.get(peer_id, set()))
        for pol_id in self.peer_refs.pop(peer_id, set()):
            pol = self.policies.get(pol_id)
            if pol is not None:
                pol.src_peers -= {peer_id}
                pol.dst_peers -= {peer_id}
        self.by_slot[node.slot] = None
        del self.peers[peer_id]
        self.maps.pop(peer_id, None)
        affected.discard(peer_id)
        return affected

    def upsert_policy(self, pol: PolicyNode) -> set[str]:
        affected = self._policy_members(pol.id)
        self._unindex_policy(pol.id)
        self.policies[pol.id] = pol
        for gid in pol.groups():
            self.group_refs.setdefault(gid, set()).add(pol.id)
        for pid in pol.peers():
            self.peer_refs.setdefault(pid, set()).add(pol.id)
        self._invalidate_policies({pol.id})
        return affected | self._policy_members(pol.id)

    def remove_policy(self, policy_id: str) -> set[str]:
        affected = self._policy_members(policy_id)
        self._unindex_policy(policy_id)
        self.policies.pop(policy_id, None)
        return affected

    # ----- internals -----------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._side_cache.clear()
        self._group_cache.clear()

    def _invalidate_policies(self, policy_ids: set[str]) -> None:
        """Drop cached side masks of these policies and the group contributions that use them."""
        for pid in policy_ids:
            self._side_cache.pop((pid, "src"), None)
            self._side_cache.pop((pid, "dst"), None)
            pol = self.policies.get(pid)
            if pol is not None:
                for gid in pol.groups():
                    self._group_cache.pop(gid, None)

    def _policy_members(self, policy_id: str) -> set[str]:
        if policy_id not in self.policies:
            return set()
        return self.peers_in(self.side_mask(policy_id, "src") | self.side_mask(policy_id, "dst"))

    def _unindex_policy(self, policy_id: str) -> None:
        old = self.policies.get(policy_id)
        if old is None:
            return
        for gid in old.groups():
            self.group_refs.get(gid, set()).discard(policy_id)
        for pid in old.peers():
            self.peer_refs.get(pid, set()).discard(policy_id)
        self._invalidate_policies({policy_id})

    def _set_groups(self, node: PeerNode, groups: frozenset[str]) -> set[str]:
        if groups == node.groups:
            return set()
        bit = 1 << node.slot
        for gid in node.groups - groups:
            self.group_mask[gid] = self.group_mask.get(gid, 0) & ~bit
        for gid in groups - node.groups:
            self.group_mask[gid] = self.group_mask.get(gid, 0) | bit
        before = self.peers_in(self.reach_of(node.id))
        touched: set[str] = set()
        for gid in node.groups ^ groups:
            touched |= self.group_refs.get(gid, set())
        node.groups = groups
        self._invalidate_policies(touched)
        return before | {node.id}

    def _neighbourhood(self, node: PeerNode) -> set[str]:
        """Peers that may reach `node` under the current graph (its reach, computed fresh)."""
        reach, _, _ = self.compute(node)
        # An unapproved node reaches nobody, but policies naming it still touch the other side.
        if not node.approved:
            for pid in self.policies_of(node):
                reach |= self.side_mask(pid, "src") | self.side_mask(pid, "dst")
        return self.peers_in(reach)
