"""Firewall compilation: validation (a bad map is rejected whole), set-name mapping, nft text and
JSON rendering, and diffs (checked against a small in-memory model of nft's JSON semantics)."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from agent.firewall import CompiledRuleset, FirewallError, compile_firewall, diff, full_build, nft_set_name
from agent.firewall.model import guard_ruleset, merge_ports
from agent.firewall.nftjson import rule_expr
from agent.firewall.state import parse_listing, problems, rule_token

SRC = "0123456789abcdef01234567:src"
DST = "0123456789abcdef01234567:dst"


def rule(
    direction: str = "in",
    protocol: str = "tcp",
    ports: Any = ((5432, 5432),),
    peer_set: str = SRC,
    policy_id: str = "0123456789abcdef01234567",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "policy_id": policy_id,
        "direction": direction,
        "action": "accept",
        "protocol": protocol,
        "ports": [list(p) for p in ports],
        "peer_set": peer_set,
        **extra,
    }


def fw(*rules: dict[str, Any], sets: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {
        "default_action": "drop",
        "rules": list(rules),
        "sets": sets if sets is not None else {SRC: ["100.64.0.7", "100.64.0.9"], DST: ["100.64.0.8"]},
    }


# ----- compilation -------------------------------------------------------------------------------
def test_set_names_are_deterministic_valid_nft_identifiers() -> None:
    name = nft_set_name(SRC)
    assert name == nft_set_name(SRC) != nft_set_name(DST)
    assert name.startswith("s_") and len(name) == 18 and name.replace("_", "").isalnum()


def test_compile_maps_rules_to_chains_and_keeps_only_used_sets() -> None:
    model = compile_firewall(fw(rule("in"), rule("out", "icmp", ()), sets={SRC: ["100.64.0.7"], DST: []}), "wt0")
    assert [r.direction for r in model.rules_in] == ["in"] and [r.protocol for r in model.rules_out] == ["icmp"]
    assert set(model.sets) == {nft_set_name(SRC)}  # DST is valid but unused: not installed
    assert model.set_names == {nft_set_name(SRC): (SRC,)}
    assert (model.rule_count, model.element_count) == (2, 1)


def test_text_rendering() -> None:
    model = compile_firewall(fw(rule(ports=[(22, 22), (8000, 8100)]), rule("out", "any", ())), "wt0")
    text = model.render_text()
    s = nft_set_name(SRC)
    assert f"ip saddr @{s} tcp dport {{ 22, 8000-8100 }} accept" in text
    assert f"ip daddr @{s} accept" in text
    assert 'iifname "wt0" jump mesh_in' in text and 'oifname "wt0" drop' in text
    assert "elements = { 100.64.0.7, 100.64.0.9 }" in text
    assert "ct state established,related accept" in text
    guard = guard_ruleset("wt0").render_text()
    assert "ct state" not in guard and "set " not in guard


def test_json_rule_expressions() -> None:
    model = compile_firewall(
        fw(
            rule(ports=[(5432, 5432)]),
            rule(protocol="udp", ports=[(1, 10), (20, 20)]),
            rule("out", "icmp", ()),
            rule("out", "any", ()),
        ),
        "wt0",
    )
    s = "@" + nft_set_name(SRC)
    exprs = {(r.direction, r.protocol): rule_expr(r) for r in model.rules_in + model.rules_out}
    assert exprs["in", "tcp"] == [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": s}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 5432}},
        {"accept": None},
    ]
    assert exprs["in", "udp"][1]["match"]["right"] == {"set": [{"range": [1, 10]}, 20]}
    assert exprs["out", "icmp"][0]["match"]["left"]["payload"]["field"] == "daddr"
    assert exprs["out", "icmp"][1] == {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "icmp"}}
    assert exprs["out", "any"] == [exprs["out", "any"][0], {"accept": None}]


def test_ports_are_merged_and_duplicate_rules_collapse() -> None:
    assert merge_ports([(10, 20), (15, 30), (31, 31), (40, 40), (1, 1)]) == ((1, 1), (10, 31), (40, 40))
    model = compile_firewall(fw(rule(ports=[(80, 80), (80, 90)]), rule(ports=[(80, 90)])), "wt0")
    assert len(model.rules_in) == 1 and model.rules_in[0].ports == ((80, 90),)


def test_comment_names_policy_and_is_sanitized() -> None:
    model = compile_firewall(fw(rule(policy_id='evil" drop; #')), "wt0")
    comment = model.rules_in[0].comment
    assert comment.startswith("evil_ drop_ _") and '"' not in comment and ";" not in comment


BAD = [
    (fw(rule(protocol="sctp")), "unknown protocol 'sctp'"),
    (fw(rule(ports=[(0, 10)])), "port 0 is outside 1-65535"),
    (fw(rule(ports=[(10, 65536)])), "port 65536 is outside 1-65535"),
    (fw(rule(ports=[(90, 80)])), "range start 90 is greater than its end 80"),
    (fw(rule(ports=[(True, 80)])), "is not an integer"),
    (fw(rule(ports=[("80", 80)])), "is not an integer"),
    (fw(rule(ports=[[80]])), "is not a [start, end] pair"),
    (fw(rule(peer_set="nope:src")), "unknown peer_set 'nope:src'"),
    (fw(rule(), sets={SRC: ["100.64.0.300"]}), "is not an IPv4 address"),
    (fw(rule(), sets={SRC: ["100.064.0.1"]}), "is not an IPv4 address"),
    (fw(rule(), sets={SRC: ["100.64.0.1/32"]}), "is not an IPv4 address"),
    (fw(rule(), sets={SRC: ["fd00::1"]}), "is not an IPv4 address"),
    (fw(rule(), sets={SRC: ["198.18.0.1"]}), "outside the mesh range"),
    (fw(rule(), sets={SRC: [7]}), "is not a string"),
    (fw(rule(), sets={SRC: "100.64.0.1"}), "must be a list"),
    (fw(rule(direction="both")), "unknown direction 'both'"),
    (fw(rule(protocol="icmp", ports=[(1, 1)])), "ports are only allowed with tcp or udp, not icmp"),
    (fw(rule(protocol="any", ports=[(1, 1)])), "ports are only allowed with tcp or udp, not any"),
    (fw(rule(action="drop")), "unknown action 'drop'"),
    (fw(rule(source_ports=[[1, 2]])), "unknown keys source_ports"),
    (fw(rule(policy_id="")), "policy_id: must be a non-empty string"),
    ({**fw(rule()), "default_action": "accept"}, "default_action"),
    ({**fw(rule()), "extra": 1}, "unknown keys extra"),
    ({"rules": {}, "sets": {}}, "rules: must be a list"),
    ({"rules": ["x"], "sets": {}}, "must be an object"),
    ("drop", "must be an object"),
]


@pytest.mark.parametrize(("firewall", "reason"), BAD, ids=[b[1][:40] for b in BAD])
def test_malformed_maps_are_rejected_with_a_clear_reason(firewall: Any, reason: str) -> None:
    with pytest.raises(FirewallError) as info:
        compile_firewall(firewall, "wt0")
    assert reason in str(info.value)


def test_one_bad_rule_among_good_ones_rejects_the_map() -> None:
    good = [rule(), rule("out", "udp", [(53, 53)])]
    with pytest.raises(FirewallError, match=r"rules\[2\]"):
        compile_firewall(fw(*good, rule(ports=[(0, 1)])), "wt0")


@pytest.mark.parametrize("name", ["", "a" * 16, 'wt"0', "wt0 ", "wt*"])
def test_bad_interface_names(name: str) -> None:
    with pytest.raises(FirewallError, match="interface"):
        compile_firewall(fw(), name)


# ----- a tiny model of nft's JSON semantics -------------------------------------------------------
class FakeKernel:
    """Applies libnftables JSON batches atomically to an in-memory table; lists it like `nft -j`."""

    def __init__(self) -> None:
        self.table: dict[str, Any] | None = None
        self.batches: list[list[dict[str, Any]]] = []
        self.failing = False
        self.handle = 0

    def apply(self, commands: list[dict[str, Any]]) -> None:
        self.batches.append(commands)
        if self.failing:
            raise FirewallError("nft rejected the update (exit 1): Error: simulated failure")
        t = copy.deepcopy(self.table)
        for cmd in commands:
            ((verb, obj),) = cmd.items()
            ((kind, body),) = obj.items()
            t = self._do(t, verb, kind, body)
        self.table = t

    def _do(self, t: dict[str, Any] | None, verb: str, kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
        fail = FirewallError(f"nft rejected the update: {verb} {kind} {body.get('name')}: No such file or directory")
        if kind == "table":
            if verb == "add":
                return t or {"sets": {}, "chains": {}, "rules": {}, "attrs": {}}
            return None  # delete
        if t is None:
            raise fail
        name = body.get("name", "")
        if kind == "set" and verb == "add":
            t["sets"].setdefault(name, set())
        elif kind == "set" and verb == "delete":
            used = any(f"@{name}" in json.dumps(r) for rs in t["rules"].values() for r in rs)
            if name not in t["sets"] or used:
                raise fail
            del t["sets"][name]
        elif kind == "element":
            if name not in t["sets"]:
                raise fail
            if verb == "add":
                t["sets"][name] |= set(body["elem"])
            else:
                if not set(body["elem"]) <= t["sets"][name]:
                    raise fail
                t["sets"][name] -= set(body["elem"])
        elif kind == "chain" and verb == "add":
            t["chains"][name] = {k: v for k, v in body.items() if k not in ("family", "table")}
            t["rules"].setdefault(name, [])
        elif kind == "chain" and verb == "flush":
            if name not in t["chains"]:
                raise fail
            t["rules"][name] = []
        elif kind == "chain" and verb == "delete":  # nft refuses a chain that has rules or is jumped to
            jumped = any(f'"target": "{name}"' in json.dumps(r) for rs in t["rules"].values() for r in rs)
            if name not in t["chains"] or t["rules"][name] or jumped:
                raise fail
            del t["chains"][name], t["rules"][name]
        elif kind == "rule" and verb == "add":
            targets = [m["jump"]["target"] for m in body["expr"] if "jump" in m]
            if body["chain"] not in t["chains"] or any(target not in t["chains"] for target in targets):
                raise fail
            for ref in [m["match"]["right"] for m in body["expr"] if "match" in m]:
                if isinstance(ref, str) and ref.startswith("@") and ref[1:] not in t["sets"]:
                    raise fail
            self.handle += 1
            t["rules"][body["chain"]].append({k: v for k, v in body.items() if k in ("expr", "comment")})
        else:  # pragma: no cover
            raise AssertionError(f"unexpected command {verb} {kind}")
        return t

    def list_table(self) -> Any | None:
        if self.table is None:
            return None
        table = {"family": "inet", "name": "starling", "handle": 1, **self.table["attrs"]}
        out: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}, {"table": table}]
        for name, elems in self.table["sets"].items():
            body = {"family": "inet", "name": name, "table": "starling", "type": "ipv4_addr", "handle": 2}
            if elems:
                body["elem"] = sorted(elems)
            out.append({"set": body})
        for attrs in self.table["chains"].values():
            out.append({"chain": {"family": "inet", "table": "starling", **attrs, "handle": 3}})
        for chain, rules in self.table["rules"].items():
            for r in rules:
                out.append({"rule": {"family": "inet", "table": "starling", "chain": chain, "handle": 4, **r}})
        return {"nftables": out}


def installed(model: CompiledRuleset | None, *steps: CompiledRuleset) -> FakeKernel:
    kernel = FakeKernel()
    prev = None
    for step in ([model] if model else []) + list(steps):
        kernel.apply(diff(prev, step).commands)
        prev = step
    return kernel


def listing_of(kernel: FakeKernel) -> Any:
    return parse_listing(kernel.list_table())


def test_full_build_replaces_any_table_atomically() -> None:
    plan = full_build(compile_firewall(fw(rule()), "wt0"))
    assert plan.full and plan.commands[:3] == [
        {"add": {"table": {"family": "inet", "name": "starling"}}},
        {"delete": {"table": {"family": "inet", "name": "starling"}}},
        {"add": {"table": {"family": "inet", "name": "starling"}}},
    ]
    chains = [c["add"]["chain"] for c in plan.commands if "chain" in c.get("add", {})]
    assert [(c["name"], c.get("hook")) for c in chains] == [
        ("mesh_in", None),
        ("mesh_out", None),
        ("input", "input"),
        ("output", "output"),
        ("forward", "forward"),
    ]


def test_adding_one_peer_is_one_element_add() -> None:
    old = compile_firewall(fw(rule()), "wt0")
    new = compile_firewall(fw(rule(), sets={SRC: ["100.64.0.7", "100.64.0.9", "100.64.1.1"], DST: []}), "wt0")
    plan = diff(old, new)
    assert plan.commands == [
        {"add": {"element": {"family": "inet", "table": "starling", "name": nft_set_name(SRC), "elem": ["100.64.1.1"]}}}
    ]
    assert (plan.full, plan.elements_added, plan.chains_rebuilt) == (False, 1, ())
    assert diff(new, new).empty


def test_removing_peers_and_rules_deletes_elements_then_sets_after_the_flush() -> None:
    old = compile_firewall(fw(rule(), rule("out", peer_set=DST)), "wt0")
    new = compile_firewall(fw(rule(), sets={SRC: ["100.64.0.7"], DST: []}), "wt0")
    plan = diff(old, new)
    verbs = [next(iter(c)) + " " + next(iter(next(iter(c.values())))) for c in plan.commands]
    assert verbs == ["delete element", "flush chain", "add rule", "add rule", "delete set"]
    assert plan.chains_rebuilt == ("mesh_out",) and plan.sets_removed == 1


def test_interface_change_and_first_install_are_full_builds() -> None:
    model = compile_firewall(fw(rule()), "wt0")
    assert diff(None, model).full
    assert diff(compile_firewall(fw(rule()), "wt1"), model).full


def random_model(rng: random.Random) -> CompiledRuleset:
    names = [f"{i:024x}:{side}" for i in range(4) for side in ("src", "dst")]
    sets = {n: [f"100.64.0.{rng.randint(1, 30)}" for _ in range(rng.randint(0, 8))] for n in names}
    rules = []
    for _ in range(rng.randint(0, 6)):
        proto = rng.choice(["any", "tcp", "udp", "icmp"])
        ports = [(a, a + rng.randint(0, 5)) for a in rng.sample(range(1, 100), rng.randint(0, 2))]
        rules.append(
            rule(rng.choice(["in", "out"]), proto, ports if proto in ("tcp", "udp") else (), rng.choice(names))
        )
    return compile_firewall(fw(*rules, sets=sets), "wt0")


@pytest.mark.parametrize("seed", range(30))
def test_a_diff_lands_exactly_where_a_full_build_does(seed: int) -> None:
    rng = random.Random(seed)
    models = [random_model(rng) for _ in range(6)]
    models.insert(rng.randint(0, 5), guard_ruleset("wt0"))
    kernel = installed(guard_ruleset("wt0"), *models)
    assert listing_of(kernel) == listing_of(installed(models[-1]))


# ----- listings and drift descriptions ------------------------------------------------------------
def test_our_own_writes_are_not_drift() -> None:
    model = compile_firewall(fw(rule(), rule("out", "icmp", ()), rule(ports=[(1, 5), (7, 7)])), "wt0")
    assert problems(listing_of(installed(guard_ruleset("wt0"), model)), model) == []
    guard = guard_ruleset("wt0")
    assert problems(listing_of(installed(guard)), guard) == []


def test_drift_is_described() -> None:
    model = compile_firewall(fw(rule(), rule("out", "icmp", ())), "wt0")
    kernel = installed(model)
    assert kernel.table is not None
    kernel.table["sets"][nft_set_name(SRC)].add("100.64.9.9")
    kernel.table["rules"]["mesh_in"] = []
    kernel.table["rules"]["mesh_out"].insert(0, {"expr": [{"accept": None}]})
    found = problems(listing_of(kernel), model)
    assert f"set {nft_set_name(SRC)} ({SRC}): 1 address added (100.64.9.9)" in found
    assert "chain mesh_in was flushed (3 rules gone)" in found
    assert any(p.startswith("chain mesh_out rules changed (1 unexpected rule, 0 missing rules") for p in found)
    assert problems(None, model) == ["table inet starling was deleted"]
    kernel.table["sets"]["evil"] = set()
    assert "unexpected set evil was added" in problems(listing_of(kernel), model)


def test_handles_counters_and_cosmetic_output_differences_are_not_drift() -> None:
    model = compile_firewall(fw(rule()), "wt0")
    doc = installed(model).list_table()
    for item in doc["nftables"]:
        if "rule" in item:
            item["rule"]["handle"] += 100
            for m in item["rule"]["expr"]:
                match = m.get("match", {})
                if match.get("left") == {"ct": {"key": "state"}}:
                    match["op"], match["right"] = "==", {"set": ["related", "established"]}
                if match.get("right") == 5432:
                    match["right"] = {"set": [5432]}
    assert problems(parse_listing(doc), model) == []


def test_rule_tokens() -> None:
    s = {"payload": {"protocol": "ip", "field": "saddr"}}
    icmp_meta = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "icmp"}}
    icmp_ip = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "protocol"}}, "right": 1}}
    base = {"match": {"op": "==", "left": s, "right": "@s_1"}}
    assert rule_token({"expr": [base, icmp_meta, {"accept": None}]}) == "accept in @s_1 proto icmp"
    assert rule_token({"expr": [base, icmp_ip, {"accept": None}], "comment": "c"}) == "accept in @s_1 proto icmp # c"
    assert rule_token({"expr": [{"counter": {"packets": 1}}, {"accept": None}]}).startswith("? ")
    assert rule_token({"expr": [base, {"reject": None}]}).startswith("? ")


def test_equal_sets_share_one_nft_set_and_split_when_they_diverge() -> None:
    same = ["100.64.0.7", "100.64.0.9"]
    both = fw(rule(), rule("out", peer_set=DST), sets={SRC: same, DST: list(same)})
    model = compile_firewall(both, "wt0")
    assert list(model.sets) == [nft_set_name(DST)] and model.set_names[nft_set_name(DST)] == (DST, SRC)
    assert {r.set_name for r in model.rules_in + model.rules_out} == {nft_set_name(DST)}
    more = [*same, "100.64.0.3"]
    grown = compile_firewall(fw(rule(), rule("out", peer_set=DST), sets={SRC: more, DST: list(more)}), "wt0")
    assert diff(model, grown).commands == [
        {"add": {"element": {"family": "inet", "table": "starling", "name": nft_set_name(DST), "elem": ["100.64.0.3"]}}}
    ]
    split = compile_firewall(fw(rule(), rule("out", peer_set=DST), sets={SRC: more, DST: same}), "wt0")
    plan = diff(model, split)
    assert plan.sets_added == 1 and plan.chains_rebuilt == ("mesh_in",)
    assert listing_of(installed(model, split)) == listing_of(installed(split))
