"""Each module against a real coordinator through real ansible-playbook runs:
check mode -> apply -> idempotent re-run -> diff; and bad input (clear msg, nothing changed)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.ansible.conftest import Ansible, enroll_peer, uniq
from tests.fixtures.coordinator import CoordinatorProcess


def cycle(module: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Tasks: check (with diff), apply, re-run, re-run in check mode."""
    task = {f"starling.mesh.{module}": args}
    return [
        {"name": "check", **task, "check_mode": True, "diff": True},
        {"name": "apply", **task, "diff": True},
        {"name": "again", **task, "diff": True},
        {"name": "again-check", **task, "check_mode": True},
    ]


def assert_cycle(run: Any) -> None:
    assert run.rc == 0, run.stdout + run.stderr
    assert run.result("check")["changed"] is True
    assert run.result("apply")["changed"] is True
    assert run.result("again")["changed"] is False
    assert run.result("again-check")["changed"] is False


def names(api: httpx.Client, path: str) -> set[str]:
    return {item["name"] for item in api.get(f"/api/v1{path}", params={"limit": 1000}).json()["items"]}


def audit_total(api: httpx.Client) -> int:
    return len(api.get("/api/v1/audit", params={"limit": 1000}).json()["items"])


def test_group_cycle(ansible: Ansible, api: httpx.Client, coordinator: CoordinatorProcess) -> None:
    peer = enroll_peer(coordinator, api, uniq("gp"))
    name = uniq("grp")
    run = ansible.playbook(
        [
            *cycle("group", {"name": name, "description": "databases", "peers": [peer["name"]]}),
            {"name": "update", "starling.mesh.group": {"name": name, "description": "dbs"}, "diff": True},
            *cycle("group", {"name": name, "state": "absent"})[1:3],
        ]
    )
    assert run.rc == 0, run.stdout
    check = run.result("check")
    assert check["changed"] and check["diff"]["before"] == {} and check["diff"]["after"]["peers"] == [peer["name"]]
    assert run.result("apply")["group"]["peers"] == [peer["name"]]
    assert run.result("again")["changed"] is False
    update = run.result("update")
    assert update["diff"]["before"]["description"] == "databases" and update["diff"]["after"]["description"] == "dbs"
    assert update["group"]["peers"] == [peer["name"]]  # membership kept when peers is omitted
    assert name not in names(api, "/groups")


def test_group_check_mode_changes_nothing(ansible: Ansible, api: httpx.Client) -> None:
    name = uniq("grp")
    before = audit_total(api)
    run = ansible.playbook([{"name": "check", "starling.mesh.group": {"name": name}, "check_mode": True}])
    assert run.rc == 0 and run.result("check")["changed"] is True
    assert name not in names(api, "/groups")
    assert audit_total(api) == before


def test_policy_cycle(ansible: Ansible, api: httpx.Client) -> None:
    src, dst, name = uniq("dev"), uniq("db"), uniq("pol")
    for g in (src, dst):
        assert api.post("/api/v1/groups", json={"name": g}).status_code == 201
    args = {
        "name": name,
        "protocol": "tcp",
        "ports": ["5432", "8000-8100", 5432],
        "sources": {"groups": [src]},
        "destinations": {"groups": [dst]},
    }
    run = ansible.playbook(
        [
            *cycle("policy", args),
            {"name": "ports", "starling.mesh.policy": {"name": name, "ports": [22]}, "diff": True},
            {"name": "disable", "starling.mesh.policy": {"name": name, "enabled": False}},
        ]
    )
    assert_cycle(run)
    assert run.result("apply")["policy"]["ports"] == ["5432", "8000-8100"]
    ports = run.result("ports")
    assert ports["diff"]["before"]["ports"] == ["5432", "8000-8100"] and ports["diff"]["after"]["ports"] == ["22"]
    pol = api.get("/api/v1/policies", params={"name": name}).json()["items"][0]
    assert pol["enabled"] is False and pol["protocol"] == "tcp" and pol["ports"] == ["22"]
    run = ansible.playbook(cycle("policy", {"name": name, "state": "absent"}))
    assert_cycle(run)


