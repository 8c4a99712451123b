"""Unit tests of the modules' logic with an in-memory coordinator (no HTTP, no ansible-playbook)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.ansible import collection_loader

collection_loader.install()

from ansible_collections.starling.mesh.plugins.modules import (  # noqa: E402
    group,
    peer,
    policy,
    policy_set,
    setup_key,
)


class Failed(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__(kwargs["msg"])
        self.result = kwargs


class FakeClient:
    """Collections of objects by name; every write is recorded."""

    def __init__(self, **collections: list[dict[str, Any]]) -> None:
        self.data: dict[str, dict[str, dict[str, Any]]] = {
            f"/{k.replace('_', '-')}": {o["name"]: copy.deepcopy(o) for o in v} for k, v in collections.items()
        }
        for path in ("/groups", "/policies", "/peers", "/routes", "/setup-keys", "/tokens"):
            self.data.setdefault(path, {})
        self.writes: list[tuple[str, str, Any]] = []
        self._n = 0

    def _by_id(self, path: str) -> tuple[str, dict[str, Any]]:
        coll, _, item_id = path.rpartition("/")
        for obj in self.data[coll].values():
            if obj["id"] == item_id:
                return coll, obj
        raise KeyError(path)

    def find_by_name(self, coll: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.data[coll].get(name))

    def list_all(self, coll: str, params: Any = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for _, o in sorted(self.data[coll].items())]

    def missing_peers(self, names: Any) -> list[str]:
        return sorted(set(names) - set(self.data["/peers"]))

    def missing_groups(self, names: Any) -> list[str]:
        return sorted(set(names) - set(self.data["/groups"]))

    def missing_routes(self, names: Any) -> list[str]:
        return sorted(set(names) - set(self.data["/routes"]))

    @staticmethod
    def item_path(coll: str, item_id: str) -> str:
        return f"{coll}/{item_id}"

    def post(self, coll: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("POST", coll, body))
        self._n += 1
        obj = {"id": f"id{self._n}", **copy.deepcopy(body)}
        self.data[coll][obj["name"]] = obj
        return copy.deepcopy(obj)

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("PATCH", path, body))
        _coll, obj = self._by_id(path)
        obj.update(copy.deepcopy(body))
        return copy.deepcopy(obj)

    def delete(self, path: str) -> None:
        self.writes.append(("DELETE", path, None))
        coll, obj = self._by_id(path)
        del self.data[coll][obj["name"]]


class FakeModule:
    def __init__(self, client: FakeClient, check_mode: bool = False, **params: Any) -> None:
        self.client = client
        self.check_mode = check_mode
        self.params = params
        self.no_log = False
        self.warnings: list[str] = []

    def fail_json(self, **kwargs: Any) -> None:
        raise Failed(kwargs)

    def warn(self, text: str) -> None:
        self.warnings.append(text)


def G(name: str, peers: list[str] | None = None, description: str = "") -> dict[str, Any]:
    return {"id": f"g-{name}", "name": name, "description": description, "peers": peers or []}


def POL(name: str, src: str, dst: str, protocol: str = "any", ports: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": f"p-{name}",
        "name": name,
        "description": "",
        "enabled": True,
        "protocol": protocol,
        "ports": ports or [],
        "bidirectional": False,
        "sources": {"groups": [src], "peers": []},
        "destinations": {"groups": [dst], "peers": []},
    }


# ----- group / policy / setup_key / peer -----------------------------------------------------------
def group_params(**kw: Any) -> dict[str, Any]:
    return {"name": "db", "description": None, "peers": None, "append": False, "state": "present", **kw}


def test_group_check_mode_predicts_and_writes_nothing() -> None:
    c = FakeClient(peers=[{"id": "x", "name": "db-1", "groups": []}])
    res = group.run(FakeModule(c, True, **group_params(peers=["db-1"])))
    assert res["changed"] and res["diff"] == {
        "before": {},
        "after": {"name": "db", "description": "", "peers": ["db-1"]},
    }
    assert c.writes == []


def test_group_append_and_idempotence() -> None:
    c = FakeClient(groups=[G("db", ["a"])], peers=[{"id": "1", "name": "a"}, {"id": "2", "name": "b"}])
    res = group.run(FakeModule(c, **group_params(peers=["b"], append=True)))
    assert res["changed"] and c.writes == [("PATCH", "/groups/g-db", {"peers": ["a", "b"]})]
    assert group.run(FakeModule(c, **group_params(peers=["b", "a"])))["changed"] is False


def test_group_unknown_peer_fails_before_change() -> None:
    c = FakeClient()
    with pytest.raises(Failed, match="unknown peers: ghost"):
        group.run(FakeModule(c, **group_params(peers=["ghost"])))
    assert c.writes == []


def policy_params(**kw: Any) -> dict[str, Any]:
    base = {
        "name": "p",
        "description": None,
        "enabled": None,
        "protocol": None,
        "ports": None,
        "bidirectional": None,
        "sources": None,
        "destinations": None,
        "state": "present",
    }
    return {**base, **kw}


def test_policy_partial_update_keeps_other_fields() -> None:
    c = FakeClient(groups=[G("dev"), G("db")], policies=[POL("p", "dev", "db", "tcp", ["5432"])])
    res = policy.run(FakeModule(c, **policy_params(ports=["5432", "22"])))
    assert c.writes == [("PATCH", "/policies/p-p", {"ports": ["22", "5432"]})]
    assert res["diff"]["before"]["ports"] == ["5432"] and res["diff"]["after"]["ports"] == ["22", "5432"]
    c.writes.clear()
    assert policy.run(FakeModule(c, **policy_params(ports=["22", "5432", "22"])))["changed"] is False
    assert c.writes == []


def test_policy_unknown_group_and_bad_port_fail_without_writes() -> None:
    c = FakeClient(groups=[G("dev")])
    ends = {"sources": {"groups": ["dev"], "peers": []}, "destinations": {"groups": ["db"], "peers": []}}
    with pytest.raises(Failed, match="unknown groups: db"):
        policy.run(FakeModule(c, **policy_params(**ends)))
    with pytest.raises(Failed, match="invalid port"):
        policy.run(FakeModule(c, **policy_params(protocol="udp", ports=["99999"], **ends)))
    assert c.writes == []


def key_params(**kw: Any) -> dict[str, Any]:
    return {
        "name": "k",
        "reusable": False,
        "usage_limit": 0,
        "expires_in": None,
        "auto_groups": None,
        "ephemeral": False,
        "state": "present",
        **kw,
    }


def test_setup_key_clear_key_only_on_create() -> None:
    c = FakeClient()
    original = c.post

    def post(coll: str, body: dict[str, Any]) -> dict[str, Any]:
        obj = original(coll, body)
        c.data[coll][body["name"]].update(usage_limit=1, revoked=False, state="valid")
        return {**obj, "usage_limit": 1, "revoked": False, "key": "ssk_clear"}

    c.post = post  # type: ignore[method-assign]
    module = FakeModule(c, **key_params())
    res = setup_key.run(module)
    assert res["key"] == "ssk_clear" and "key" not in res["setup_key"] and module.warnings
    assert "ssk_clear" not in str(res["diff"])
    res = setup_key.run(FakeModule(c, **key_params()))
    assert res["changed"] is False and "key" not in res
    # Under no_log the task already is where the warning would tell it to be: no warning.
    quiet = FakeModule(c, **key_params(name="other"))
    quiet.no_log = True
    res = setup_key.run(quiet)
    assert res["key"] == "ssk_clear" and quiet.warnings == []


def test_peer_rename_is_idempotent() -> None:
    c = FakeClient(peers=[{"id": "1", "name": "new", "groups": [], "approved": True}])
    res = peer.run(
        FakeModule(
            c, name="old", new_name="new", groups=None, append=False, approved=None, exit_node=None, state="present"
        )
    )
    assert res["changed"] is False and c.writes == []


# ----- policy_set ----------------------------------------------------------------------------------
def set_params(**kw: Any) -> dict[str, Any]:
    return {"groups": [], "policies": [], "routes": None, "expect": [], "exclusive": True, **kw}


def declared_groups(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "description": "", "peers": None} for n in names]


def run_set(c: FakeClient, check: bool = False, **kw: Any) -> dict[str, Any]:
    return policy_set.PolicySet(FakeModule(c, check, **set_params(**kw))).run()


def test_policy_set_plan_order_and_apply() -> None:
    c = FakeClient(groups=[G("ci"), G("db"), G("old")], policies=[POL("ci-db", "ci", "db"), POL("gone", "old", "db")])
    pols = [
        {
            "name": "ci-db",
            "protocol": "tcp",
            "ports": [22],
            "sources": {"groups": ["ci"]},
            "destinations": {"groups": ["db"]},
        },
        {"name": "dev-db", "sources": {"groups": ["dev"]}, "destinations": {"groups": ["db"]}},
    ]
    res = run_set(c, True, groups=declared_groups("ci", "db", "dev"), policies=pols)
    assert c.writes == []
    assert [(s["action"], s["kind"], s["name"]) for s in res["plan"]] == [
        ("create", "group", "dev"),
        ("update", "policy", "ci-db"),
        ("create", "policy", "dev-db"),
        ("delete", "policy", "gone"),
        ("delete", "group", "old"),
    ]
    assert "+ dev -> db any" in res["reachability_lines"] and "- old -> db any" in res["reachability_lines"]
    assert "- ci -> db udp" in res["reachability_lines"]
    res = run_set(c, groups=declared_groups("ci", "db", "dev"), policies=pols)
    assert res["applied"] == 5 and [w[0] for w in c.writes] == ["POST", "PATCH", "POST", "DELETE", "DELETE"]
    assert set(c.data["/groups"]) == {"ci", "db", "dev"} and set(c.data["/policies"]) == {"ci-db", "dev-db"}


def test_policy_set_failures_before_any_write() -> None:
    c = FakeClient(
        groups=[G("ci"), G("db")],
        policies=[POL("ci-db", "ci", "db")],
        setup_keys=[{"id": "k", "name": "key", "auto_groups": ["ci"]}],
    )
    pols = [{"name": "ci-db", "sources": {"groups": ["ci"]}, "destinations": {"groups": ["db"]}}]
    with pytest.raises(
        Failed,
        match="assertions failed, nothing was changed: expect\\[0\\]: expected ci -> db tcp/5432 denied"
        ", but it is allowed \\(opened by ci-db\\)",
    ):
        run_set(
            c,
            groups=declared_groups("ci", "db"),
            policies=pols,
            expect=[{"from": "ci", "to": "db", "port": 5432, "allowed": False}],
        )
    with pytest.raises(Failed, match="auto-group of setup key 'key'"):
        run_set(c, groups=declared_groups("db"), policies=[])
    with pytest.raises(Failed, match="unknown groups dev \\(declare them under groups\\)"):
        run_set(
            c,
            groups=declared_groups("ci", "db"),
            policies=[{"name": "x", "sources": {"groups": ["dev"]}, "destinations": {"groups": ["db"]}}],
        )
    with pytest.raises(Failed, match="policy 'x' is declared twice"):
        run_set(
            c,
            groups=declared_groups("ci", "db"),
            policies=pols + [{"name": "x", "sources": {"groups": ["ci"]}, "destinations": {"groups": ["db"]}}] * 2,
        )
    assert c.writes == []


def test_policy_set_peer_assertion_uses_declared_membership() -> None:
    c = FakeClient(groups=[G("ci"), G("db")], peers=[{"id": "1", "name": "db-1", "groups": []}])
    pols = [
        {
            "name": "ci-db",
            "protocol": "tcp",
            "ports": [5432],
            "sources": {"groups": ["ci"]},
            "destinations": {"groups": ["db"]},
        }
    ]
    groups = [{"name": "ci", "description": "", "peers": None}, {"name": "db", "description": "", "peers": ["db-1"]}]
    res = run_set(
        c,
        True,
        groups=groups,
        policies=pols,
        expect=[
            {"from": "ci", "to": "peer:db-1", "port": 5432, "allowed": True},
            {"from": "ci", "to": "db-1", "protocol": "udp", "allowed": False},
        ],
    )
    assert [a["ok"] for a in res["assertions"]] == [True, True]


def test_policy_set_midway_failure_reports_applied_steps() -> None:
    from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError

    c = FakeClient(groups=[G("db")])
    original = c.post

    def post(coll: str, body: dict[str, Any]) -> dict[str, Any]:
        if coll == "/policies":
            raise CoordinatorError("POST /policies failed (503 error): down", status=503)
        return original(coll, body)

    c.post = post  # type: ignore[method-assign]
    with pytest.raises(Failed) as err:
        run_set(
            c,
            groups=declared_groups("db", "ci"),
            policies=[{"name": "p", "sources": {"groups": ["ci"]}, "destinations": {"groups": ["db"]}}],
        )
    assert "step 2 of 2 (create policy 'p') failed" in err.value.result["msg"]
    assert "Applied before it: create group 'ci'" in err.value.result["msg"]
    assert err.value.result["applied"] == 1
