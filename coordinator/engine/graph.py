"""MeshGraph: peers, groups and policies in memory, and each peer's network map state.

Peer sets are bit masks over peer slots, so a map is a handful of integer ORs. Every mutation
returns the ids of the peers whose map may have changed; `recompute()` re-evaluates only those
and stamps the ones that really changed with the store revision as their serial.
Reachability is symmetric (if A's map lists B, B's map lists A): this is what lets a change to a
peer find every affected map through that peer's own reach.

Routes: a policy may name routes among its destinations. Its sources then get a `RouteEntry` per
(enabled) route, with the route's eligible routing peers, and reach those peers; each routing peer gets a
`ForwardEntry` and reaches the policy's sources (so reach stays symmetric). Who routes a route is indexed
by peer (`peer_routes`) and by group (`group_routes`), and which policies name it by `route_refs`: a
peer's policies (`policies_of`) include the policies naming the routes it routes.
"""

from __future__ import annotations

import time

from coordinator.engine.bits import bit_list, iter_bits
from coordinator.engine.nodes import (
    Computed,
    ComputeStats,
    Direction,
    PeerMapState,
    PeerNode,
    PolicyNode,
    RouteNode,
    Rule,
    SettingsNode,
    _rule_key,
)
from starling_proto.routes import MAX_ROUTERS, ForwardEntry, RouteEntry, RouterRef

__all__ = [
    "ComputeStats",
    "Direction",
    "MeshGraph",
    "PeerMapState",
    "PeerNode",
    "PolicyNode",
    "RouteNode",
    "Rule",
    "SettingsNode",
]