@pytest.mark.slow
def test_setup_key_cycle_returns_key_once(ansible: Ansible, api: httpx.Client) -> None:
    group, name = uniq("web"), uniq("key")
    api.post("/api/v1/groups", json={"name": group})
    args = {"name": name, "reusable": True, "usage_limit": 5, "auto_groups": [group], "expires_in": 3600}
    run = ansible.playbook(cycle("setup_key", args))
    assert_cycle(run)
    assert "key" not in run.result("check")
    applied = run.result("apply")
    assert applied["key"].startswith("ssk_") or len(applied["key"]) > 16
    assert any("only this once" in w for w in applied.get("warnings", []))
    assert "key" not in run.result("again")
    assert applied["key"] not in str(run.result("apply")["diff"])
    run = ansible.playbook(
        [
            *cycle("setup_key", {"name": name, "reusable": True, "usage_limit": 5, "state": "revoked"}),
            {
                "name": "present-again",
                "starling.mesh.setup_key": {"name": name, "reusable": True, "usage_limit": 5},
                "ignore_errors": True,
            },
            {"name": "immutable", "starling.mesh.setup_key": {"name": name, "reusable": False}, "ignore_errors": True},
        ]
    )
    assert run.result("apply")["setup_key"]["revoked"] is True
    assert "cannot be reinstated" in run.result("present-again")["msg"]
    assert "cannot change them" in run.result("immutable")["msg"]
    run = ansible.playbook(cycle("setup_key", {"name": name, "state": "absent"}))
    assert_cycle(run)


@pytest.mark.slow
def test_token_cycle(ansible: Ansible, api: httpx.Client, coordinator: CoordinatorProcess) -> None:
    name = uniq("tok")
    run = ansible.playbook(cycle("token", {"name": name, "scope": "read"}))
    assert_cycle(run)
    secret = run.result("apply")["secret"]
    with coordinator.client(secret) as reader:
        assert reader.get("/api/v1/groups").status_code == 200
    run = ansible.playbook(
        cycle("token", {"name": name, "state": "revoked"}) + cycle("token", {"name": name, "state": "absent"})[1:3]
    )
    assert run.result("check")["changed"] and run.result("apply")["api_token"]["revoked"] is True
    with coordinator.client(secret) as reader:
        assert reader.get("/api/v1/groups").status_code == 401
    assert name not in names(api, "/tokens")


@pytest.mark.slow
def test_peer_cycle(ansible: Ansible, api: httpx.Client, coordinator: CoordinatorProcess) -> None:
    peer = enroll_peer(coordinator, api, uniq("node"))
    group, new_name = uniq("grp"), uniq("renamed")
    api.post("/api/v1/groups", json={"name": group})
    run = ansible.playbook(
        cycle("peer", {"name": peer["name"], "groups": [group], "approved": False})
        + cycle("peer", {"name": peer["name"], "new_name": new_name})[1:3]
        + [{"name": "missing", "starling.mesh.peer": {"name": uniq("nope")}, "ignore_errors": True}]
    )
    assert run.rc == 0, run.stdout
    assert run.result("check")["diff"]["after"] == {
        "name": peer["name"],
        "groups": [group],
        "approved": False,
        "exit_node": None,
    }
    got = api.get(f"/api/v1/peers/{peer['id']}").json()
    assert got["name"] == new_name and got["groups"] == [group] and got["approved"] is False
    assert "not found" in run.task("missing")["result"]["msg"]
    run = ansible.playbook(cycle("peer", {"name": new_name, "state": "absent"}))
    assert_cycle(run)
    assert api.get(f"/api/v1/peers/{peer['id']}").status_code == 404


def test_mesh_info_read_only_token_and_filters(
    ansible: Ansible, api: httpx.Client, coordinator: CoordinatorProcess
) -> None:
    group = uniq("info")
    api.post("/api/v1/groups", json={"name": group})
    peer = enroll_peer(coordinator, api, uniq("inf"))
    api.patch(f"/api/v1/peers/{peer['id']}", json={"groups": [group]})
    ro = api.post("/api/v1/tokens", json={"name": uniq("ro"), "scope": "read"}).json()["token"]
    run = ansible.playbook(
        [
            {"name": "all", "starling.mesh.mesh_info": {}, "check_mode": True},
            {"name": "filtered", "starling.mesh.mesh_info": {"gather": ["peers"], "group": group, "connected": False}},
        ],
        token=ro,
    )
    assert run.rc == 0, run.stdout
    everything = run.result("all")
    assert everything["changed"] is False and {"peers", "groups", "policies", "settings"} <= set(everything)
    assert [p["name"] for p in run.result("filtered")["peers"]] == [peer["name"]]


