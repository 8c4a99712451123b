"""Unit tests of routes in the collection: plugins/module_utils/_route.py (validation, normalization), the route
module, route destinations in policy/policy_set (reachability, assertions, plan order), peer exit_node, and the
inventory's starling_routes (in-memory coordinator from test_modules_unit, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ansible import collection_loader
from tests.ansible.test_modules_unit import Failed, FakeClient, FakeModule, G, declared_groups, run_set

collection_loader.install()

from ansible_collections.starling.mesh.plugins.inventory import coordinator as inventory_mod  # noqa: E402
from ansible_collections.starling.mesh.plugins.module_utils import _policy as P  # noqa: E402
from ansible_collections.starling.mesh.plugins.module_utils import _route as R  # noqa: E402
from ansible_collections.starling.mesh.plugins.modules import peer, policy, route  # noqa: E402


def ROUTE(name: str, prefix: str, routers: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """An API route object (routers as the API returns them: both keys, null for the other)."""
    return {
        "id": f"r-{name}",
        "name": name,
        "description": "",
        "prefix": prefix,
        "exit_node": prefix == "0.0.0.0/0",
        "masquerade": True,
        "enabled": True,
        "routers": [{"peer": r.get("peer"), "group": r.get("group"), "metric": r.get("metric", 9999)} for r in routers],
        "created_at": "t",
        **kw,
    }


PEERS = [
    {"id": "p1", "name": "gw1", "groups": ["clinic-gateways"], "exit_node": None},
    {"id": "p2", "name": "gw2", "groups": ["clinic-gateways"], "exit_node": None},
    {"id": "p3", "name": "laptop", "groups": ["staff"], "exit_node": None},
    {"id": "p4", "name": "exit-1", "groups": [], "exit_node": None},
]


def client(**kw: Any) -> FakeClient:
    return FakeClient(
        groups=kw.pop("groups", [G("clinic-gateways", ["gw1", "gw2"]), G("staff", ["laptop"])]),
        peers=kw.pop("peers", PEERS),
        **kw,
    )


# ----- _route ----------------------------------------------------------------------------------------
def test_normalize_route_sorts_routers_and_fills_defaults() -> None:
    got = R.normalize_route(
        {"name": "lan", "prefix": "198.18.40.0/24", "routers": [{"group": "gws"}, {"peer": "gw1", "metric": "10"}]}
    )
    assert got == {
        "name": "lan",
        "description": "",
        "prefix": "198.18.40.0/24",
        "routers": [{"peer": "gw1", "metric": 10}, {"group": "gws", "metric": 9999}],
        "masquerade": True,
        "enabled": True,
    }
    api = ROUTE("lan", "198.18.40.0/24", [{"group": "gws"}, {"peer": "gw1", "metric": 10}])
    assert R.comparable_route(api) == got


@pytest.mark.parametrize(
    "data,text",
    [
        ({"prefix": "198.18.40.1/24"}, "not an IPv4 prefix in canonical form"),
        ({"prefix": "198.18.40.0"}, "is not an IPv4 prefix like"),
        ({"prefix": "2001:db8::/32"}, "only IPv4"),
        ({"prefix": "100.64.1.0/24"}, "overlaps the mesh range"),
        ({"prefix": "127.0.0.0/16"}, "loopback"),
        ({"prefix": "224.0.0.0/4"}, "multicast"),
        ({"routers": []}, "at least one routing peer"),
        ({"routers": [{"peer": "gw1", "group": "gws"}]}, "exactly one of peer or group"),
        ({"routers": [{"metric": 5}]}, "exactly one of peer or group"),
        ({"routers": [{"peer": "gw1", "metric": 0}]}, "outside 1-9999"),
        ({"routers": [{"peer": "gw1", "metric": "x"}]}, "is not a number"),
        ({"routers": [{"peer": "gw1"}, {"peer": "gw1", "metric": 3}]}, "named twice"),
        ({"routers": [{"peer": "GW_1"}]}, "not a valid peer name"),
        ({"via": 1}, "unknown keys via"),
    ],
)
def test_normalize_route_errors(data: dict[str, Any], text: str) -> None:
    raw = {"name": "lan", "prefix": "198.18.40.0/24", "routers": [{"peer": "gw1"}], **data}
    with pytest.raises(P.PolicyDataError, match=text):
        R.normalize_route(raw)


def test_overlaps_and_exit_prefix() -> None:
    assert R.check_prefix("0.0.0.0/0") == "0.0.0.0/0"
    assert R.overlaps("198.18.40.0/24", "198.18.0.0/16") and not R.overlaps("198.18.40.0/24", "198.18.41.0/24")
    assert not R.overlaps("0.0.0.0/0", "198.18.40.0/24")
    a = R.normalize_route({"name": "a", "prefix": "198.18.40.0/24", "routers": [{"peer": "x"}]})
    b = R.normalize_route({"name": "b", "prefix": "198.18.40.128/25", "routers": [{"peer": "x"}]})
    assert R.overlap_errors([a, b]) == ["route 'a': 198.18.40.0/24 overlaps route 'b' (198.18.40.128/25)"]


# ----- route module ----------------------------------------------------------------------------------
def route_params(**kw: Any) -> dict[str, Any]:
    base = {
        "name": "clinic-lan",
        "description": None,
        "prefix": None,
        "routers": None,
        "masquerade": None,
        "enabled": None,
        "state": "present",
    }
    return {**base, **kw}


# routers as Ansible hands them over (suboption defaults filled, the other key None)
ROUTERS = [{"group": "clinic-gateways", "peer": None, "metric": 100}, {"peer": "gw1", "group": None, "metric": 10}]


def test_route_check_apply_idempotent_update_absent() -> None:
    c = client()
    args = route_params(prefix="198.18.40.0/24", routers=ROUTERS)
    res = route.run(FakeModule(c, True, **args))
    assert res["changed"] and c.writes == []
    assert res["diff"]["before"] == {} and res["diff"]["after"]["routers"] == [
        {"peer": "gw1", "metric": 10},
        {"group": "clinic-gateways", "metric": 100},
    ]
    assert res["route"]["exit_node"] is False and res["route"]["routers"][0] == {
        "peer": "gw1",
        "group": None,
        "metric": 10,
    }
    res = route.run(FakeModule(c, **args))
    assert res["changed"] and c.writes == [
        (
            "POST",
            "/routes",
            {
                "name": "clinic-lan",
                "description": "",
                "prefix": "198.18.40.0/24",
                "routers": [{"peer": "gw1", "metric": 10}, {"group": "clinic-gateways", "metric": 100}],
                "masquerade": True,
                "enabled": True,
            },
        )
    ]
    c.writes.clear()
    # the API answers routers in its own order with both keys: same route, no change
    c.data["/routes"]["clinic-lan"] = ROUTE("clinic-lan", "198.18.40.0/24", list(reversed(ROUTERS)))
    assert route.run(FakeModule(c, **route_params(routers=list(reversed(ROUTERS)))))["changed"] is False
    assert route.run(FakeModule(c, **route_params(masquerade=True)))["changed"] is False
    assert c.writes == []
    res = route.run(FakeModule(c, **route_params(masquerade=False)))
    assert c.writes == [("PATCH", "/routes/r-clinic-lan", {"masquerade": False})]
    assert res["diff"]["before"]["masquerade"] is True and res["diff"]["after"]["masquerade"] is False
    c.writes.clear()
    res = route.run(FakeModule(c, True, **route_params(state="absent")))
    assert res["changed"] and res["diff"]["after"] == {} and c.writes == []
    route.run(FakeModule(c, **route_params(state="absent")))
    assert c.writes == [("DELETE", "/routes/r-clinic-lan", None)] and "clinic-lan" not in c.data["/routes"]
    assert route.run(FakeModule(c, **route_params(state="absent")))["changed"] is False


def test_route_failures_before_any_write() -> None:
    c = client(routes=[ROUTE("office", "198.18.0.0/16", [{"peer": "gw2"}])])
    cases = [
        (route_params(prefix="198.18.40.1/24", routers=ROUTERS), "canonical form"),
        (route_params(prefix="198.18.40.0/24"), "prefix and routers are required"),
        (route_params(prefix="198.18.40.0/24", routers=ROUTERS), "overlaps route 'office' \\(198.18.0.0/16\\)"),
        (
            route_params(prefix="198.19.40.0/24", routers=[{"group": "nope", "peer": None, "metric": 1}]),
            "unknown groups: nope",
        ),
        (
            route_params(prefix="198.19.40.0/24", routers=[{"peer": "ghost", "group": None, "metric": 1}]),
            "unknown peers",
        ),
    ]
    for params, text in cases:
        for check in (True, False):
            with pytest.raises(Failed, match=text):
                route.run(FakeModule(c, check, **params))
    assert c.writes == []


# ----- policy with route destinations ----------------------------------------------------------------
def test_policy_route_destination() -> None:
    c = client(routes=[ROUTE("clinic-lan", "198.18.40.0/24", [{"peer": "gw1"}])])
    base = {"name": "staff-web", "description": None, "enabled": None, "ports": ["443"], "protocol": "tcp"}
    ends = {
        "sources": {"groups": ["staff"], "peers": []},
        "destinations": {"groups": [], "peers": [], "routes": ["clinic-lan"]},
    }
    res = policy.run(FakeModule(c, state="present", bidirectional=None, **base, **ends))
    assert res["changed"] and c.writes[0][2]["destinations"] == {"groups": [], "peers": [], "routes": ["clinic-lan"]}
    assert policy.run(FakeModule(c, state="present", bidirectional=None, **base, **ends))["changed"] is False
    c.writes.clear()
    with pytest.raises(Failed, match="cannot be bidirectional"):
        policy.run(FakeModule(c, state="present", bidirectional=True, **base, **{**ends}))
    bad = {**ends, "destinations": {"groups": [], "peers": [], "routes": ["nope"]}}
    with pytest.raises(Failed, match="unknown routes: nope"):
        policy.run(FakeModule(c, state="present", bidirectional=None, **{**base, "name": "other"}, **bad))
    assert c.writes == []
    with pytest.raises(P.PolicyDataError, match="a route can only be a destination"):
        P.normalize_policy({"name": "x", "sources": {"routes": ["a"]}, "destinations": {"groups": ["b"]}})


def test_reachability_names_route_prefixes() -> None:
    staff_web = P.normalize_policy(
        {
            "name": "w",
            "protocol": "tcp",
            "ports": [443],
            "sources": {"groups": ["staff"]},
            "destinations": {"routes": ["clinic-lan"]},
        }
    )
    diff = P.reach_diff({}, P.reach_map([staff_web], {"clinic-lan": "198.18.40.0/24"}))
    assert diff["gained"] == [
        {"from": "staff", "to": "route:clinic-lan", "prefix": "198.18.40.0/24", "protocol": "tcp", "ports": ["443"]}
    ]
    assert P.reach_lines(diff) == ["+ staff -> 198.18.40.0/24 (route clinic-lan) tcp/443"]
    # the route moves to another prefix: the old one is lost, the new one gained
    moved = P.reach_diff(
        P.reach_map([staff_web], {"clinic-lan": "198.18.40.0/24"}),
        P.reach_map([staff_web], {"clinic-lan": "198.18.48.0/24"}),
    )
    assert P.reach_lines(moved) == [
        "+ staff -> 198.18.48.0/24 (route clinic-lan) tcp/443",
        "- staff -> 198.18.40.0/24 (route clinic-lan) tcp/443",
    ]


# ----- policy_set with routes ------------------------------------------------------------------------
STAFF_WEB = {
    "name": "staff-web",
    "protocol": "tcp",
    "ports": [443],
    "sources": {"groups": ["staff"]},
    "destinations": {"routes": ["clinic-lan"]},
}
DECLARED_ROUTE = {"name": "clinic-lan", "prefix": "198.18.40.0/24", "routers": [{"group": "clinic-gateways"}]}


def test_policy_set_with_routes_plan_diff_and_idempotence() -> None:
    c = client(groups=[G("staff", ["laptop"])])
    groups = declared_groups("staff", "clinic-gateways")
    kw = {
        "groups": groups,
        "routes": [DECLARED_ROUTE],
        "policies": [STAFF_WEB],
        "expect": [
            {"from": "staff", "to": "route:clinic-lan", "port": 443, "allowed": True},
            {"from": "staff", "to": "route:clinic-lan", "port": 22, "allowed": False},
        ],
    }
    res = run_set(c, True, **kw)
    assert c.writes == []
    assert [(s["action"], s["kind"], s["name"]) for s in res["plan"]] == [
        ("create", "group", "clinic-gateways"),
        ("create", "route", "clinic-lan"),
        ("create", "policy", "staff-web"),
    ]
    assert res["reachability_lines"] == ["+ staff -> 198.18.40.0/24 (route clinic-lan) tcp/443"]
    assert res["diff"][0]["after"]["routes"]["clinic-lan"]["prefix"] == "198.18.40.0/24"
    assert "+ staff -> 198.18.40.0/24 (route clinic-lan) tcp/443" in res["diff"][1]["prepared"]
    assert [a["ok"] for a in res["assertions"]] == [True, True]
    res = run_set(c, **kw)
    assert res["applied"] == 3 and [w[1] for w in c.writes] == ["/groups", "/routes", "/policies"]
    c.writes.clear()
    assert run_set(c, **kw)["changed"] is False and c.writes == []
    # exclusive: dropping the route and its policy deletes the policy first, then the route
    res = run_set(c, groups=groups, routes=[], policies=[])
    assert [(s["action"], s["kind"]) for s in res["plan"]] == [("delete", "policy"), ("delete", "route")]
    assert res["reachability_lines"] == ["- staff -> 198.18.40.0/24 (route clinic-lan) tcp/443"]


def test_policy_set_unmanaged_routes_are_kept_and_checked() -> None:
    c = client(routes=[ROUTE("clinic-lan", "198.18.40.0/24", [{"group": "clinic-gateways"}])])
    # routes omitted: the coordinator's routes may be named, and are never deleted
    res = run_set(c, True, groups=declared_groups("staff", "clinic-gateways"), policies=[STAFF_WEB])
    assert [(s["action"], s["kind"]) for s in res["plan"]] == [("create", "policy")]
    assert "routes" not in res["diff"][0]["before"]
    with pytest.raises(Failed, match="group 'clinic-gateways' would be deleted but routes route 'clinic-lan'"):
        run_set(c, groups=declared_groups("staff"), policies=[])
    with pytest.raises(Failed, match="unknown routes nope"):
        run_set(
            c,
            groups=declared_groups("staff", "clinic-gateways"),
            policies=[{**STAFF_WEB, "destinations": {"routes": ["nope"]}}],
        )
    with pytest.raises(Failed, match="unknown routes clinic-lan \\(declare them under routes\\)"):
        run_set(c, groups=declared_groups("staff", "clinic-gateways"), routes=[], policies=[STAFF_WEB])
    with pytest.raises(Failed, match="unknown router groups gws \\(declare them under groups\\)"):
        run_set(
            c,
            groups=declared_groups("staff", "clinic-gateways"),
            routes=[{**DECLARED_ROUTE, "routers": [{"group": "gws"}]}],
        )
    with pytest.raises(Failed, match=r"invalid data.*'b': 198\.18\.0\.0/16 overlaps route 'clinic-lan'"):
        run_set(
            c,
            groups=declared_groups("staff", "clinic-gateways"),
            routes=[DECLARED_ROUTE, {**DECLARED_ROUTE, "name": "b", "prefix": "198.18.0.0/16"}],
        )
    with pytest.raises(Failed, match="expect\\[0\\]: unknown route 'route:nope'"):
        run_set(
            c,
            groups=declared_groups("staff", "clinic-gateways"),
            expect=[{"from": "staff", "to": "route:nope", "allowed": False}],
        )
    with pytest.raises(Failed, match="cannot be bidirectional"):
        run_set(c, groups=declared_groups("staff", "clinic-gateways"), policies=[{**STAFF_WEB, "bidirectional": True}])
    assert c.writes == []


# ----- peer exit_node --------------------------------------------------------------------------------
def peer_params(**kw: Any) -> dict[str, Any]:
    base = {"name": "laptop", "new_name": None, "groups": None, "append": False, "approved": None, "exit_node": None}
    return {**base, "state": "present", **kw}


def test_peer_exit_node_set_idempotent_clear() -> None:
    peers = [{**p, "approved": True} for p in PEERS]
    c = client(peers=peers, routes=[ROUTE("internet", "0.0.0.0/0", [{"peer": "exit-1"}])])
    res = peer.run(FakeModule(c, True, **peer_params(exit_node="exit-1")))
    assert res["changed"] and c.writes == [] and res["diff"]["after"]["exit_node"] == "exit-1"
    assert res["diff"]["before"]["exit_node"] is None
    peer.run(FakeModule(c, **peer_params(exit_node="exit-1")))
    assert c.writes == [("PATCH", "/peers/p3", {"exit_node": "exit-1"})]
    c.writes.clear()
    assert peer.run(FakeModule(c, **peer_params(exit_node="exit-1")))["changed"] is False
    assert peer.run(FakeModule(c, **peer_params()))["changed"] is False
    for bad, text in (
        ("gw1", "'gw1' is not an exit node"),
        ("ghost", "unknown peer 'ghost'"),
        ("laptop", "own exit node"),
    ):
        with pytest.raises(Failed, match=text):
            peer.run(FakeModule(c, True, **peer_params(exit_node=bad)))
    assert c.writes == []
    peer.run(FakeModule(c, **peer_params(exit_node="")))
    assert c.writes == [("PATCH", "/peers/p3", {"exit_node": None})]


# ----- inventory ---------------------------------------------------------------------------------------
def test_inventory_routes_per_peer() -> None:
    routes = [
        ROUTE(
            "clinic-lan", "198.18.40.0/24", [{"peer": "gw1", "metric": 10}, {"group": "clinic-gateways", "metric": 100}]
        ),
        ROUTE("internet", "0.0.0.0/0", [{"peer": "gw2", "metric": 5}], masquerade=False),
    ]
    index = R.index_routes(routes)
    gw1 = inventory_mod.host_vars({**PEERS[0]}, index)
    assert gw1["starling_routes"] == [
        {
            "name": "clinic-lan",
            "prefix": "198.18.40.0/24",
            "metric": 10,
            "masquerade": True,
            "enabled": True,
            "exit_node": False,
        }
    ]
    gw2 = inventory_mod.host_vars({**PEERS[1]}, index)
    assert [(r["name"], r["metric"], r["exit_node"], r["masquerade"]) for r in gw2["starling_routes"]] == [
        ("clinic-lan", 100, False, True),
        ("internet", 5, True, False),
    ]
    laptop = inventory_mod.host_vars({**PEERS[2], "exit_node": "gw2"}, index)
    assert laptop["starling_routes"] == [] and laptop["starling_exit_node"] == "gw2"
    assert inventory_mod.host_vars(PEERS[3])["starling_routes"] == []


def test_policy_set_route_update_is_a_patch_of_changed_fields() -> None:
    c = client(
        routes=[ROUTE("clinic-lan", "198.18.40.0/24", [{"group": "clinic-gateways"}])],
        policies=[],
    )
    groups = declared_groups("staff", "clinic-gateways")
    res = run_set(
        c, groups=groups, routes=[{**DECLARED_ROUTE, "routers": [{"group": "clinic-gateways", "metric": 50}]}]
    )
    assert c.writes == [("PATCH", "/routes/r-clinic-lan", {"routers": [{"group": "clinic-gateways", "metric": 50}]})]
    assert res["plan"] == [{"action": "update", "kind": "route", "name": "clinic-lan", "fields": ["routers"]}]