INFO_LOG_MAX = 20_000


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
        self.routes: dict[str, RouteNode] = {}
        self.route_refs: dict[str, set[str]] = {}  # route id -> policies naming it as a destination
        self.peer_routes: dict[str, set[str]] = {}  # peer id -> routes it routes (named directly)
        self.group_routes: dict[str, set[str]] = {}  # group id -> routes its members route
        self.eligible = 0
        self.maps: dict[str, PeerMapState] = {}
        self.info_log: list[tuple[int, int]] = []  # (revision, slot) of public-info changes
        self._side_cache: dict[tuple[str, str], int] = {}
        self._group_cache: dict[str, Computed] = {}
        self._route_cache: dict[str, tuple[int, RouteEntry]] = {}
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
        for rid in self._routes_of(node):
            refs = self.route_refs.get(rid)
            if refs:
                found |= refs
        return found

    def _routes_of(self, node: PeerNode) -> set[str]:
        """The routes `node` routes (named directly or through one of its groups)."""
        found: set[str] = set(self.peer_routes.get(node.id, ()))
        for gid in node.groups:
            rids = self.group_routes.get(gid)
            if rids:
                found |= rids
        return found

    def _group_policies(self, gid: str) -> set[str]:
        """Policies that matter to a member of `gid`: those naming the group, and those naming a route it routes."""
        found = set(self.group_refs.get(gid, ()))
        for rid in self.group_routes.get(gid, ()):
            found |= self.route_refs.get(rid, set())
        return found

    def route_routers(self, route_id: str) -> tuple[int, RouteEntry]:
        """(mask of every routing peer, eligible or not; the route's entry as clients get it: its eligible
        routing peers, best metric first, at most MAX_ROUTERS). Cached until routers or approvals change."""
        cached = self._route_cache.get(route_id)
        if cached is not None:
            return cached
        route = self.routes[route_id]
        mask = 0
        for gid in route.groups:
            mask |= self.group_mask.get(gid, 0)
        for pid in route.peers:
            node = self.peers.get(pid)
            if node is not None:
                mask |= 1 << node.slot
        refs: list[tuple[int, str]] = []
        for slot in bit_list(mask & self.eligible):
            node = self.by_slot[slot]
            assert node is not None
            metrics = [m for gid, m in route.groups.items() if gid in node.groups]
            if node.id in route.peers:
                metrics.append(route.peers[node.id])
            refs.append((min(metrics), node.id))
        refs.sort()
        entry = RouteEntry(route.id, route.name, route.prefix, tuple(RouterRef(p, m) for m, p in refs[:MAX_ROUTERS]))
        cached = (mask, entry)
        self._route_cache[route_id] = cached
        return cached

    def compute(self, node: PeerNode) -> Computed:
        """The reach mask, firewall rules, rule sets, routes and forwards of one peer (pure function of the graph).

        Peers that no policy or route names directly get their map from per-group contributions, cached
        until the graph changes; the others take the general path. Both give identical results.
        """
        if not node.approved:
            return 0, (), {}, (), ()
        bit = 1 << node.slot
        if self.peer_refs.get(node.id) or self.peer_routes.get(node.id):
            reach, rules, sets, routes, forward = self._evaluate(node.groups, self.policies_of(node), bit)
        elif len(node.groups) == 1:
            (gid,) = node.groups
            reach, rules, sets, routes, forward = self._group_contribution(gid)
        else:
            reach = 0
            merged: set[Rule] = set()
            sets = {}
            route_map: dict[str, RouteEntry] = {}
            forward_map: dict[str, ForwardEntry] = {}
            for gid in node.groups:
                g_reach, g_rules, g_sets, g_routes, g_forward = self._group_contribution(gid)
                reach |= g_reach
                merged.update(g_rules)
                sets.update(g_sets)
                route_map.update((r.id, r) for r in g_routes)
                forward_map.update((f.route_id, f) for f in g_forward)
            rules = tuple(sorted(merged, key=_rule_key))
            routes = tuple(route_map[k] for k in sorted(route_map))
            forward = tuple(forward_map[k] for k in sorted(forward_map))
        if forward and routes:  # a routing peer that may also use the route: not through itself
            routes = tuple(
                RouteEntry(r.id, r.name, r.prefix, tuple(x for x in r.routers if x.peer_id != node.id))
                if any(x.peer_id == node.id for x in r.routers)
                else r
                for r in routes
            )
        return reach & self.eligible & ~bit, rules, sets, routes, forward

    def _group_contribution(self, gid: str) -> Computed:
        cached = self._group_cache.get(gid)
        if cached is None:
            cached = self._evaluate(frozenset((gid,)), self._group_policies(gid), 0)
            self._group_cache[gid] = cached
        return cached

    def _evaluate(self, groups: frozenset[str], policy_ids: set[str], bit: int) -> Computed:
        """Reach (not yet masked), rules, sets, routes and forwards for a member of `groups` whose own bit is `bit`."""
        reach = 0
        rules: set[Rule] = set()
        sets: dict[str, int] = {}
        routes: dict[str, RouteEntry] = {}
        forward: dict[str, ForwardEntry] = {}
        eligible = self.eligible
        for pid in policy_ids:
            pol = self.policies[pid]
            if not pol.enabled:
                continue
            proto, ports = pol.protocol, pol.ports
            to_peers = bool(pol.dst_groups or pol.dst_peers)
            in_src = bool(groups & pol.src_groups) or bool(self.side_mask(pid, "src") & bit)
            in_dst = bool(groups & pol.dst_groups) or bool(self.side_mask(pid, "dst") & bit)
            if in_src and to_peers:
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
            for rid in pol.dst_routes:
                route = self.routes.get(rid)
                if route is None or not route.enabled:
                    continue
                mask, entry = self.route_routers(rid)
                if in_src:
                    reach |= mask
                    routes[rid] = entry
                    rules.add(Rule(pid, "route", proto, ports, "", route_id=rid, prefix=route.prefix))
                if groups & route.groups.keys() or mask & bit:
                    src = self.side_mask(pid, "src")
                    reach |= src
                    name = pid + ":src"
                    sets[name] = src & eligible
                    forward[rid] = ForwardEntry(rid, route.name, route.prefix, route.masquerade)
                    rules.add(Rule(pid, "forward", proto, ports, name, route_id=rid, prefix=route.prefix))
        return (
            reach,
            tuple(sorted(rules, key=_rule_key)),
            sets,
            tuple(routes[k] for k in sorted(routes)),
            tuple(forward[k] for k in sorted(forward)),
        )

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
            reach, rules, sets, routes, forward = self.compute(node)
            old = self.maps.get(pid)
            if old is None:
                self.maps[pid] = PeerMapState(revision, reach, rules, sets, routes, forward)
                changed.add(pid)
            elif (
                old.reach != reach
                or old.rules != rules
                or old.sets != sets
                or old.routes != routes
                or old.forward != forward
            ):
                old.serial, old.reach, old.rules, old.sets = revision, reach, rules, sets
                old.routes, old.forward = routes, forward
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
        routes: list[RouteNode] | None = None,
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
            self._index_policy(pol)
        for route in routes or ():
            self.routes[route.id] = route
            self._index_route(route)
        for node in peers:
            node.slot = len(self.by_slot)
            node.info_rev = revision
            node.self_rev = revision
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
        self._invalidate_policies(self.group_refs.pop(group_id, set()) | self._group_policies(group_id))
        self._route_cache.clear()
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
            node.self_rev = revision
            node_groups, node.groups = node.groups, frozenset()
            if node.approved:
                self.eligible |= 1 << node.slot
            self._route_cache.clear()
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
        if old.exit_node != node.exit_node:  # only its own map shows it
            old.exit_node = node.exit_node
            old.self_rev = revision
            self.touch({old.id}, revision)
        if old.approved != node.approved:
            old.approved = node.approved
            self.eligible ^= 1 << old.slot
            self._route_cache.clear()
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
        self._invalidate_policies(self.peer_refs.get(peer_id, set()) | self.policies_of(node))
        for pol_id in self.peer_refs.pop(peer_id, set()):
            pol = self.policies.get(pol_id)
            if pol is not None:
                pol.src_peers -= {peer_id}
                pol.dst_peers -= {peer_id}
        for rid in self.peer_routes.pop(peer_id, set()):  # it routes them no more (the store cascades)
            route = self.routes.get(rid)
            if route is not None:
                route.peers.pop(peer_id, None)
        self._route_cache.clear()
        self.by_slot[node.slot] = None
        del self.peers[peer_id]
        self.maps.pop(peer_id, None)
        affected.discard(peer_id)
        return affected

    def upsert_policy(self, pol: PolicyNode) -> set[str]:
        affected = self._policy_members(pol.id)
        self._unindex_policy(pol.id)
        self.policies[pol.id] = pol
        self._index_policy(pol)
        self._invalidate_policies({pol.id})
        return affected | self._policy_members(pol.id)

    def remove_policy(self, policy_id: str) -> set[str]:
        affected = self._policy_members(policy_id)
        self._unindex_policy(policy_id)
        self.policies.pop(policy_id, None)
        return affected

    def upsert_route(self, route: RouteNode) -> set[str]:
        """Add or change a route: its clients and its routing peers, before and after, are affected."""
        affected = self._route_members(route.id)
        self._unindex_route(route.id)
        self.routes[route.id] = route
        self._index_route(route)
        self._route_cache.pop(route.id, None)
        self._invalidate_policies(self.route_refs.get(route.id, set()))
        return affected | self._route_members(route.id)

    def remove_route(self, route_id: str) -> set[str]:
        affected = self._route_members(route_id)
        self._unindex_route(route_id)
        self.routes.pop(route_id, None)
        self._route_cache.pop(route_id, None)
        return affected

    # ----- internals -----------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._side_cache.clear()
        self._group_cache.clear()
        self._route_cache.clear()

    def _invalidate_policies(self, policy_ids: set[str]) -> None:
        """Drop cached side masks of these policies and the group contributions that use them (those of
        their groups, and of the groups that route their routes)."""
        for pid in policy_ids:
            self._side_cache.pop((pid, "src"), None)
            self._side_cache.pop((pid, "dst"), None)
            pol = self.policies.get(pid)
            if pol is not None:
                for gid in pol.groups():
                    self._group_cache.pop(gid, None)
                for rid in pol.dst_routes:
                    route = self.routes.get(rid)
                    if route is not None:
                        for gid in route.groups:
                            self._group_cache.pop(gid, None)

    def _policy_members(self, policy_id: str) -> set[str]:
        if policy_id not in self.policies:
            return set()
        return self.peers_in(self._policy_mask(policy_id))

    def _policy_mask(self, policy_id: str) -> int:
        """Every peer a policy concerns: its sources and destinations, and the routing peers of its routes."""
        mask = self.side_mask(policy_id, "src") | self.side_mask(policy_id, "dst")
        for rid in self.policies[policy_id].dst_routes:
            if rid in self.routes:
                mask |= self.route_routers(rid)[0]
        return mask

    def _route_members(self, route_id: str) -> set[str]:
        """Peers whose map a change of this route may change: its routing peers and the sources of the
        policies that name it."""
        if route_id not in self.routes:
            return set()
        mask = self.route_routers(route_id)[0]
        for pid in self.route_refs.get(route_id, ()):
            if pid in self.policies:
                mask |= self.side_mask(pid, "src")
        return self.peers_in(mask)

    def _index_policy(self, pol: PolicyNode) -> None:
        for gid in pol.groups():
            self.group_refs.setdefault(gid, set()).add(pol.id)
        for pid in pol.peers():
            self.peer_refs.setdefault(pid, set()).add(pol.id)
        for rid in pol.dst_routes:
            self.route_refs.setdefault(rid, set()).add(pol.id)

    def _unindex_policy(self, policy_id: str) -> None:
        old = self.policies.get(policy_id)
        if old is None:
            return
        for gid in old.groups():
            self.group_refs.get(gid, set()).discard(policy_id)
        for pid in old.peers():
            self.peer_refs.get(pid, set()).discard(policy_id)
        for rid in old.dst_routes:
            self.route_refs.get(rid, set()).discard(policy_id)
        self._invalidate_policies({policy_id})

    def _index_route(self, route: RouteNode) -> None:
        for pid in route.peers:
            self.peer_routes.setdefault(pid, set()).add(route.id)
        for gid in route.groups:
            self.group_routes.setdefault(gid, set()).add(route.id)

    def _unindex_route(self, route_id: str) -> None:
        old = self.routes.get(route_id)
        if old is None:
            return
        self._invalidate_policies(self.route_refs.get(route_id, set()))  # while the old router groups are known
        for pid in old.peers:
            self.peer_routes.get(pid, set()).discard(route_id)
        for gid in old.groups:
            self.group_routes.get(gid, set()).discard(route_id)
        self._route_cache.pop(route_id, None)

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
            touched |= self._group_policies(gid)
            if self.group_routes.get(gid):
                self._route_cache.clear()
        node.groups = groups
        self._invalidate_policies(touched)
        return before | {node.id}

    def _neighbourhood(self, node: PeerNode) -> set[str]:
        """Peers that may reach `node` under the current graph (its reach, computed fresh)."""
        reach = self.compute(node)[0]
        # An unapproved node reaches nobody, but policies naming it still touch the other side.
        if not node.approved:
            for pid in self.policies_of(node):
                reach |= self._policy_mask(pid)
        return self.peers_in(reach)
