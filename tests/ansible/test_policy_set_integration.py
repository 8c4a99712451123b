"""policy_set and playbooks/policy.yml against a real coordinator: preview as reachability with --check --diff,
apply, idempotent re-run, assertions and bad input failing before any change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ansible.conftest import REPO, Ansible, enroll_peer, uniq
from tests.fixtures.coordinator import CoordinatorProcess

PLAYBOOK = REPO / "playbooks" / "policy.yml"


def audit_total(api: httpx.Client) -> int:
    return len(api.get("/api/v1/audit", params={"limit": 1000}).json()["items"])


def state(api: httpx.Client) -> tuple[dict[str, Any], dict[str, Any]]:
    groups = {g["name"]: g for g in api.get("/api/v1/groups", params={"limit": 1000}).json()["items"]}
    policies = {p["name"]: p for p in api.get("/api/v1/policies", params={"limit": 1000}).json()["items"]}
    return groups, policies


def write_data(directory: Path, **files: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yml"):
        old.unlink()
    for name, data in files.items():
        (directory / f"{name}.yml").write_text(yaml.safe_dump(data))
    return directory


@pytest.fixture(scope="module")
def seeded(coordinator: CoordinatorProcess) -> dict[str, Any]:
    """Current state before the declared set: groups ci, db, old; a policy ci -> db any; two peers."""
    with coordinator.client() as api:
        a = enroll_peer(coordinator, api, "alpha")
        b = enroll_peer(coordinator, api, "beta")
        for g in ("ci", "db", "old"):
            assert api.post("/api/v1/groups", json={"name": g}).status_code == 201
        api.patch(f"/api/v1/peers/{b['id']}", json={"groups": ["ci"]})
        body = {"name": "ci-db-any", "sources": {"groups": ["ci"]}, "destinations": {"groups": ["db"]}}
        assert api.post("/api/v1/policies", json=body).status_code == 201
    return {"alpha": a["name"], "beta": b["name"]}


DECLARED = {
    "groups": {
        "groups": [
            {"name": "dev", "description": "developers"},
            {"name": "ci"},
            {"name": "db", "peers": ["alpha"]},
        ]
    },
    "policies": {
        "policies": [
            {
                "name": "dev-to-db",
                "protocol": "tcp",
                "ports": [5432, "8000-8100"],
                "sources": {"groups": ["dev"]},
                "destinations": {"groups": ["db"]},
            },
            {
                "name": "ci-ping",
                "protocol": "icmp",
                "bidirectional": True,
                "sources": {"groups": ["ci"]},
                "destinations": {"peers": ["alpha"]},
            },
        ]
    },
    "expect": {
        "expect": [
            {"from": "ci", "to": "db", "port": 5432, "allowed": False},
            {"from": "dev", "to": "db", "port": 8050, "allowed": True},
            {"from": "peer:alpha", "to": "ci", "protocol": "icmp", "allowed": True},
        ]
    },
}


def test_preview_apply_rerun(ansible: Ansible, api: httpx.Client, seeded: dict[str, Any], tmp_path: Path) -> None:
    data = write_data(tmp_path / "policies", **DECLARED)
    before_audit = audit_total(api)
    preview = ansible.run_playbook(PLAYBOOK, "--check", "--diff", "-e", f"starling_policy_dir={data}")
    assert preview.rc == 0, preview.stdout + preview.stderr
    # human-readable reachability in the diff output
    for line in (
        "+ dev -> db tcp/5432,8000-8100",
        "- ci -> db any",
        "+ ci -> peer:alpha icmp",
        "+ peer:alpha -> ci icmp",
    ):
        assert line in preview.stdout, preview.stdout
    res = preview.result("Apply groups and policies")
    assert res["changed"] is True
    assert {"from": "ci", "to": "db", "protocol": "any", "ports": []} in res["reachability"]["lost"]
    assert [a["ok"] for a in res["assertions"]] == [True, True, True]
    assert res["plan"][:2] == [
        {"action": "update", "kind": "group", "name": "db", "fields": ["peers"]},
        {"action": "create", "kind": "group", "name": "dev"},
    ]
    assert res["plan"][-1] == {"action": "delete", "kind": "group", "name": "old"}
    assert audit_total(api) == before_audit  # check mode changed nothing

    applied = ansible.run_playbook(PLAYBOOK, "--diff", "-e", f"starling_policy_dir={data}")
    assert applied.rc == 0, applied.stdout
    res = applied.result("Apply groups and policies")
    assert res["changed"] is True and res["applied"] == len(res["plan"])
    groups, policies = state(api)
    assert set(groups) == {"dev", "ci", "db"} and set(policies) == {"dev-to-db", "ci-ping"}
    assert groups["db"]["peers"] == ["alpha"] and groups["ci"]["peers"] == ["beta"]  # ci membership untouched
    assert policies["dev-to-db"]["ports"] == ["5432", "8000-8100"]

    again = ansible.run_playbook(PLAYBOOK, "--check", "--diff", "-e", f"starling_policy_dir={data}")
    res = again.result("Apply groups and policies")
    assert again.rc == 0 and res["changed"] is False and res["plan"] == [] and res["reachability_lines"] == []
    assert "(no reachability change)" in again.stdout
    again = ansible.run_playbook(PLAYBOOK, "-e", f"starling_policy_dir={data}")
    assert again.result("Apply groups and policies")["changed"] is False


def run_set(ansible: Ansible, **args: Any) -> dict[str, Any]:
    run = ansible.playbook([{"name": "set", "starling.mesh.policy_set": args, "ignore_errors": True}])
    return run.task("set")


@pytest.mark.slow
def test_failures_change_nothing(ansible: Ansible, api: httpx.Client, seeded: dict[str, Any]) -> None:
    groups = DECLARED["groups"]["groups"]
    policies = DECLARED["policies"]["policies"]
    base_groups, base_policies = state(api)
    key = api.post("/api/v1/setup-keys", json={"name": uniq("k"), "auto_groups": ["ci"]}).json()
    before = audit_total(api)
    extra_pol = {
        "name": "new",
        "protocol": "tcp",
        "ports": [22],
        "sources": {"groups": ["ci"]},
        "destinations": {"groups": ["db"]},
    }
    cases: dict[str, tuple[dict[str, Any], list[str]]] = {
        "assertion": (
            {
                "groups": groups,
                "policies": [*policies, extra_pol],
                "expect": [{"from": "ci", "to": "db", "port": 22, "allowed": False, "name": "no-ci-db"}],
            },
            ["reachability assertions failed, nothing was changed", "no-ci-db", "opened by new"],
        ),
        "unknown-group": (
            {"groups": groups, "policies": [{**extra_pol, "sources": {"groups": ["nope"]}}], "exclusive": False},
            ["unknown groups nope"],
        ),
        "bad-ports": (
            {"groups": groups, "policies": [{**extra_pol, "ports": ["0", "22-21", "http"]}], "exclusive": False},
            ["invalid data, nothing was changed", "outside 1-65535", "starts after it ends", "'http' is not a number"],
        ),
        "ports-icmp": (
            {"groups": groups, "policies": [{**extra_pol, "protocol": "icmp"}], "exclusive": False},
            ["ports need protocol tcp or udp"],
        ),
        "unknown-peer": (
            {"groups": [*groups, {"name": "db2", "peers": ["ghost"]}], "policies": policies, "exclusive": False},
            ["unknown peers: ghost"],
        ),
        "unknown-subject": (
            {"groups": groups, "policies": policies, "expect": [{"from": "ci", "to": "nobody", "allowed": False}]},
            ["unknown group or peer 'nobody'"],
        ),
        "auto-group": (
            {"groups": [g for g in groups if g["name"] != "ci"], "policies": [policies[0]]},
            ["is an auto-group of setup key"],
        ),
    }
    run = ansible.playbook(
        [{"name": name, "starling.mesh.policy_set": args, "ignore_errors": True} for name, (args, _) in cases.items()]
    )
    for name, (_, expected) in cases.items():
        task = run.task(name)
        assert task["status"] == "failed", (name, task["result"])
        for text in expected:
            assert text in task["result"]["msg"], (name, task["result"]["msg"])
    api.delete(f"/api/v1/setup-keys/{key['id']}")
    assert state(api) == (base_groups, base_policies)
    assert audit_total(api) == before + 1  # only the helper's key delete


def test_non_exclusive_keeps_undeclared(ansible: Ansible, api: httpx.Client, seeded: dict[str, Any]) -> None:
    name = uniq("extra")
    res = run_set(
        ansible,
        exclusive=False,
        groups=[{"name": name}],
        policies=[{"name": name, "sources": {"groups": [name]}, "destinations": {"groups": ["db"]}, "protocol": "udp"}],
    )
    assert res["status"] == "ok" and res["result"]["changed"] is True
    assert res["result"]["reachability_lines"] == [f"+ {name} -> db udp"]
    groups, policies = state(api)
    assert {name, "dev", "ci", "db"} <= set(groups) and {name, "dev-to-db"} <= set(policies)
    api.delete(f"/api/v1/policies/{policies[name]['id']}")
    api.delete(f"/api/v1/groups/{groups[name]['id']}")