# ----- bad input -----------------------------------------------------------------------------------
def test_wrong_token_unreachable_url_and_env_fallback(
    ansible: Ansible, api: httpx.Client, coordinator: CoordinatorProcess
) -> None:
    name = uniq("grp")
    run = ansible.playbook(
        [{"name": "t", "starling.mesh.group": {"name": name}, "ignore_errors": True}], token="sat_wrong"
    )
    msg = run.result("t")["msg"]
    assert "authentication failed (401)" in msg and "sat_wrong" not in run.stdout
    run = ansible.playbook(
        [{"name": "t", "starling.mesh.group": {"name": name}, "ignore_errors": True}], url="http://127.0.0.1:9"
    )
    assert "cannot reach the coordinator at http://127.0.0.1:9" in run.result("t")["msg"]
    assert name not in names(api, "/groups")
    # url/token from the environment only (no module_defaults)
    run = ansible.playbook(
        [{"name": "t", "starling.mesh.group": {"name": name}, "check_mode": True}],
        module_defaults=False,
        env={"STARLING_URL": coordinator.url, "STARLING_TOKEN": coordinator.admin_token},
    )
    assert run.rc == 0 and run.result("t")["changed"] is True
    assert coordinator.admin_token not in run.stdout


def test_policy_bad_input(ansible: Ansible, api: httpx.Client) -> None:
    g = uniq("g")
    api.post("/api/v1/groups", json={"name": g})
    before = audit_total(api)
    ends = {"sources": {"groups": [g]}, "destinations": {"groups": [g]}}
    run = ansible.playbook(
        [
            {
                "name": "port",
                "starling.mesh.policy": {"name": uniq("p"), "protocol": "tcp", "ports": ["70000"], **ends},
                "ignore_errors": True,
            },
            {
                "name": "proto",
                "starling.mesh.policy": {"name": uniq("p"), "ports": ["22"], **ends},
                "ignore_errors": True,
            },
            {
                "name": "group",
                "starling.mesh.policy": {
                    "name": uniq("p"),
                    "sources": {"groups": ["no-such-group"]},
                    "destinations": {"groups": [g]},
                },
                "ignore_errors": True,
            },
            {"name": "create-without-ends", "starling.mesh.policy": {"name": uniq("p")}, "ignore_errors": True},
        ]
    )
    assert "invalid port" in run.result("port")["msg"] and "outside 1-65535" in run.result("port")["msg"]
    assert "ports need protocol tcp or udp" in run.result("proto")["msg"]
    assert "unknown groups: no-such-group" in run.result("group")["msg"]
    assert "sources and destinations are required" in run.result("create-without-ends")["msg"]
    assert audit_total(api) == before


@pytest.mark.slow
@pytest.mark.parametrize("module", ["group", "policy", "setup_key", "peer", "token", "mesh_info", "policy_set"])
def test_read_only_token_is_refused_clearly(ansible: Ansible, api: httpx.Client, module: str) -> None:
    if module == "mesh_info":
        pytest.skip("read-only module")
    ro = api.post("/api/v1/tokens", json={"name": uniq("ro"), "scope": "read"}).json()["token"]
    args: dict[str, Any] = {"name": uniq("x")}
    if module == "policy":
        args.update(sources={"groups": ["a"]}, destinations={"groups": ["a"]})
    if module == "token":
        args["scope"] = "read"
    if module == "policy_set":
        args = {"groups": [{"name": uniq("ro")}], "exclusive": False}
    run = ansible.playbook([{"name": "t", f"starling.mesh.{module}": args, "ignore_errors": True}], token=ro)
    res = run.result("t")
    assert run.task("t")["status"] == "failed", res
    assert "403" in res["msg"] or "401" in res["msg"] or "not found" in res["msg"] or "unknown" in res["msg"], res[
        "msg"
    ]
