"""The network-map contract (starling_proto.netmap): golden fixtures, the coordinator's fast render equal
to the typed one, version refusal, malformed parts named, and deltas that rebuild the full map on the
agent's typed copy.

Regenerate the golden files after a deliberate format change (and bump MAP_VERSION if old agents would
misread it): STARLING_REGEN_GOLDEN=1 pytest tests/unit/test_map_contract.py
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from agent.firewall import FirewallError, compile_firewall
from agent.netmap import NetworkMap
from coordinator.engine import MeshGraph, PeerNode, PolicyNode, RouteNode, SettingsNode
from coordinator.engine.views import MapRenderer, SentState
from coordinator.turn import relay_credentials
from starling_proto.netmap import (
    MAP_VERSION,
    FullMap,
    MapDelta,
    UnsupportedMapVersion,
    parse_map_message,
)
from starling_proto.wire import WireFormatError

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
SETTINGS = SettingsNode("100.64.0.0/16", "mesh.test", ("stun:198.18.0.1:3478", "turn:198.18.0.1:3478"), 3600)


def key(i: int, salt: int = 0) -> str:
    return base64.b64encode(bytes([i, salt, 7, 9] * 8)).decode()


def peer(i: int, groups: set[str], approved: bool = True, salt: int = 0) -> PeerNode:
    return PeerNode(f"p{i}", f"peer{i}", key(i, salt), f"100.64.0.{i + 1}", approved, frozenset(groups))


def policy(
    pid: str,
    src: set[str],
    dst: set[str],
    proto: str = "any",
    ports: tuple[Any, ...] = (),
    routes: frozenset[str] = frozenset(),
) -> PolicyNode:
    return PolicyNode(
        pid, pid, True, proto, ports, False, frozenset(src), frozenset(), frozenset(dst), frozenset(), routes
    )


def golden_mesh() -> MeshGraph:
    """dev -> db (tcp), ci -> db (any), and dev -> the route `lan` (198.18.40.0/24, tcp/443) through peer1
    (named, metric 10) and the ci group (peer2, metric 20): peer1's map forwards for dev."""
    g = MeshGraph()
    g.load(
        SETTINGS,
        {"dev": "dev", "db": "db", "ci": "ci"},
        [
            policy("dev-db", {"dev"}, {"db"}, "tcp", ((5432, 5432), (8000, 8100))),
            policy("ci-all", {"ci"}, {"db"}),
            policy("dev-lan", {"dev"}, set(), "tcp", ((443, 443),), frozenset({"r1"})),
        ],
        [peer(0, {"dev"}), peer(1, {"db"}), peer(2, {"ci"}), peer(3, {"dev"}, approved=False)],
        1,
        [RouteNode("r1", "lan", "198.18.40.0/24", True, True, {"p1": 10}, {"ci": 20})],
    )
    return g


def relays() -> tuple[Any, ...]:
    return relay_credentials("secret", "peer1", SETTINGS.turn_servers, 3600, now=1_800_000_000)


def rendered_golden() -> tuple[str, str]:
    """(full map of p1, delta of p1 after p0 rotated its key and a policy changed)."""
    g = golden_mesh()
    renderer = MapRenderer(g)
    sent = SentState()
    full = renderer.full("p1", relays(), sent)
    affected = g.upsert_peer(peer(0, {"dev"}, salt=1), 2) | g.upsert_policy(policy("ci-all", {"ci"}, {"db"}, "icmp"))
    g.recompute(affected, 2)
    delta = renderer.delta("p1", relays(), sent)
    assert delta is not None
    return full, delta


