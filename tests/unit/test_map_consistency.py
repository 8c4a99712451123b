"""Coordinator-side audit: both ends of every path receive matching firewall rules."""

from __future__ import annotations

import random
import time

import pytest
from test_graph import SETTINGS, peer, policy, random_graph, random_policy, small_mesh

from coordinator.engine import MeshGraph, PeerMapState, PeerNode, Rule
from coordinator.engine.consistency import Violation, check_consistency


def kinds(violations: list[Violation]) -> set[tuple[str, str, str]]:
    return {(v.kind, v.peer, v.other) for v in violations}


def test_small_mesh_is_consistent() -> None:
    assert check_consistency(small_mesh()) == []


def test_bidirectional_direct_and_self_policies_are_consistent() -> None:
    g = small_mesh()
    g.recompute(g.upsert_policy(policy("dev-db", {"dev"}, {"db"}, proto="udp", ports=[(53, 53)], bidir=True)), 2)
    g.recompute(g.upsert_policy(policy("ci-p1", {"ci"}, set(), dst_peers={"p1"})), 3)
    g.recompute(g.upsert_policy(policy("dev-dev", {"dev"}, {"dev"})), 4)  # a peer in its own set
    g.recompute(g.upsert_peer(peer(3, {"dev"}), 5), 5)
    assert check_consistency(g) == []


@pytest.mark.parametrize("seed", range(10))
def test_engine_maps_are_always_consistent(seed: int) -> None:
    rng = random.Random(seed)
    g = random_graph(rng, 60, 8, 12)
    assert check_consistency(g) == []
    groups = [f"g{i}" for i in range(8)]
    for step in range(40):
        rev = step + 2
        ids = list(g.peers)
        op = rng.choice(["join", "leave", "regroup", "approve", "policy", "unpolicy"])
        if op == "join":
            affected = g.upsert_peer(peer(100 + step, set(rng.sample(groups, 2))), rev)
        elif op == "leave":
            affected = g.remove_peer(rng.choice(ids))
        elif op in ("regroup", "approve"):
            n = g.peers[rng.choice(ids)]
            affected = g.upsert_peer(
                PeerNode(
                    n.id,
                    n.name,
                    n.public_key,
                    n.mesh_ip,
                    (not n.approved) if op == "approve" else n.approved,
                    frozenset(rng.sample(groups, 2)) if op == "regroup" else n.groups,
                ),
                rev,
            )
        elif op == "policy":
            affected = g.upsert_policy(random_policy(rng, f"pol{rng.randint(0, 14)}", groups, ids))
        else:
            affected = g.remove_policy(f"pol{rng.randint(0, 14)}")
        g.recompute(affected, rev)
        assert check_consistency(g) == [], f"seed {seed} step {step} op {op}"


def db_rule(g: MeshGraph) -> Rule:
    return g.maps["p1"].rules[0]


def test_missing_mirror_rule_is_caught() -> None:
    g = small_mesh()
    g.maps["p1"].rules = ()
    found = check_consistency(g)
    assert kinds(found) == {("missing_mirror", "p0", "p1")}
    assert found[0].describe() == ("p0 policy dev-db out tcp/5432 toward p1, but p1 has no matching in rule")


def test_mismatched_ports_are_caught_on_both_ends() -> None:
    g = small_mesh()
    r = db_rule(g)
    g.maps["p1"].rules = (Rule(r.policy_id, r.direction, r.protocol, ((5432, 5433),), r.peer_set),)
    assert kinds(check_consistency(g)) == {("missing_mirror", "p0", "p1"), ("missing_mirror", "p1", "p0")}


def test_peer_missing_from_the_other_ends_set_is_caught() -> None:
    g = small_mesh()
    g.maps["p1"].sets[db_rule(g).peer_set] = 0
    assert kinds(check_consistency(g)) == {("missing_mirror", "p0", "p1")}


def test_missing_set_unknown_peer_and_no_tunnel() -> None:
    g = small_mesh()
    r = db_rule(g)
    g.maps["p1"].rules = (Rule(r.policy_id, r.direction, r.protocol, r.ports, "nope"),)
    found = kinds(check_consistency(g))
    assert ("missing_set", "p1", "nope") in found and ("missing_mirror", "p0", "p1") in found

    g = small_mesh()
    out_set = g.maps["p0"].rules[0].peer_set
    g.maps["p0"].sets[out_set] |= 1 << g.peers["p2"].slot  # ci gets in dev's out set, without a tunnel
    found = kinds(check_consistency(g))
    assert found == {("no_tunnel", "p0", "p2"), ("missing_mirror", "p0", "p2")}

    g = small_mesh()
    g.maps["p0"].sets[out_set] |= 1 << 40  # a slot that holds no peer
    assert kinds(check_consistency(g)) == {("unknown_peer", "p0", "40")}


def redundant(state: PeerMapState, rule: Rule) -> bool:
    """Another rule of the same policy, direction, protocol and ports covers this one's set (a peer on both
    sides of a bidirectional policy): dropping it changes nothing."""
    mask = state.sets.get(rule.peer_set, 0)
    return any(
        other is not rule
        and (other.policy_id, other.direction, other.protocol, other.ports, other.route_id)
        == (rule.policy_id, rule.direction, rule.protocol, rule.ports, rule.route_id)
        and state.sets.get(other.peer_set, 0) & mask == mask
        for other in state.rules
    )


@pytest.mark.parametrize("seed", range(8))
def test_a_corrupted_random_map_is_caught(seed: int) -> None:
    rng = random.Random(1000 + seed)
    g = random_graph(rng, 50, 6, 10)
    candidates = [
        (pid, i)
        for pid, st in g.maps.items()
        for i, r in enumerate(st.rules)
        if (
            st.sets.get(r.peer_set, 0) & ~(1 << g.peers[pid].slot)
            or (r.direction == "route" and any(e.routers for e in st.routes if e.id == r.route_id))
        )
        and not redundant(st, r)
    ]
    if not candidates:
        pytest.skip("this random graph has no path")
    pid, i = rng.choice(candidates)
    state = g.maps[pid]
    dropped = state.rules[i]
    state.rules = state.rules[:i] + state.rules[i + 1 :]
    found = check_consistency(g)
    assert found, "dropping a rule must break symmetry"
    assert all(v.policy_id == dropped.policy_id for v in found)
    assert any(v.peer != pid and v.other == pid for v in found)


def test_check_cost_on_a_large_graph() -> None:
    g = MeshGraph()
    groups = {f"g{i}": f"g{i}" for i in range(20)}
    rng = random.Random(7)
    pols = [
        policy(f"pol{i}", {f"g{rng.randrange(20)}"}, {f"g{rng.randrange(20)}"}, bidir=i % 3 == 0) for i in range(40)
    ]
    peers = [peer(i, {f"g{rng.randrange(20)}", f"g{rng.randrange(20)}"}) for i in range(3000)]
    g.load(SETTINGS, groups, pols, peers, 1)
    started = time.perf_counter()
    assert check_consistency(g) == []
    print(f"3,000 peers, 40 policies: consistency check {time.perf_counter() - started:.2f} s")
