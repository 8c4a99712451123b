"""Routes API against a real coordinator process: CRUD, every bad input refused with 422 (nothing changed),
policies to routes, what client, routing and unrelated peers find in their maps, and exit nodes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fixtures.coordinator import CoordinatorProcess
from tests.integration.test_api_admin import assert_error, audit_count, enroll, new_key, uniq


def group(api: httpx.Client, name: str) -> None:
    r = api.post("/api/v1/groups", json={"name": name})
    assert r.status_code == 201, r.text


def peers(coord: CoordinatorProcess, api: httpx.Client, groups: list[str]) -> list[dict[str, Any]]:
    """One enrolled peer per entry of `groups` (its only group)."""
    out = []
    for g in groups:
        key = new_key(api, auto_groups=[g])
        r = enroll(coord, key, uniq("host"))
        assert r.status_code == 200, r.text
        out.append(r.json()["peer"])
    return out


def peer_map(api: httpx.Client, peer_id: str) -> dict[str, Any]:
    r = api.get(f"/api/v1/peers/{peer_id}/map")
    assert r.status_code == 200, r.text
    return dict(r.json())


def state(api: httpx.Client) -> tuple[Any, ...]:
    """What a refused request must leave alone: routes, policies, peers and the audit log."""
    return (
        api.get("/api/v1/routes", params={"limit": 1000}).json(),
        api.get("/api/v1/policies", params={"limit": 1000}).json(),
        [(p["id"], p["exit_node"]) for p in api.get("/api/v1/peers", params={"limit": 1000}).json()["items"]],
        audit_count(api),
    )


@pytest.fixture(scope="module")
def mesh(coordinator: CoordinatorProcess) -> dict[str, Any]:
    """Groups clients/gateways/others, peers client, gw1, gw2 (gateways), other; route `lan` 198.18.40.0/24
    through gw1 (metric 10) and the gateways group (100), and a `spare` route (198.18.70.0/24, gw2) that no
    policy names."""
    with coordinator.client() as api:
        names = {role: uniq(role) for role in ("clients", "gateways", "others")}
        for n in names.values():
            group(api, n)
        client, gw1, gw2, other = peers(
            coordinator, api, [names["clients"], names["gateways"], names["gateways"], names["others"]]
        )
        body = {
            "name": uniq("lan"),
            "prefix": "198.18.40.0/24",
            "routers": [{"peer": gw1["name"], "metric": 10}, {"group": names["gateways"], "metric": 100}],
        }
        r = api.post("/api/v1/routes", json=body)
        assert r.status_code == 201, r.text
        spare = api.post(
            "/api/v1/routes",
            json={"name": uniq("spare"), "prefix": "198.18.70.0/24", "routers": [{"peer": gw2["name"]}]},
        )
        assert spare.status_code == 201, spare.text
        return {
            "groups": names,
            "client": client,
            "gw1": gw1,
            "gw2": gw2,
            "other": other,
            "route": r.json(),
            "spare": spare.json(),
        }


def test_create_list_get_patch_delete_and_audit(coordinator: CoordinatorProcess, mesh: dict[str, Any]) -> None:
    route = mesh["route"]
    gw1, gateways = mesh["gw1"]["name"], mesh["groups"]["gateways"]
    assert route["prefix"] == "198.18.40.0/24" and route["exit_node"] is False
    assert (route["masquerade"], route["enabled"], route["description"]) == (True, True, "")
    assert route["routers"] == [
        {"peer": gw1, "group": None, "metric": 10},
        {"peer": None, "group": gateways, "metric": 100},
    ]
    with coordinator.client() as api:
        assert api.get(f"/api/v1/routes/{route['id']}").json() == route
        listed = api.get("/api/v1/routes", params={"name": route["name"]}).json()
        assert listed["items"] == [route] and listed["next_cursor"] is None
        name = uniq("extra")
        created = api.post(
            "/api/v1/routes",
            json={"name": name, "prefix": "198.18.50.0/24", "routers": [{"group": gateways}], "masquerade": False},
        )
        assert created.status_code == 201, created.text
        extra = created.json()
        assert extra["routers"] == [{"peer": None, "group": gateways, "metric": 9999}] and not extra["masquerade"]
        patched = api.patch(f"/api/v1/routes/{extra['id']}", json={"description": "lab", "enabled": False})
        assert patched.status_code == 200, patched.text
        assert {k: v for k, v in patched.json().items() if k not in ("description", "enabled")} == {
            k: v for k, v in extra.items() if k not in ("description", "enabled")
        }
        assert (patched.json()["description"], patched.json()["enabled"]) == ("lab", False)
        moved = api.patch(
            f"/api/v1/routes/{extra['id']}", json={"prefix": "198.18.51.0/24", "routers": [{"peer": gw1, "metric": 5}]}
        ).json()
        assert moved["prefix"] == "198.18.51.0/24" and moved["routers"] == [{"peer": gw1, "group": None, "metric": 5}]
        assert api.delete(f"/api/v1/routes/{extra['id']}").status_code == 204
        assert_error(api.get(f"/api/v1/routes/{extra['id']}"), 404)
        assert_error(api.delete(f"/api/v1/routes/{extra['id']}"), 404)
        events = api.get("/api/v1/audit", params={"target_id": extra["id"]}).json()["items"]
        assert [e["action"] for e in events] == ["route.delete", "route.update", "route.update", "route.create"]
        assert events[2]["before"]["enabled"] is True and events[2]["after"]["enabled"] is False
        assert_error(api.post("/api/v1/routes", json={**extra, "id": None}), 422, field="id")


BAD_ROUTES: list[tuple[dict[str, Any], str, str]] = [
    ({"prefix": "198.18.60.1/24"}, "prefix", "canonical"),  # host bits set
    ({"prefix": "100.64.5.0/24"}, "prefix", "mesh range"),
    ({"prefix": "100.0.0.0/8"}, "prefix", "mesh range"),
    ({"prefix": "127.0.0.0/8"}, "prefix", "loopback"),
    ({"prefix": "169.254.0.0/16"}, "prefix", "link-local"),
    ({"prefix": "224.0.0.0/4"}, "prefix", "multicast"),
    ({"prefix": "198.18.60.0"}, "prefix", "IPv4 prefix"),
    ({"prefix": "fd00::/64"}, "prefix", "IPv4 prefix"),
    ({"prefix": 5}, "prefix", "string"),
    ({"prefix": "198.18.40.128/25"}, "prefix", "overlaps route"),  # inside the fixture's 198.18.40.0/24
    ({"prefix": "198.18.0.0/16"}, "prefix", "overlaps route"),  # contains it
    ({"routers": []}, "routers", "at least one routing peer"),
    ({"routers": [{"peer": "nobody-here"}]}, "routers[0].peer", "unknown peer 'nobody-here'"),
    ({"routers": [{"group": "no-such-group"}]}, "routers[0].group", "unknown group 'no-such-group'"),
    ({"routers": [{"metric": 5}]}, "routers[0]", "exactly one of peer or group"),
    ({"routers": [{"peer": "{gw1}", "group": "{gateways}"}]}, "routers[0]", "exactly one of peer or group"),
    ({"routers": [{"peer": "{gw1}"}, {"peer": "{gw1}", "metric": 3}]}, "routers", "named twice"),
    ({"routers": [{"peer": "{gw1}", "metric": 0}]}, "routers[0].metric", "greater than or equal to 1"),
    ({"routers": [{"peer": "{gw1}", "metric": 10000}]}, "routers[0].metric", "less than or equal to 9999"),
    ({"routers": [{"peer": "{gw1}", "metric": "5"}]}, "routers[0].metric", "integer"),
    ({"routers": [{"peer": "{gw1}", "weight": 1}]}, "routers[0].weight", "Extra inputs"),
    ({"masquerade": "yes"}, "masquerade", "boolean"),
    ({"via": "gw1"}, "via", "Extra inputs"),
    ({"name": "bad name!"}, "name", "pattern"),
]


@pytest.mark.parametrize(("change", "field", "says"), BAD_ROUTES, ids=[f"{c[1]}-{c[2]}" for c in BAD_ROUTES])
def test_bad_route_input_is_refused_and_changes_nothing(
    coordinator: CoordinatorProcess, mesh: dict[str, Any], change: dict[str, Any], field: str, says: str
) -> None:
    fill = {"{gw1}": mesh["gw1"]["name"], "{gateways}": mesh["groups"]["gateways"]}

    def filled(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: filled(v) for k, v in value.items()}
        if isinstance(value, list):
            return [filled(v) for v in value]
        return fill.get(value, value) if isinstance(value, str) else value

    body = {"name": uniq("bad"), "prefix": "198.18.60.0/24", "routers": [{"peer": mesh["gw1"]["name"]}]}
    body.update(filled(change))
    with coordinator.client() as api:
        before = state(api)
        r = api.post("/api/v1/routes", json=body)
        assert_error(r, 422, field=field, contains=says)
        if field not in ("name", "via"):  # the same change through PATCH of an existing route
            patch = {k: v for k, v in body.items() if k in change}
            assert_error(api.patch(f"/api/v1/routes/{mesh['spare']['id']}", json=patch), 422, field=field)
        assert state(api) == before


def test_name_conflict_and_exit_routes_may_share_0_0_0_0(coordinator: CoordinatorProcess, mesh: dict[str, Any]) -> None:
    with coordinator.client() as api:
        before = state(api)
        dup = {"name": mesh["route"]["name"], "prefix": "198.18.61.0/24", "routers": [{"peer": mesh["gw2"]["name"]}]}
        assert_error(api.post("/api/v1/routes", json=dup), 409, field="name")
        assert state(api) == before
        exits = []
        for gw in ("gw1", "gw2"):
            body = {"name": uniq("exit"), "prefix": "0.0.0.0/0", "routers": [{"peer": mesh[gw]["name"]}]}
            r = api.post("/api/v1/routes", json=body)
            assert r.status_code == 201, r.text
            assert r.json()["exit_node"] is True
            exits.append(r.json())
        for route in exits:
            assert api.delete(f"/api/v1/routes/{route['id']}").status_code == 204


def test_policies_to_routes_and_the_maps(coordinator: CoordinatorProcess, mesh: dict[str, Any]) -> None:
    route, client, gw1, gw2, other = mesh["route"], mesh["client"], mesh["gw1"], mesh["gw2"], mesh["other"]
    clients, gateways = mesh["groups"]["clients"], mesh["groups"]["gateways"]
    with coordinator.client() as api:
        base = {
            "name": uniq("to-lan"),
            "protocol": "tcp",
            "ports": [443],
            "sources": {"groups": [clients]},
            "destinations": {"routes": [route["name"]]},
        }
        before = state(api)
        assert_error(
            api.post("/api/v1/policies", json={**base, "sources": {"routes": [route["name"]]}}),
            422,
            field="sources.routes",
            contains="only be a destination",
        )
        assert_error(
            api.post("/api/v1/policies", json={**base, "bidirectional": True}),
            422,
            field="bidirectional",
            contains="one-way",
        )
        assert_error(
            api.post("/api/v1/policies", json={**base, "destinations": {"routes": ["no-such-route"]}}),
            422,
            field="destinations.routes[0]",
            contains="unknown route 'no-such-route'",
        )
        assert_error(api.post("/api/v1/policies", json={**base, "destinations": {}}), 422, field="destinations")
        assert state(api) == before

        created = api.post("/api/v1/policies", json=base)
        assert created.status_code == 201, created.text
        pol = created.json()
        assert pol["destinations"] == {"groups": [], "peers": [], "routes": [route["name"]]}
        assert pol["sources"]["routes"] == []
        before = state(api)
        assert_error(api.patch(f"/api/v1/policies/{pol['id']}", json={"bidirectional": True}), 422, "bidirectional")
        assert_error(api.delete(f"/api/v1/routes/{route['id']}"), 409, contains=pol["name"])
        group_id = api.get("/api/v1/groups", params={"name": gateways}).json()["items"][0]["id"]
        assert_error(api.delete(f"/api/v1/groups/{group_id}"), 409, contains=route["name"])
        assert state(api) == before

        prefix, rid = route["prefix"], route["id"]
        m = peer_map(api, client["id"])
        assert m["routes"] == [
            {
                "id": rid,
                "name": route["name"],
                "prefix": prefix,
                "routers": [{"peer_id": gw1["id"], "metric": 10}, {"peer_id": gw2["id"], "metric": 100}],
            }
        ]
        assert "forward" not in m and {p["id"] for p in m["peers"]} == {gw1["id"], gw2["id"]}
        assert m["firewall"]["rules"] == [
            {
                "policy_id": pol["id"],
                "direction": "route",
                "action": "accept",
                "protocol": "tcp",
                "ports": [[443, 443]],
                "route_id": rid,
                "prefix": prefix,
            }
        ]
        for gw in (gw1, gw2):
            m = peer_map(api, gw["id"])
            assert m["routes"] == [] and m["forward"] == [
                {"route_id": rid, "name": route["name"], "prefix": prefix, "masquerade": True}
            ]
            assert {p["id"] for p in m["peers"]} == {client["id"]}
            (rule,) = m["firewall"]["rules"]
            assert (rule["direction"], rule["route_id"], rule["prefix"], rule["ports"]) == (
                "forward",
                rid,
                prefix,
                [[443, 443]],
            )
            assert m["firewall"]["sets"][rule["peer_set"]] == [client["mesh_ip"]]
        m = peer_map(api, other["id"])
        assert m["routes"] == [] and "forward" not in m and m["peers"] == [] and m["firewall"]["rules"] == []

        # disabling the route empties both sides; an unapproved router drops out of the client's list
        api.patch(f"/api/v1/routes/{rid}", json={"enabled": False})
        assert peer_map(api, client["id"])["routes"] == [] and "forward" not in peer_map(api, gw1["id"])
        api.patch(f"/api/v1/routes/{rid}", json={"enabled": True})
        api.patch(f"/api/v1/peers/{gw1['id']}", json={"approved": False})
        assert [r["peer_id"] for r in peer_map(api, client["id"])["routes"][0]["routers"]] == [gw2["id"]]
        api.patch(f"/api/v1/peers/{gw1['id']}", json={"approved": True})
        assert api.get("/api/v1/maps/consistency").json()["violations"] == []

        assert api.delete(f"/api/v1/policies/{pol['id']}").status_code == 204
        assert peer_map(api, client["id"])["routes"] == [] and "forward" not in peer_map(api, gw2["id"])


def test_exit_node_on_peers(coordinator: CoordinatorProcess, mesh: dict[str, Any]) -> None:
    client, gw1, gw2 = mesh["client"], mesh["gw1"], mesh["gw2"]
    with coordinator.client() as api:
        exit_route = api.post(
            "/api/v1/routes",
            json={"name": uniq("inet"), "prefix": "0.0.0.0/0", "routers": [{"group": mesh["groups"]["gateways"]}]},
        ).json()
        assert api.get(f"/api/v1/peers/{client['id']}").json()["exit_node"] is None
        before = state(api)
        url = f"/api/v1/peers/{client['id']}"
        assert_error(api.patch(url, json={"exit_node": mesh["other"]["name"]}), 422, "exit_node", "not an exit node")
        assert_error(api.patch(url, json={"exit_node": "nobody-here"}), 422, "exit_node", "unknown peer")
        assert_error(api.patch(url, json={"exit_node": client["name"]}), 422, "exit_node", "its own exit node")
        assert_error(api.patch(url, json={"exit_node": 5}), 422, "exit_node")
        assert state(api) == before

        r = api.patch(url, json={"exit_node": gw2["name"]})
        assert r.status_code == 200, r.text
        assert r.json()["exit_node"] == gw2["name"]
        assert peer_map(api, client["id"])["peer"]["exit_node"] == gw2["id"]
        assert "exit_node" not in peer_map(api, gw1["id"])["peer"]
        assert api.patch(url, json={"approved": True}).json()["exit_node"] == gw2["name"]  # absent: kept
        events = api.get("/api/v1/audit", params={"target_id": client["id"], "action": "peer.update"}).json()
        assert events["items"][0]["after"]["exit_node"] == gw2["name"]
        assert api.patch(url, json={"exit_node": None}).json()["exit_node"] is None
        assert "exit_node" not in peer_map(api, client["id"])["peer"]
        assert api.delete(f"/api/v1/routes/{exit_route['id']}").status_code == 204
