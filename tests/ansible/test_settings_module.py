"""starling.mesh.settings: module logic on a fake client, then the check -> apply -> re-run -> diff cycle
against a real coordinator through ansible-playbook (its own coordinator: the module changes mesh settings)."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from tests.ansible import collection_loader
from tests.ansible.conftest import Ansible
from tests.ansible.test_modules_integration import assert_cycle, cycle

collection_loader.install()

from ansible_collections.starling.mesh.plugins.modules import settings  # noqa: E402

CURRENT = {
    "mesh_prefix": "100.64.0.0/16",
    "dns_domain": "starling.internal",
    "turn_servers": ["turn:198.19.0.10:3478?transport=udp"],
    "signal_url": "",
    "credential_ttl": 3600,
    "ephemeral_offline_timeout": 600,
    "peer_approval_required": False,
    "revision": 1,
}


class FakeClient:
    def __init__(self) -> None:
        self.current = copy.deepcopy(CURRENT)
        self.writes: list[tuple[str, str, Any]] = []

    def get(self, path: str) -> dict[str, Any]:
        assert path == "/settings"
        return copy.deepcopy(self.current)

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("PATCH", path, body))
        self.current.update(copy.deepcopy(body), revision=self.current["revision"] + 1)
        return copy.deepcopy(self.current)


class FakeModule:
    def __init__(self, client: FakeClient, check_mode: bool = False, **params: Any) -> None:
        self.client = client
        self.check_mode = check_mode
        self.params = {key: None for key in settings.KEYS} | params


def test_only_differences_are_sent_and_rerun_changes_nothing() -> None:
    c = FakeClient()
    want = {"turn_servers": CURRENT["turn_servers"], "signal_url": "ws://198.19.0.11:8081/ws", "credential_ttl": 3600}
    res = settings.run(FakeModule(c, **want))
    assert res["changed"] and c.writes == [("PATCH", "/settings", {"signal_url": "ws://198.19.0.11:8081/ws"})]
    assert (
        res["diff"]["before"]["signal_url"] == "" and res["diff"]["after"]["signal_url"] == "ws://198.19.0.11:8081/ws"
    )
    assert settings.run(FakeModule(c, **want))["changed"] is False and len(c.writes) == 1


def test_check_mode_predicts_and_writes_nothing() -> None:
    c = FakeClient()
    res = settings.run(FakeModule(c, True, turn_servers=[], peer_approval_required=True))
    assert res["changed"] and res["settings"]["turn_servers"] == [] and res["settings"]["peer_approval_required"]
    assert c.writes == []


def test_order_of_turn_servers_matters() -> None:
    c = FakeClient()
    c.current["turn_servers"] = ["turn:a:3478", "turn:b:3478"]
    res = settings.run(FakeModule(c, turn_servers=["turn:b:3478", "turn:a:3478"]))
    assert res["changed"] and c.writes[0][2] == {"turn_servers": ["turn:b:3478", "turn:a:3478"]}


# ----- against a real coordinator ----------------------------------------------------------------
@pytest.mark.slow
def test_settings_cycle(ansible: Ansible, api: httpx.Client) -> None:
    args = {
        "turn_servers": ["turn:198.19.0.10:3478?transport=udp", "stun:198.19.0.10:3478"],
        "signal_url": "ws://198.19.0.11:8081/ws",
        "credential_ttl": 1800,
    }
    run = ansible.playbook(
        [
            *cycle("settings", args),
            {"name": "bad", "starling.mesh.settings": {"signal_url": "http://nope"}, "ignore_errors": True},
        ]
    )
    assert_cycle(run)
    check = run.result("check")
    assert check["diff"]["before"]["signal_url"] == "" and check["diff"]["after"]["signal_url"] == args["signal_url"]
    got = api.get("/api/v1/settings").json()
    assert got["turn_servers"] == args["turn_servers"] and got["signal_url"] == args["signal_url"]
    assert got["credential_ttl"] == 1800
    assert "422" in run.result("bad")["msg"] and "signal_url" in run.result("bad")["msg"]
    assert api.get("/api/v1/settings").json()["signal_url"] == args["signal_url"]
    audit = api.get("/api/v1/audit", params={"action": "settings.update", "limit": 100}).json()["items"]
    assert len(audit) == 1