def golden(name: str, text: str) -> dict[str, Any]:
    path = GOLDEN / name
    if os.environ.get("STARLING_REGEN_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json.loads(text), indent=2) + "\n")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_the_coordinator_renders_the_golden_documents() -> None:
    full, delta = rendered_golden()
    assert json.loads(full) == golden("map_full_v1.json", full)
    assert json.loads(delta) == golden("map_delta_v1.json", delta)
    assert json.loads(full)["version"] == MAP_VERSION == json.loads(delta)["version"]


def test_golden_documents_round_trip_through_the_typed_structures() -> None:
    full_doc = json.loads((GOLDEN / "map_full_v1.json").read_text())
    delta_doc = json.loads((GOLDEN / "map_delta_v1.json").read_text())
    full = FullMap.from_wire(full_doc)
    delta = MapDelta.from_wire(delta_doc)
    assert full.to_wire() == full_doc and delta.to_wire() == delta_doc
    assert full.peer.name == "peer1" and not [p for p in full.peers if p.name == "peer3"]  # unapproved: unreachable
    assert {r.protocol for r in full.firewall.rules} == {"tcp", "any"} and full.relays[0].expires_at > 1_800_000_000
    assert delta.rules is not None and {r.protocol for r in delta.rules} == {"tcp", "icmp"}
    assert [p.public_key for p in delta.peers_upsert] == [key(0, 1)]


def test_the_fast_render_is_byte_for_byte_the_typed_render() -> None:
    full, _ = rendered_golden()
    assert FullMap.from_wire(json.loads(full)).to_json() == full


def test_an_unknown_map_version_is_refused_with_a_clear_reason() -> None:
    doc = json.loads((GOLDEN / "map_full_v1.json").read_text())
    for version in (2, 0):
        with pytest.raises(UnsupportedMapVersion, match=f"map version {version} is not supported.*upgrade the agent"):
            parse_map_message({**doc, "version": version})
    with pytest.raises(WireFormatError, match="version: must be an integer"):
        parse_map_message({**doc, "version": "1"})
    legacy = {k: v for k, v in doc.items() if k != "version"}  # written before the field existed
    assert parse_map_message(legacy) == parse_map_message(doc)


def test_unknown_keys_are_ignored_outside_the_firewall_and_refused_inside_it() -> None:
    doc = json.loads((GOLDEN / "map_full_v1.json").read_text())
    later = {**doc, "future": {"x": 1}, "peer": {**doc["peer"], "tags": ["a"]}}
    assert parse_map_message(later) == parse_map_message(doc)
    rules = doc["firewall"]["rules"]
    widened = {**doc, "firewall": {**doc["firewall"], "rules": [{**rules[0], "source_ports": [[1, 2]]}]}}
    with pytest.raises(WireFormatError, match=r"firewall.rules\[0\]: unknown keys source_ports"):
        parse_map_message(widened)


def _mutations(doc: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    p0 = doc["peers"][0]
    return [
        ({**doc, "type": "maps"}, "type"),
        ({**doc, "serial": "5"}, "map.serial"),
        ({**doc, "peer": None}, "peer"),
        ({**doc, "peer": {**doc["peer"], "public_key": "AAAA"}}, "peer.public_key"),
        ({**doc, "peer": {**doc["peer"], "approved": "yes"}}, "peer.approved"),
        ({**doc, "peers": [{**p0, "mesh_ip": "198.18.0.1"}]}, "peers[0].mesh_ip"),
        ({**doc, "peers": [{**p0, "id": ""}]}, "peers[0].id"),
        ({**doc, "peers": [{**p0, "allowed_ips": "100.64.0.1/32"}]}, "peers[0].allowed_ips"),
        ({**doc, "peers": {"p0": p0}}, "peers"),
        ({**doc, "relays": [{"urls": "turn:x"}]}, "relays[0].urls"),
        ({**doc, "signal": {"url": 5}}, "signal.url"),
        ({**doc, "firewall": {**doc["firewall"], "sets": {"s": ["100.64.0.300"]}}}, "firewall.sets['s']"),
    ]


def test_malformed_parts_are_refused_naming_the_field() -> None:
    doc = json.loads((GOLDEN / "map_full_v1.json").read_text())
    for bad, where in _mutations(doc):
        with pytest.raises(WireFormatError) as info:
            parse_map_message(bad)
        assert info.value.field == where, (where, str(info.value))


def test_a_bad_map_changes_nothing_on_the_agent() -> None:
    full, _ = rendered_golden()
    m = NetworkMap()
    m.apply(parse_map_message(json.loads(full)))
    before = m.to_full()
    bad = json.loads(full)
    bad["firewall"]["rules"][0]["protocol"] = "gre"
    with pytest.raises(WireFormatError, match="unknown protocol 'gre'"):
        m.apply(parse_map_message(bad))
    assert m.to_full() == before


def test_the_firewall_compiles_from_the_typed_section() -> None:
    full, _ = rendered_golden()
    m = NetworkMap()
    m.apply(parse_map_message(json.loads(full)))
    section = m.firewall()
    model = compile_firewall(section, "wt0", m.forward)
    wire = json.loads(full)
    assert model == compile_firewall(wire["firewall"], "wt0", wire["forward"])  # the wire form compiles the same
    assert model.rules_fwd and m.forward  # the golden map's routing peer forwards for dev
    assert model.rule_count == len({(r.direction, r.protocol, r.ports, r.peer_set) for r in section.rules})
    orphan = NetworkMap(serial=1, me=m.me, rules=section.rules, sets={})  # a delta removed the rules' sets
    with pytest.raises(FirewallError, match="unknown peer_set"):
        compile_firewall(orphan.firewall(), "wt0")


def held(m: NetworkMap) -> tuple[Any, ...]:
    """What an agent holds, with peers as a mapping (their order in a map carries no meaning)."""
    return (m.serial, m.me, m.peers, m.rules, m.sets, m.dns, m.signal, m.relays, m.version)


@pytest.mark.parametrize("seed", range(4))
def test_typed_deltas_rebuild_the_full_map_on_the_agent(seed: int) -> None:
    """An agent that applies only parsed deltas holds exactly what a parsed full map says, whatever changed."""
    rng = random.Random(500 + seed)
    groups = [f"g{i}" for i in range(5)]
    g = MeshGraph()
    g.load(
        SETTINGS,
        {x: x for x in groups},
        [policy(f"pol{i}", {rng.choice(groups)}, {rng.choice(groups)}) for i in range(6)],
        [peer(i, set(rng.sample(groups, 2))) for i in range(20)],
        1,
    )
    renderer = MapRenderer(g)
    watchers = {pid: SentState() for pid in list(g.peers)[:6]}
    agents = {pid: NetworkMap() for pid in watchers}
    for pid, sent in watchers.items():
        agents[pid].apply(parse_map_message(json.loads(renderer.full(pid, relays(), sent))))
    for step in range(30):
        rev = step + 2
        ids = list(g.peers)
        op = rng.choice(["join", "rekey", "regroup", "policy"])
        if op == "join":
            affected = g.upsert_peer(peer(100 + step, set(rng.sample(groups, 2))), rev)
        elif op in ("rekey", "regroup"):
            node = g.peers[rng.choice(ids)]
            i = int(node.id[1:])
            changed = peer(i, set(rng.sample(groups, 2)), salt=step + 1) if op == "rekey" else node
            if op == "regroup":
                changed = PeerNode(
                    node.id, node.name, node.public_key, node.mesh_ip, True, frozenset(rng.sample(groups, 2))
                )
            affected = g.upsert_peer(changed, rev)
        else:
            src, dst = rng.choice(groups), rng.choice(groups)
            affected = g.upsert_policy(
                policy(f"pol{rng.randint(0, 8)}", {src}, {dst}, "tcp", ((rng.randint(1, 9000),) * 2,))
            )
        g.recompute(affected, rev)
        g.take_touched()
        for pid, sent in watchers.items():
            text = renderer.delta(pid, relays(), sent)
            if text is not None:
                agents[pid].apply(parse_map_message(json.loads(text)))
            fresh = NetworkMap()
            fresh.apply(parse_map_message(json.loads(renderer.full(pid, relays()))))
            assert held(agents[pid]) == held(fresh), f"{pid} step {step} ({op})"
