"""MeshGraph: deny-by-default semantics, and incremental updates that always equal a full recompute."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from coordinator.engine import MeshGraph, PeerNode, PolicyNode, RouteNode, Rule, SettingsNode
from coordinator.engine.bits import bit_list, iter_bits
from coordinator.engine.views import MapRenderer, SentState

SETTINGS = SettingsNode("100.64.0.0/16", "mesh.test", (), 3600)


def peer(i: int, groups: set[str], approved: bool = True) -> PeerNode:
    return PeerNode(f"p{i}", f"peer{i}", f"key{i}", f"100.64.0.{i + 1}", approved, frozenset(groups))


def policy(
    pid: str,
    src: set[str],
    dst: set[str],
    *,
    proto: str = "any",
    ports=(),
    bidir: bool = False,
    src_peers: set[str] = frozenset(),
    dst_peers: set[str] = frozenset(),
    dst_routes: set[str] = frozenset(),
    enabled: bool = True,
) -> PolicyNode:
    return PolicyNode(
        pid,
        pid,
        enabled,
        proto,
        tuple(ports),
        bidir,
        frozenset(src),
        frozenset(src_peers),
        frozenset(dst),
        frozenset(dst_peers),
        frozenset(dst_routes),
    )


def route(
    rid: str,
    prefix: str,
    *,
    peers: dict[str, int] | None = None,
    groups: dict[str, int] | None = None,
    enabled: bool = True,
    masquerade: bool = True,
) -> RouteNode:
    return RouteNode(rid, rid + "-name", prefix, masquerade, enabled, dict(peers or {}), dict(groups or {}))


def reach_names(g: MeshGraph, pid: str) -> set[str]:
    return {g.by_slot[s].name for s in bit_list(g.maps[pid].reach)}  # type: ignore[union-attr]


def small_mesh() -> MeshGraph:
    g = MeshGraph()
    g.load(
        SETTINGS,
        {"dev": "dev", "db": "db", "ci": "ci"},
        [policy("dev-db", {"dev"}, {"db"}, proto="tcp", ports=[(5432, 5432)])],
        [peer(0, {"dev"}), peer(1, {"db"}), peer(2, {"ci"})],
        1,
    )
    return g


def test_bits_helpers_agree() -> None:
    for mask in (0, 1, 0b1011, (1 << 700) | (1 << 3) | 1, random.Random(4).getrandbits(5000)):
        assert bit_list(mask) == list(iter_bits(mask))


def test_deny_by_default_and_symmetric_reach() -> None:
    g = small_mesh()
    assert reach_names(g, "p0") == {"peer1"}
    assert reach_names(g, "p1") == {"peer0"}
    assert reach_names(g, "p2") == set()  # ci: no policy, no path
    rules0 = g.maps["p0"].rules
    rules1 = g.maps["p1"].rules
    assert [(r.direction, r.protocol, r.ports) for r in rules0] == [("out", "tcp", ((5432, 5432),))]
    assert [(r.direction, r.protocol, r.ports) for r in rules1] == [("in", "tcp", ((5432, 5432),))]
    assert g.maps["p1"].sets[rules1[0].peer_set] == 1 << g.peers["p0"].slot


def test_bidirectional_gives_both_directions_and_disabled_gives_nothing() -> None:
    g = small_mesh()
    g.recompute(g.upsert_policy(policy("dev-db", {"dev"}, {"db"}, bidir=True)), 2)
    assert {r.direction for r in g.maps["p1"].rules} == {"in", "out"}
    g.recompute(g.upsert_policy(policy("dev-db", {"dev"}, {"db"}, enabled=False)), 3)
    assert reach_names(g, "p0") == set() and g.maps["p1"].rules == ()


def test_unapproved_peer_is_invisible_both_ways() -> None:
    g = small_mesh()
    g.recompute(g.upsert_peer(peer(0, {"dev"}, approved=False), 2), 2)
    assert reach_names(g, "p0") == set()
    assert reach_names(g, "p1") == set()
    g.recompute(g.upsert_peer(peer(0, {"dev"}, approved=True), 3), 3)
    assert reach_names(g, "p1") == {"peer0"}


def test_direct_peer_reference_and_removal() -> None:
    g = small_mesh()
    g.recompute(g.upsert_policy(policy("ci-to-peer1", {"ci"}, set(), dst_peers={"p1"})), 2)
    assert reach_names(g, "p2") == {"peer1"}
    assert reach_names(g, "p1") == {"peer0", "peer2"}
    affected = g.remove_peer("p1")
    g.recompute(affected, 3)
    assert reach_names(g, "p2") == set() and reach_names(g, "p0") == set()


def test_serial_only_moves_for_changed_maps() -> None:
    g = small_mesh()
    before = {pid: st.serial for pid, st in g.maps.items()}
    changed = g.recompute(g.upsert_peer(peer(3, {"ci"}), 2), 2)
    assert changed == {"p3"}  # ci has no policy: nobody else's map changes
    assert {pid: g.maps[pid].serial for pid in before} == before


ROUTE_IDS = [f"r{i}" for i in range(4)]


def routed_mesh() -> MeshGraph:
    """dev (p0) may reach the clinic LAN through gw1 (p3, named directly, metric 10) and the gateways group
    (p3 again at 50, p4 at 100); ci (p2) has nothing; p5 is an unapproved gateway."""
    g = MeshGraph()
    g.load(
        SETTINGS,
        {"dev": "dev", "db": "db", "ci": "ci", "gw": "gw"},
        [policy("dev-lan", {"dev"}, set(), proto="tcp", ports=[(443, 443)], dst_routes={"r1"})],
        [peer(0, {"dev"}), peer(1, {"db"}), peer(2, {"ci"}), peer(3, {"gw"}), peer(4, {"gw"}), peer(5, {"gw"}, False)],
        1,
        [route("r1", "198.18.40.0/24", peers={"p3": 10}, groups={"gw": 100}, masquerade=False)],
    )
    g.recompute(g.upsert_route(route("r1", "198.18.40.0/24", peers={"p3": 60}, groups={"gw": 100})), 2)
    g.recompute(g.upsert_route(route("r1", "198.18.40.0/24", peers={"p3": 10}, groups={"gw": 50})), 3)
    return g


def test_route_entries_forward_entries_and_rules() -> None:
    g = routed_mesh()
    client, gw1, gw2 = g.maps["p0"], g.maps["p3"], g.maps["p4"]
    assert [(r.id, r.prefix, [(x.peer_id, x.metric) for x in r.routers]) for r in client.routes] == [
        ("r1", "198.18.40.0/24", [("p3", 10), ("p4", 50)])  # p3: the smaller of its two metrics; p5 unapproved
    ]
    assert reach_names(g, "p0") == {"peer3", "peer4"} and client.forward == ()
    assert client.rules == (Rule("dev-lan", "route", "tcp", ((443, 443),), "", route_id="r1", prefix="198.18.40.0/24"),)
    for gw in (gw1, gw2):
        assert [(f.route_id, f.prefix, f.masquerade) for f in gw.forward] == [("r1", "198.18.40.0/24", True)]
        assert gw.routes == () and gw.rules == (
            Rule("dev-lan", "forward", "tcp", ((443, 443),), "dev-lan:src", route_id="r1", prefix="198.18.40.0/24"),
        )
        assert gw.sets == {"dev-lan:src": 1 << g.peers["p0"].slot}
    assert reach_names(g, "p3") == reach_names(g, "p4") == {"peer0"}
    for unrelated in ("p1", "p2", "p5"):  # no policy; ci; the unapproved gateway gets nothing
        assert g.maps[unrelated].routes == g.maps[unrelated].forward == () and g.maps[unrelated].reach == 0


def test_route_changes_reach_exactly_the_affected_maps() -> None:
    g = routed_mesh()
    serials = {pid: st.serial for pid, st in g.maps.items()}
    # disabling the route: client and routers change, nobody else
    changed = g.recompute(g.upsert_route(route("r1", "198.18.40.0/24", peers={"p3": 10}, enabled=False)), 4)
    assert changed == {"p0", "p3", "p4"}
    assert g.maps["p0"].routes == () and g.maps["p3"].forward == () and g.maps["p0"].reach == 0
    assert {pid: st.serial for pid, st in g.maps.items() if pid not in changed} == {
        pid: s for pid, s in serials.items() if pid not in changed
    }
    # enabled again, p3 only: p4 leaves the routers
    assert g.recompute(g.upsert_route(route("r1", "198.18.40.0/24", peers={"p3": 10})), 5) == {"p0", "p3"}
    # approving p5, in a group the route no longer names: no map changes (its own stays empty)
    assert g.recompute(g.upsert_peer(peer(5, {"gw"}), 6), 6) == set()
    # a router that also uses the route: not through itself
    g.recompute(g.upsert_policy(policy("gw-lan", {"gw"}, set(), dst_routes={"r1"})), 7)
    assert [x.peer_id for x in g.maps["p4"].routes[0].routers] == ["p3"]
    assert g.maps["p3"].routes[0].routers == ()
    # removing the route: the policy stays but routes nothing
    assert g.recompute(g.remove_route("r1"), 8) == {"p0", "p3", "p4", "p5"}
    assert all(st.routes == st.forward == () for st in g.maps.values())


def test_exit_node_is_in_the_own_map_only() -> None:
    g = routed_mesh()
    renderer = MapRenderer(g)
    sent = {pid: SentState() for pid in ("p0", "p3")}
    for pid, st in sent.items():
        renderer.full(pid, [], st)
    node = peer(0, {"dev"})
    node.exit_node = "p3"
    g.recompute(g.upsert_peer(node, 4), 4)
    assert g.take_touched() == {"p0"}
    delta = json.loads(renderer.delta("p0", [], sent["p0"]) or "{}")
    assert delta["peer"]["exit_node"] == "p3" and "routes" not in delta and "peers_upsert" not in delta
    assert renderer.delta("p3", [], sent["p3"]) is None
    assert json.loads(renderer.full("p0", []))["peer"]["exit_node"] == "p3"


def random_graph(
    rng: random.Random, n_peers: int, n_groups: int, n_policies: int, *, with_routes: bool = True
) -> MeshGraph:
    g = MeshGraph()
    groups = [f"g{i}" for i in range(n_groups)]
    peers = [peer(i, set(rng.sample(groups, rng.randint(0, 3))), rng.random() > 0.1) for i in range(n_peers)]
    ids = [p.id for p in peers]
    routes = [random_route(rng, rid, groups, ids) for rid in ROUTE_IDS[:3]] if with_routes else []
    pols = [random_policy(rng, f"pol{i}", groups, [], with_routes=with_routes) for i in range(n_policies)]
    g.load(SETTINGS, {x: x for x in groups}, pols, peers, 1, routes)
    return g


def random_policy(
    rng: random.Random, pid: str, groups: list[str], peer_ids: list[str], *, with_routes: bool = True
) -> PolicyNode:
    direct = peer_ids and rng.random() < 0.3
    routed = with_routes and rng.random() < 0.4
    only_routes = routed and rng.random() < 0.5
    return policy(
        pid,
        set(rng.sample(groups, rng.randint(1, 2))),
        set() if only_routes else set(rng.sample(groups, rng.randint(0 if direct else 1, 2))),
        proto=rng.choice(["any", "tcp", "udp"]),
        bidir=rng.random() < 0.3 and not routed,
        dst_peers={rng.choice(peer_ids)} if direct and not only_routes else frozenset(),
        dst_routes=set(rng.sample(ROUTE_IDS, rng.randint(1, 2))) if routed else frozenset(),
        enabled=rng.random() > 0.1,
    )


def random_route(rng: random.Random, rid: str, groups: list[str], peer_ids: list[str]) -> RouteNode:
    """A route with direct routing peers and/or router groups (metrics overlap, so ties are broken by id)."""
    direct = rng.sample(peer_ids, min(len(peer_ids), rng.randint(0, 2)))
    via = rng.sample(groups, rng.randint(0 if direct else 1, 2))
    return route(
        rid,
        rng.choice(["198.18.40.0/24", "198.18.41.0/24", "0.0.0.0/0"]),
        peers={p: rng.choice([10, 20, 9999]) for p in direct},
        groups={x: rng.choice([10, 20, 9999]) for x in via},
        enabled=rng.random() > 0.15,
        masquerade=rng.random() > 0.3,
    )


def copy_route(r: RouteNode) -> RouteNode:
    return RouteNode(r.id, r.name, r.prefix, r.masquerade, r.enabled, dict(r.peers), dict(r.groups))


def snapshot(g: MeshGraph) -> dict[str, Any]:
    return {pid: (st.reach, st.rules, st.sets, st.routes, st.forward) for pid, st in g.maps.items()}


@pytest.mark.parametrize("seed", range(16))
def test_incremental_updates_equal_full_recompute(seed: int) -> None:
    """Random mutation sequences: after each, the incremental maps equal a from-scratch computation,
    and every map whose content changed got a new serial."""
    rng = random.Random(seed)
    g = random_graph(rng, 40, 8, 10)
    groups = [f"g{i}" for i in range(8)]
    next_peer = 40
    for step in range(60):
        rev = step + 2
        before = snapshot(g)
        serials = {pid: st.serial for pid, st in g.maps.items()}
        op = rng.choice(["join", "leave", "regroup", "approve", "policy", "unpolicy", "route", "unroute", "exit"])
        ids = list(g.peers)
        if op == "join" or not ids:
            affected = g.upsert_peer(peer(next_peer, set(rng.sample(groups, rng.randint(0, 2)))), rev)
            next_peer += 1
        elif op == "leave":
            affected = g.remove_peer(rng.choice(ids))
        elif op in ("regroup", "approve"):
            node = g.peers[rng.choice(ids)]
            new = PeerNode(
                node.id,
                node.name,
                node.public_key,
                node.mesh_ip,
                (not node.approved) if op == "approve" else node.approved,
                frozenset(rng.sample(groups, rng.randint(0, 3))) if op == "regroup" else node.groups,
            )
            affected = g.upsert_peer(new, rev)
        elif op == "policy":
            affected = g.upsert_policy(random_policy(rng, f"pol{rng.randint(0, 12)}", groups, ids))
        elif op == "route":
            affected = g.upsert_route(random_route(rng, rng.choice(ROUTE_IDS), groups, ids))
        elif op == "unroute":
            affected = g.remove_route(rng.choice(ROUTE_IDS))
        elif op == "exit":
            node = g.peers[rng.choice(ids)]
            new = PeerNode(node.id, node.name, node.public_key, node.mesh_ip, node.approved, node.groups)
            new.exit_node = rng.choice(["", *ids])
            affected = g.upsert_peer(new, rev)
        else:
            affected = g.remove_policy(f"pol{rng.randint(0, 12)}")
        g.recompute(affected, rev)
        assert not g.take_touched() - {pid for pid, st in g.maps.items() if st.serial == rev}
        incremental = snapshot(g)
        fresh = MeshGraph()
        fresh.load(
            SETTINGS,
            dict(g.group_names),
            list(g.policies.values()),
            [PeerNode(n.id, n.name, n.public_key, n.mesh_ip, n.approved, n.groups) for n in g.peers.values()],
            rev,
            [copy_route(r) for r in g.routes.values()],
        )

        # Slots differ between graphs: compare by peer names.
        def named(graph: MeshGraph, snap: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for pid, (reach, rules, sets, routes, forward) in snap.items():
                names = lambda m: frozenset(graph.by_slot[s].name for s in bit_list(m))  # noqa: E731
                out[pid] = (names(reach), rules, {k: names(v) for k, v in sets.items()}, routes, forward)
            return out

        assert named(g, incremental) == named(fresh, snapshot(fresh)), f"seed {seed} step {step} op {op}"
        for pid, content in incremental.items():
            if pid in before and before[pid] != content:
                assert g.maps[pid].serial == rev, f"changed map of {pid} kept serial {serials[pid]}"


def apply_message(state: dict[str, Any] | None, msg: dict[str, Any]) -> dict[str, Any]:
    """A minimal client: applies a full map or a delta, as an agent would."""
    if msg["type"] == "map":
        return {
            "serial": msg["serial"],
            "peers": {p["id"]: p for p in msg["peers"]},
            "rules": msg["firewall"]["rules"],
            "sets": msg["firewall"]["sets"],
            "relays": msg["relays"],
            "routes": msg["routes"],
            "forward": msg.get("forward", []),
            "peer": msg["peer"],
        }
    assert state is not None and msg["base_serial"] == state["serial"]
    state = json.loads(json.dumps(state))
    for pid in msg.get("peers_remove", []):
        state["peers"].pop(pid)
    for entry in msg.get("peers_upsert", []):
        state["peers"][entry["id"]] = entry
    if "rules" in msg:
        state["rules"] = msg["rules"]
    for name in msg.get("sets_remove", []):
        state["sets"].pop(name)
    state["sets"].update(msg.get("sets_replace", {}))
    for part in ("relays", "routes", "forward", "peer"):
        if part in msg:
            state[part] = msg[part]
    state["serial"] = msg["serial"]
    return state


@pytest.mark.parametrize("seed", range(6))
def test_deltas_rebuild_the_full_map(seed: int) -> None:
    """A client that applies only deltas ends up with exactly the full map, whatever the changes."""
    rng = random.Random(100 + seed)
    g = random_graph(rng, 30, 6, 8)
    renderer = MapRenderer(g)
    groups = [f"g{i}" for i in range(6)]
    watchers = {pid: SentState() for pid in list(g.peers)[:10]}
    clients = {pid: apply_message(None, json.loads(renderer.full(pid, [], sent))) for pid, sent in watchers.items()}
    for step in range(40):
        rev = step + 2
        op = rng.choice(["join", "regroup", "rename", "policy", "route", "unroute", "exit"])
        ids = list(g.peers)
        if op == "join":
            affected = g.upsert_peer(peer(100 + step, set(rng.sample(groups, 2))), rev)
        elif op == "route":
            affected = g.upsert_route(random_route(rng, rng.choice(ROUTE_IDS), groups, ids))
        elif op == "unroute":
            affected = g.remove_route(rng.choice(ROUTE_IDS))
        elif op == "exit":
            node = g.peers[rng.choice(list(watchers))]
            new = PeerNode(node.id, node.name, node.public_key, node.mesh_ip, node.approved, node.groups)
            new.exit_node = rng.choice(["", *ids])
            affected = g.upsert_peer(new, rev)
        elif op == "regroup":
            node = g.peers[rng.choice(ids)]
            affected = g.upsert_peer(
                PeerNode(
                    node.id, node.name, node.public_key, node.mesh_ip, node.approved, frozenset(rng.sample(groups, 2))
                ),
                rev,
            )
        elif op == "rename":
            node = g.peers[rng.choice(ids)]
            affected = g.upsert_peer(
                PeerNode(node.id, node.name + "x", node.public_key + "x", node.mesh_ip, node.approved, node.groups), rev
            )
        else:
            affected = g.upsert_policy(random_policy(rng, f"pol{rng.randint(0, 10)}", groups, ids))
        g.recompute(affected, rev)
        g.take_touched()
        if rng.random() < 0.5:  # sometimes let changes pile up: deltas must coalesce them
            continue
        for pid, sent in watchers.items():
            text = renderer.delta(pid, [], sent)
            if text is not None:
                clients[pid] = apply_message(clients[pid], json.loads(text))
            assert clients[pid] == apply_message(None, json.loads(renderer.full(pid, []))), f"{pid} step {step}"


def test_delta_is_none_when_nothing_changed_for_that_peer() -> None:
    g = small_mesh()
    renderer = MapRenderer(g)
    sent = SentState()
    renderer.full("p2", [], sent)
    g.recompute(g.upsert_policy(policy("dev-db", {"dev"}, {"db"}, proto="udp")), 2)
    assert renderer.delta("p2", [], sent) is None  # ci is unaffected by dev->db
    delta = json.loads(renderer.delta("p0", [], SentState()) or "{}")
    assert delta["type"] in ("map", "delta")


def test_reload_renumbers_slots_so_streams_get_a_full_map() -> None:
    g = small_mesh()
    renderer = MapRenderer(g)
    sent = SentState()
    renderer.full("p1", [], sent)
    # Reload with the peers in another order: slots change, old masks are meaningless.
    peers = [PeerNode(n.id, n.name, n.public_key, n.mesh_ip, n.approved, n.groups) for n in g.peers.values()]
    g.load(SETTINGS, dict(g.group_names), list(g.policies.values()), list(reversed(peers)), g.revision)
    msg = json.loads(MapRenderer(g).delta("p1", [], sent) or "{}")
    assert msg["type"] == "map" and {p["name"] for p in msg["peers"]} == {"peer0"}
