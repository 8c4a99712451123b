"""Routes through the collection against a real coordinator, with real ansible-playbook runs: the route module
(check mode -> apply -> idempotent re-run -> diff; bad prefix and overlap fail clearly and change nothing), route
destinations in policy and policy_set (the reachability preview names the prefix), and peer exit_node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ansible.conftest import REPO, Ansible, enroll_peer, uniq
from tests.ansible.test_modules_integration import assert_cycle, audit_total, cycle
from tests.fixtures.coordinator import CoordinatorProcess

PLAYBOOK = REPO / "playbooks" / "policy.yml"


@pytest.fixture(scope="module")
def lan(coordinator: CoordinatorProcess) -> dict[str, Any]:
    """Two gateway peers (gw1; gw2 in group gws), a client peer in group staff, an exit peer."""
    with coordinator.client() as api:
        peers = {n: enroll_peer(coordinator, api, uniq(n)) for n in ("gw1", "gw2", "laptop", "exit")}
        for g in ("gws", "staff"):
            assert api.post("/api/v1/groups", json={"name": g}).status_code == 201
        api.patch(f"/api/v1/peers/{peers['gw2']['id']}", json={"groups": ["gws"]})
        api.patch(f"/api/v1/peers/{peers['laptop']['id']}", json={"groups": ["staff"]})
    return {k: v["name"] for k, v in peers.items()} | {"ids": {k: v["id"] for k, v in peers.items()}}


def routes(api: httpx.Client) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in api.get("/api/v1/routes", params={"limit": 1000}).json()["items"]}


def test_route_cycle_idempotent_and_diff(ansible: Ansible, api: httpx.Client, lan: dict[str, Any]) -> None:
    name = uniq("lan")
    args = {
        "name": name,
        "prefix": "198.18.40.0/24",
        "routers": [{"group": "gws", "metric": 100}, {"peer": lan["gw1"], "metric": 10}],
    }
    same_reordered = {**args, "routers": [{"peer": lan["gw1"], "metric": 10}, {"group": "gws", "metric": 100}]}
    run = ansible.playbook(
        [
            *cycle("route", args),
            {"name": "reordered", "starling.mesh.route": same_reordered, "diff": True},
            {"name": "metric", "starling.mesh.route": {"name": name, "routers": [{"peer": lan["gw1"]}]}, "diff": True},
            {"name": "masq", "starling.mesh.route": {"name": name, "masquerade": False}, "diff": True},
        ]
    )
    assert_cycle(run)
    check = run.result("check")
    assert check["diff"]["before"] == {}
    assert check["diff"]["after"] == {
        "name": name,
        "description": "",
        "prefix": "198.18.40.0/24",
        "routers": [{"peer": lan["gw1"], "metric": 10}, {"group": "gws", "metric": 100}],
        "masquerade": True,
        "enabled": True,
    }
    applied = run.result("apply")["route"]
    assert applied["exit_node"] is False and {"peer": lan["gw1"], "group": None, "metric": 10} in applied["routers"]
    assert check["diff"]["after"] == run.result("apply")["diff"]["after"]  # check mode predicted the real result
    assert run.result("reordered")["changed"] is False
    metric = run.result("metric")
    assert metric["changed"] is True and metric["diff"]["after"]["routers"] == [{"peer": lan["gw1"], "metric": 9999}]
    masq = run.result("masq")
    assert masq["diff"]["before"]["masquerade"] is True and masq["diff"]["after"]["masquerade"] is False
    got = routes(api)[name]
    assert got["masquerade"] is False and got["routers"] == [{"peer": lan["gw1"], "group": None, "metric": 9999}]
    run = ansible.playbook(cycle("route", {"name": name, "state": "absent"}))
    assert_cycle(run)
    assert name not in routes(api)


def test_route_bad_input_fails_clearly_and_changes_nothing(
    ansible: Ansible, api: httpx.Client, lan: dict[str, Any]
) -> None:
    other = uniq("office")
    assert (
        api.post(
            "/api/v1/routes", json={"name": other, "prefix": "198.19.64.0/20", "routers": [{"peer": lan["gw2"]}]}
        ).status_code
        == 201
    )
    before_routes, before_audit = routes(api), audit_total(api)
    gw = [{"peer": lan["gw1"]}]
    cases = {
        "host-bits": ({"prefix": "198.18.40.1/24", "routers": gw}, "not an IPv4 prefix in canonical form"),
        "mesh": ({"prefix": "100.64.0.0/16", "routers": gw}, "overlaps the mesh range"),
        "loopback": ({"prefix": "127.0.0.0/8", "routers": gw}, "overlaps 127.0.0.0/8 (loopback)"),
        "overlap": ({"prefix": "198.19.64.0/24", "routers": gw}, f"overlaps route '{other}' (198.19.64.0/20)"),
        "unknown-group": ({"prefix": "198.18.41.0/24", "routers": [{"group": "nope"}]}, "unknown groups: nope"),
        "both": ({"prefix": "198.18.41.0/24", "routers": [{"group": "gws", "peer": lan["gw1"]}]}, "mutually exclusive"),
        "no-routers": ({"prefix": "198.18.41.0/24", "routers": []}, "at least one routing peer"),
        "create-without-prefix": ({"routers": gw}, "prefix and routers are required"),
    }
    tasks = []
    for label, (args, _) in cases.items():
        for check in (True, False):
            tasks.append(
                {
                    "name": f"{label}-{check}",
                    "starling.mesh.route": {"name": uniq("bad"), **args},
                    "check_mode": check,
                    "ignore_errors": True,
                }
            )
    # a rule only the coordinator checks (description length): its 422 message comes through, in one line
    too_long = {"prefix": "198.18.42.0/24", "routers": gw, "description": "x" * 2000}
    tasks.append({"name": "api-422", "starling.mesh.route": {"name": uniq("bad"), **too_long}, "ignore_errors": True})
    run = ansible.playbook(tasks)
    for label, (_, text) in cases.items():
        for check in (True, False):
            task = run.task(f"{label}-{check}")
            assert task["status"] == "failed", (label, check, task["result"])
            assert text in task["result"]["msg"], (label, check, task["result"]["msg"])
    api_msg = run.result("api-422")["msg"]
    assert api_msg.startswith("POST /routes failed (422") and "description" in api_msg, api_msg
    assert routes(api) == before_routes and audit_total(api) == before_audit
    api.delete(f"/api/v1/routes/{before_routes[other]['id']}")


def test_policy_and_policy_set_with_route_destinations(
    ansible: Ansible, api: httpx.Client, lan: dict[str, Any]
) -> None:
    route = {"name": "clinic-lan", "prefix": "198.18.40.0/24", "routers": [{"group": "gws", "metric": 100}]}
    web = {
        "name": "staff-to-clinic-web",
        "protocol": "tcp",
        "ports": [443],
        "sources": {"groups": ["staff"]},
        "destinations": {"routes": ["clinic-lan"]},
    }
    declared = {
        "groups": [{"name": "gws"}, {"name": "staff"}],
        "routes": [route],
        "policies": [web],
        "expect": [
            {"from": "staff", "to": "route:clinic-lan", "port": 443, "allowed": True},
            {"from": "staff", "to": "route:clinic-lan", "port": 22, "allowed": False},
        ],
    }
    before = audit_total(api)
    run = ansible.playbook([{"name": "preview", "starling.mesh.policy_set": declared}], args=("--check", "--diff"))
    assert run.rc == 0, run.stdout + run.stderr
    assert "+ staff -> 198.18.40.0/24 (route clinic-lan) tcp/443" in run.stdout, run.stdout
    res = run.result("preview")
    assert res["changed"] is True and [(s["action"], s["kind"]) for s in res["plan"]] == [
        ("create", "route"),
        ("create", "policy"),
    ]
    assert res["reachability"]["gained"] == [
        {"from": "staff", "to": "route:clinic-lan", "prefix": "198.18.40.0/24", "protocol": "tcp", "ports": ["443"]}
    ]
    assert audit_total(api) == before  # check mode changed nothing

    run = ansible.playbook(
        [
            {"name": "apply", "starling.mesh.policy_set": declared, "diff": True},
            {"name": "again", "starling.mesh.policy_set": declared, "diff": True},
            # the policy module on the same policy: idempotent, and refuses bidirectional with routes
            {"name": "policy-same", "starling.mesh.policy": web},
            {
                "name": "policy-bidir",
                "starling.mesh.policy": {"name": web["name"], "bidirectional": True},
                "ignore_errors": True,
            },
            {
                "name": "policy-unknown-route",
                "starling.mesh.policy": {**web, "name": uniq("p"), "destinations": {"routes": ["nope"]}},
                "ignore_errors": True,
            },
            # the route moves: the preview shows the access to the old prefix lost and to the new one gained
            {
                "name": "move",
                "starling.mesh.policy_set": {**declared, "routes": [{**route, "prefix": "198.18.48.0/24"}]},
                "check_mode": True,
            },
        ]
    )
    assert run.result("apply")["applied"] == 2, run.stdout
    assert run.result("again")["changed"] is False and run.result("again")["plan"] == []
    assert run.result("policy-same")["changed"] is False
    assert "cannot be bidirectional" in run.result("policy-bidir")["msg"]
    assert "unknown routes: nope" in run.result("policy-unknown-route")["msg"]
    assert run.result("move")["reachability_lines"] == [
        "+ staff -> 198.18.48.0/24 (route clinic-lan) tcp/443",
        "- staff -> 198.18.40.0/24 (route clinic-lan) tcp/443",
    ]
    pol = api.get("/api/v1/policies", params={"name": web["name"]}).json()["items"][0]
    assert pol["destinations"]["routes"] == ["clinic-lan"] and pol["bidirectional"] is False
    assert routes(api)["clinic-lan"]["prefix"] == "198.18.40.0/24"

    # without routes the set leaves them alone; dropping them (routes: []) deletes the policy, then the route
    run = ansible.playbook(
        [
            {"name": "unmanaged", "starling.mesh.policy_set": {k: v for k, v in declared.items() if k != "routes"}},
            {
                "name": "drop",
                "starling.mesh.policy_set": {"groups": declared["groups"], "routes": [], "policies": []},
                "diff": True,
            },
        ]
    )
    assert run.result("unmanaged")["changed"] is False
    drop = run.result("drop")
    assert [(s["action"], s["kind"]) for s in drop["plan"]] == [("delete", "policy"), ("delete", "route")]
    assert drop["reachability_lines"] == ["- staff -> 198.18.40.0/24 (route clinic-lan) tcp/443"]
    assert "clinic-lan" not in routes(api)


def test_peer_exit_node(ansible: Ansible, api: httpx.Client, lan: dict[str, Any]) -> None:
    exit_route = api.post(
        "/api/v1/routes", json={"name": uniq("internet"), "prefix": "0.0.0.0/0", "routers": [{"peer": lan["exit"]}]}
    ).json()
    assert exit_route["exit_node"] is True
    laptop = lan["laptop"]
    run = ansible.playbook(
        [
            *cycle("peer", {"name": laptop, "exit_node": lan["exit"]}),
            {
                "name": "not-exit",
                "starling.mesh.peer": {"name": laptop, "exit_node": lan["gw1"]},
                "check_mode": True,
                "ignore_errors": True,
            },
            {"name": "clear", "starling.mesh.peer": {"name": laptop, "exit_node": ""}, "diff": True},
            {"name": "clear-again", "starling.mesh.peer": {"name": laptop, "exit_node": ""}},
        ]
    )
    assert_cycle(run)
    assert run.result("check")["diff"]["before"]["exit_node"] is None
    assert run.result("check")["diff"]["after"]["exit_node"] == lan["exit"]
    assert run.result("apply")["peer"]["exit_node"] == lan["exit"]
    assert f"{lan['gw1']!r} is not an exit node" in run.result("not-exit")["msg"]
    clear = run.result("clear")
    assert clear["changed"] is True and clear["diff"]["after"]["exit_node"] is None
    assert run.result("clear-again")["changed"] is False
    assert api.get(f"/api/v1/peers/{lan['ids']['laptop']}").json()["exit_node"] is None
    api.delete(f"/api/v1/routes/{exit_route['id']}")


def test_mesh_info_lists_routes(ansible: Ansible, api: httpx.Client, lan: dict[str, Any]) -> None:
    name = uniq("info")
    api.post("/api/v1/routes", json={"name": name, "prefix": "198.18.90.0/24", "routers": [{"group": "gws"}]})
    run = ansible.playbook([{"name": "info", "starling.mesh.mesh_info": {"gather": ["routes"], "name": name}}])
    assert [r["prefix"] for r in run.result("info")["routes"]] == ["198.18.90.0/24"]
    api.delete(f"/api/v1/routes/{routes(api)[name]['id']}")


def test_policy_playbook_with_routes_file(
    ansible: Ansible, api: httpx.Client, lan: dict[str, Any], tmp_path: Path
) -> None:
    """playbooks/policy.yml manages routes when a data file has a `routes` key (last: the set is exclusive)."""
    data = tmp_path / "policies"
    data.mkdir()
    (data / "clinic.yml").write_text(
        yaml.safe_dump(
            {
                "groups": [{"name": "gws"}, {"name": "staff"}],
                "routes": [{"name": "clinic-db", "prefix": "198.18.44.0/24", "routers": [{"peer": lan["gw1"]}]}],
                "policies": [
                    {
                        "name": "staff-db",
                        "protocol": "tcp",
                        "ports": [5432],
                        "sources": {"groups": ["staff"]},
                        "destinations": {"routes": ["clinic-db"]},
                    }
                ],
            }
        )
    )
    preview = ansible.run_playbook(PLAYBOOK, "--check", "--diff", "-e", f"starling_policy_dir={data}")
    assert preview.rc == 0, preview.stdout + preview.stderr
    assert "+ staff -> 198.18.44.0/24 (route clinic-db) tcp/5432" in preview.stdout, preview.stdout
    assert "clinic-db" not in routes(api)
    applied = ansible.run_playbook(PLAYBOOK, "-e", f"starling_policy_dir={data}")
    assert applied.rc == 0, applied.stdout
    assert routes(api)["clinic-db"]["routers"] == [{"peer": lan["gw1"], "group": None, "metric": 9999}]
    again = ansible.run_playbook(PLAYBOOK, "--check", "--diff", "-e", f"starling_policy_dir={data}")
    assert again.result("Apply groups and policies")["changed"] is False
