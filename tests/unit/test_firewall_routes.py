"""Firewall rules for network routes (issue 16): "route" rules in mesh_out (a client), "forward" rules
in mesh_fwd behind the forward hook (a routing peer), masquerade in a nat postrouting chain; checked
as text, as JSON, as diffs against the in-memory nft model of test_firewall_compile, as drift, and
through the `Firewall` state machine (a bad map is refused whole, nothing applied)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_firewall_class import make
from test_firewall_compile import SRC, FakeKernel, fw, installed, listing_of, rule

from agent.firewall import CompiledRuleset, FirewallMapError, compile_firewall, diff, full_build, nft_set_name
from agent.firewall.model import guard_ruleset
from agent.firewall.nftjson import chain_exprs
from agent.firewall.state import parse_listing, problems
from starling_proto.routes import ForwardEntry

LAN = "198.18.40.0/24"
S = nft_set_name(SRC)


def route(prefix: str = LAN, protocol: str = "tcp", ports: Any = ((443, 443),), route_id: str = "r1") -> dict[str, Any]:
    doc = rule("route", protocol, ports, route_id=route_id, prefix=prefix)
    del doc["peer_set"]
    return doc


def fwd(prefix: str = LAN, protocol: str = "tcp", ports: Any = ((8080, 8080),), route_id: str = "r1") -> dict[str, Any]:
    return rule("forward", protocol, ports, SRC, route_id=route_id, prefix=prefix)


def entry(prefix: str = LAN, masquerade: bool = True, route_id: str = "r1") -> ForwardEntry:
    return ForwardEntry(route_id, f"lan {route_id}", prefix, masquerade)


def tokens(model: CompiledRuleset, chain: str) -> list[Any]:
    return [expr for expr, _ in chain_exprs(model, chain)]


# ----- client side: route rules -------------------------------------------------------------------
def test_route_rules_go_to_mesh_out_with_their_prefix() -> None:
    model = compile_firewall(fw(rule(), route(), route("0.0.0.0/0", "any", (), "exit")), "wt0")
    routes = [r for r in model.rules_out if r.direction == "route"]
    assert [(r.prefix, r.set_name) for r in routes] == [("0.0.0.0/0", ""), (LAN, "")]
    assert set(model.sets) == {S} and not model.rules_fwd and not model.nat  # route rules use no set
    text = model.render_text()
    assert "\t\tip daddr 198.18.40.0/24 tcp dport 443 accept comment" in text
    assert "\t\tip daddr 0.0.0.0/0 accept comment" in text
    assert (model.rule_count, model.route_count) == (3, 2)
    lan = next(r for r in routes if r.prefix == LAN)
    expr = next(e for e, c in chain_exprs(model, "mesh_out") if c == lan.comment)
    assert expr == [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": {"prefix": {"addr": "198.18.40.0", "len": 24}},
            }
        },
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 443}},
        {"accept": None},
    ]
    assert lan.comment == "0123456789abcdef01234567 route route r1"


def test_a_client_with_route_rules_forwards_nothing() -> None:
    model = compile_firewall(fw(route()), "wt0")
    assert model.regular_chains() == ("mesh_in", "mesh_out") and model.base_chains() == ("input", "output", "forward")
    assert tokens(model, "forward") == tokens(guard_ruleset("wt0"), "forward")


# ----- routing peer: forward rules and the forward hook --------------------------------------------
def test_forward_rules_build_mesh_fwd_and_the_forward_hook() -> None:
    model = compile_firewall(fw(fwd(), fwd(protocol="udp", ports=[(53, 53)])), "wt0", [entry(masquerade=False)])
    assert [r.direction for r in model.rules_fwd] == ["forward", "forward"] and model.rules_out == ()
    assert model.regular_chains() == ("mesh_in", "mesh_out", "mesh_fwd")
    assert set(model.sets) == {S} and model.nat == ()
    text = model.render_text()
    mesh_fwd = text[text.index("chain mesh_fwd") : text.index("chain input")]
    assert "ct state" not in mesh_fwd  # established flows are accepted before the jump
    assert f"ip saddr @{S} ip daddr 198.18.40.0/24 tcp dport 8080 accept" in mesh_fwd
    assert mesh_fwd.rstrip().endswith("drop\n\t}")
    forward = text[text.index("chain forward") :]
    assert forward.split("\n")[2:6] == [
        "\t\tct state established,related accept",
        '\t\tiifname "wt0" oifname != "wt0" jump mesh_fwd',
        '\t\tiifname "wt0" drop',
        '\t\toifname "wt0" drop',
    ]
    assert "postrouting" not in text
    assert tokens(model, "forward")[1] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wt0"}},
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "wt0"}},
        {"jump": {"target": "mesh_fwd"}},
    ]


def test_without_forward_rules_forwarding_is_dropped_exactly_as_before_routes() -> None:
    """Fail closed: forward entries alone (no policy allows anyone) open nothing."""
    model = compile_firewall(fw(rule()), "wt0", [entry(masquerade=False)])
    plain = compile_firewall(fw(rule()), "wt0")
    assert model == plain
    assert tokens(model, "forward") == [
        [{"match": {"op": "==", "left": {"meta": {"key": k}}, "right": "wt0"}}, {"drop": None}]
        for k in ("iifname", "oifname")
    ]
    assert [c["add"]["chain"]["name"] for c in full_build(model).commands if "chain" in c.get("add", {})] == [
        "mesh_in",
        "mesh_out",
        "input",
        "output",
        "forward",
    ]


# ----- masquerade -----------------------------------------------------------------------------------
def test_masquerade_gets_a_nat_chain_longest_prefix_first() -> None:
    entries = [
        entry("0.0.0.0/0", True, "exit"),
        entry("198.18.0.0/16", True, "big"),
        entry(LAN, False, "r1"),
        entry("198.18.41.7/32", True, "one"),
    ]
    model = compile_firewall(fw(fwd()), "wt0", entries)
    assert [(n.prefix, n.masquerade) for n in model.nat] == [
        ("198.18.41.7/32", True),
        (LAN, False),
        ("198.18.0.0/16", True),
        ("0.0.0.0/0", True),
    ]
    assert model.masqueraded == ("198.18.41.7/32", "198.18.0.0/16", "0.0.0.0/0")
    assert model.base_chains()[-1] == "postrouting"
    text = model.render_text()
    assert "type nat hook postrouting priority srcnat; policy accept;" in text
    assert 'iifname "wt0" oifname != "wt0" ip daddr 198.18.41.7 masquerade comment "route one"' in text
    assert 'iifname "wt0" oifname != "wt0" ip daddr 198.18.40.0/24 accept comment "route r1"' in text
    nat = tokens(model, "postrouting")
    assert nat[0][-1] == {"masquerade": None} and nat[1][-1] == {"accept": None}
    nat_chain = [c["add"]["chain"] for c in full_build(model).commands if "chain" in c.get("add", {})][-1]
    assert (nat_chain["type"], nat_chain["hook"], nat_chain["prio"]) == ("nat", "postrouting", 100)


def test_no_masquerade_no_nat_chain() -> None:
    model = compile_firewall(fw(fwd()), "wt0", [entry(masquerade=False)])
    assert model.nat == () and "postrouting" not in model.base_chains()


# ----- bad input: refused whole ---------------------------------------------------------------------
BAD: list[tuple[dict[str, Any], Any, str]] = [
    (fw(fwd()), [], "forward rule for route 'r1', which is not in this peer's forward list"),
    (fw(fwd(route_id="r2")), [entry()], "route 'r2', which is not in this peer's forward list"),
    (fw(fwd("198.18.41.0/24")), [entry()], "prefix 198.18.41.0/24 differs from 198.18.40.0/24 of route 'r1'"),
    (fw(fwd()), [{"route_id": "r1", "name": "x", "prefix": LAN, "masquerade": "yes"}], "forward[0].masquerade"),
    (fw(fwd()), [entry(), entry()], "appears twice"),
    (fw(), [entry("100.64.0.0/16")], "mesh range"),
    (fw(route("100.64.1.0/24")), [], "mesh range"),
    (fw(route("198.18.40.1/24")), [], "canonical"),
    (fw({**route(), "peer_set": SRC}), [], "a route rule has no peer_set"),
    (fw(fwd(ports=[(0, 1)])), [entry()], "port 0 is outside 1-65535"),
    (fw(route(protocol="icmp", ports=[(1, 1)])), [], "ports are only allowed with tcp or udp"),
    (fw({**fwd(), "peer_set": "nope"}), [entry()], "unknown peer_set 'nope'"),
    (fw(rule(prefix=LAN)), [], "route_id and prefix belong to route and forward rules only"),
]


@pytest.mark.parametrize(("section", "forward", "reason"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_route_input_is_refused_whole_and_nothing_applied(section: Any, forward: Any, reason: str) -> None:
    with pytest.raises(FirewallMapError) as info:
        compile_firewall(section, "wt0", forward)
    assert reason in str(info.value)
    firewall, kernel, _ = make()
    good = fw(rule(), fwd(), route())
    firewall.apply(good, [entry()])
    before, batches = listing_of(kernel), len(kernel.batches)
    with pytest.raises(FirewallMapError):
        firewall.apply(section, forward)
    assert len(kernel.batches) == batches and listing_of(kernel) == before
    assert firewall.status()["state"] == "error" and firewall.status()["masquerade"] == [LAN]


# ----- diffs ------------------------------------------------------------------------------------------
def verbs(plan: Any) -> list[str]:
    out = []
    for command in plan.commands:
        ((verb, obj),) = command.items()
        ((kind, body),) = obj.items()
        out.append(f"{verb} {kind} {body.get('name') or body.get('chain', '')}".strip())
    return out


def test_forward_rules_appear_and_disappear_as_a_diff() -> None:
    plain = compile_firewall(fw(rule()), "wt0")
    routed = compile_firewall(fw(rule(), fwd()), "wt0", [entry()])
    plan = diff(plain, routed)
    assert not plan.full
    assert verbs(plan) == [
        "add chain mesh_fwd",
        "add rule mesh_fwd",
        "add rule mesh_fwd",
        "flush chain forward",
        *["add rule forward"] * 4,
        "add chain postrouting",
        "add rule postrouting",
    ]
    assert plan.chains_rebuilt == ("mesh_fwd", "forward", "postrouting")
    back = diff(routed, plain)
    assert verbs(back) == [
        "flush chain forward",
        "add rule forward",
        "add rule forward",
        "flush chain mesh_fwd",
        "delete chain mesh_fwd",
        "flush chain postrouting",
        "delete chain postrouting",
    ]
    assert listing_of(installed(plain, routed, plain)) == listing_of(installed(plain))
    assert listing_of(installed(plain, routed)) == listing_of(installed(routed))


def test_a_forward_rule_change_rebuilds_mesh_fwd_only() -> None:
    old = compile_firewall(fw(rule(), fwd()), "wt0", [entry()])
    new = compile_firewall(fw(rule(), fwd(ports=[(8080, 8081)])), "wt0", [entry()])
    assert diff(old, new).chains_rebuilt == ("mesh_fwd",)
    grown = compile_firewall(
        fw(rule(), fwd(), sets={SRC: ["100.64.0.7", "100.64.0.9", "100.64.0.10"]}), "wt0", [entry()]
    )
    assert verbs(diff(old, grown)) == [f"add element {S}"]  # a peer joins the source group: one element
    no_masq = compile_firewall(fw(rule(), fwd()), "wt0", [entry(masquerade=False)])
    assert verbs(diff(old, no_masq)) == ["flush chain postrouting", "delete chain postrouting"]
    route_added = compile_firewall(fw(rule(), fwd(), route("198.18.50.0/24", route_id="r5")), "wt0", [entry()])
    assert diff(old, route_added).chains_rebuilt == ("mesh_out",)


def random_routed(rng: random.Random) -> tuple[dict[str, Any], list[ForwardEntry]]:
    names = [f"{i:024x}:src" for i in range(3)]
    sets = {n: [f"100.64.0.{rng.randint(1, 20)}" for _ in range(rng.randint(0, 5))] for n in names}
    prefixes = {f"r{i}": p for i, p in enumerate(["198.18.40.0/24", "198.18.41.0/24", "0.0.0.0/0", "198.18.0.0/16"])}
    routed = rng.sample(sorted(prefixes), rng.randint(0, 3))
    entries = [entry(prefixes[r], rng.random() < 0.5, r) for r in routed]
    rules = []
    for _ in range(rng.randint(0, 6)):
        kind = rng.choice(["in", "out", "route", "forward"])
        proto = rng.choice(["any", "tcp", "udp", "icmp"])
        ports = [(a, a + rng.randint(0, 3)) for a in rng.sample(range(1, 100), rng.randint(0, 2))]
        ports = ports if proto in ("tcp", "udp") else []
        if kind == "route":
            r = rng.choice(sorted(prefixes))
            rules.append(route(prefixes[r], proto, ports, r))
        elif kind == "forward" and routed:
            r = rng.choice(routed)
            rules.append({**fwd(prefixes[r], proto, ports, r), "peer_set": rng.choice(names)})
        elif kind in ("in", "out"):
            rules.append(rule(kind, proto, ports, rng.choice(names)))
    return fw(*rules, sets=sets), entries


@pytest.mark.parametrize("seed", range(40))
def test_a_routed_diff_lands_exactly_where_a_full_build_does(seed: int) -> None:
    rng = random.Random(seed)
    models = []
    for _ in range(6):
        section, entries = random_routed(rng)
        models.append(compile_firewall(section, "wt0", entries))
    models.insert(rng.randint(0, 5), guard_ruleset("wt0"))
    kernel = installed(guard_ruleset("wt0"), *models)
    assert listing_of(kernel) == listing_of(installed(models[-1]))
    assert problems(listing_of(kernel), models[-1]) == []  # our own writes are not drift


# ----- drift ------------------------------------------------------------------------------------------
def test_routed_listing_as_nft_prints_it_is_not_drift() -> None:
    """nft lists a /32 prefix as a bare address; ct state with `==` and a set: all cosmetic."""
    model = compile_firewall(fw(fwd("198.18.41.7/32", route_id="one")), "wt0", [entry("198.18.41.7/32", True, "one")])
    doc = installed(model).list_table()
    for item in doc["nftables"]:
        for m in item.get("rule", {}).get("expr", []):
            right = m.get("match", {}).get("right")
            if isinstance(right, dict) and right.get("prefix", {}).get("len") == 32:
                m["match"]["right"] = right["prefix"]["addr"]
    assert problems(parse_listing(doc), model) == []


def test_routed_drift_is_described_and_repaired() -> None:
    firewall, kernel, drifts = make()
    section, forward = fw(rule(), fwd()), [entry()]
    firewall.apply(section, forward)
    table = kernel.table
    assert table is not None
    del table["chains"]["postrouting"], table["rules"]["postrouting"]
    table["rules"]["forward"].insert(0, {"expr": [{"accept": None}]})
    table["rules"]["mesh_fwd"][0]["expr"][1]["match"]["right"] = {"prefix": {"addr": "0.0.0.0", "len": 0}}
    found = problems(listing_of(kernel), compile_firewall(section, "wt0", forward))
    assert "chain postrouting was deleted" in found
    assert any(p.startswith("chain forward rules changed (1 unexpected rule") for p in found)
    assert any(p.startswith("chain mesh_fwd rules changed (1 unexpected rule, 1 missing rule") for p in found)
    assert firewall.check_drift() is True and len(drifts) == 1
    reference = FakeKernel()
    reference.apply(full_build(compile_firewall(section, "wt0", forward)).commands)
    assert listing_of(kernel) == listing_of(reference)
    table = kernel.table
    assert table is not None
    table["chains"]["postrouting"]["prio"] = -100  # someone moved our nat chain to dstnat
    assert firewall.check_drift() is True and "chain postrouting is now" in drifts[-1]


def test_a_foreign_nat_chain_in_our_table_is_drift() -> None:
    firewall, kernel, drifts = make()
    firewall.apply(fw(rule(), fwd()), [entry(masquerade=False)])
    assert kernel.table is not None
    kernel.table["chains"]["postrouting"] = {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100}
    kernel.table["rules"]["postrouting"] = [{"expr": [{"masquerade": None}]}]
    assert firewall.check_drift() is True and "unexpected chain postrouting was added" in drifts[0]
    assert kernel.table is not None and "postrouting" not in kernel.table["chains"]


# ----- status -------------------------------------------------------------------------------------------
def test_status_and_message_show_routes_and_masquerade() -> None:
    firewall, _, _ = make()
    firewall.apply(
        fw(rule(), fwd(), route("0.0.0.0/0", "any", (), "exit")), [entry(), entry("198.18.9.0/24", False, "r9")]
    )
    status = firewall.status()
    assert (status["rules"], status["route_rules"], status["masquerade"]) == (3, 2, [LAN])
    assert status["message"].startswith(
        "enforcing 3 rules (2 toward routes, 1 forwarded, masquerading 198.18.40.0/24) over 1 sets"
    )
    firewall.apply(fw(rule()))  # the routes are gone: forwarding closed again
    status = firewall.status()
    assert (status["route_rules"], status["masquerade"]) == (0, [])
    assert status["message"].startswith("enforcing 1 rules over 1 sets")
