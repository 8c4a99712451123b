"""The collection's Vault side against a real OpenBao server (no mocks): the modules run through real
`ansible-playbook` processes (collection on ANSIBLE_COLLECTIONS_PATH), state is checked and prepared with hvac
directly (not with the module under test)."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.ansible.conftest import BIN, REPO, PlayRun, ansible_env
from tests.fixtures.openbao import OpenBao, dev_server, file_server, free_port

pytestmark = pytest.mark.vault


def uniq(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with dev_server(tmp_path_factory.mktemp("openbao-dev")) as server:
        yield server


@pytest.fixture(scope="module")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collections")
    (root / "ansible_collections" / "starling").mkdir(parents=True)
    (root / "ansible_collections" / "starling" / "mesh").symlink_to(REPO)
    return root


@dataclass
class Play:
    """Writes and runs playbooks against localhost with the Vault module defaults set."""

    collections_path: Path
    workdir: Path
    url: str
    token: str

    def run(
        self,
        tasks: list[dict[str, Any]] | None = None,
        *,
        plays: list[dict[str, Any]] | None = None,
        inventory: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        url: str | None = None,
    ) -> PlayRun:
        name = uuid.uuid4().hex[:8]
        if plays is None:
            plays = [
                {
                    "name": "test",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "module_defaults": {"group/starling.mesh.vault": {"url": url or self.url, "token": self.token}},
                    "tasks": tasks or [],
                }
            ]
        path = self.workdir / f"play-{name}.yml"
        path.write_text(yaml.safe_dump(plays, sort_keys=False))
        inv = "localhost,"
        if inventory is not None:
            inv_path = self.workdir / f"inventory-{name}.yml"
            inv_path.write_text(yaml.safe_dump(inventory, sort_keys=False))
            inv = str(inv_path)
        record = self.workdir / f"record-{name}.json"
        env = ansible_env(
            self.collections_path, self.workdir / "home", STARLING_RECORD_FILE=str(record), ANSIBLE_PIPELINING="True"
        )
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", inv, str(path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        results = json.loads(record.read_text()) if record.exists() else []
        return PlayRun(proc.returncode, proc.stdout, proc.stderr, results)


@pytest.fixture
def play(collections_path: Path, bao: OpenBao, tmp_path: Path) -> Play:
    return Play(collections_path, tmp_path, bao.url, bao.root_token)


@pytest.fixture
def kv(bao: OpenBao) -> str:
    """A fresh KV v2 mount per test (created with hvac, not with the module under test)."""
    mount = uniq("kv")
    bao.client().sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    return mount


def versions(bao: OpenBao, mount: str, path: str) -> tuple[int, dict[str, Any]]:
    meta = bao.client().secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)["data"]
    return int(meta["current_version"]), meta["versions"]


def read(bao: OpenBao, mount: str, path: str, version: int | None = None) -> dict[str, Any]:
    resp = bao.client().secrets.kv.v2.read_secret_version(
        path=path, version=version, mount_point=mount, raise_on_deleted_version=True
    )
    return dict(resp["data"]["data"])


def public_of(private_b64: str) -> str:
    raw = base64.b64decode(private_b64)
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(pub).decode()


def wg(peer: str, mount: str, **extra: Any) -> dict[str, Any]:
    return {"starling.mesh.wireguard_key": {"peer": peer, "mount": mount, **extra}}


# ----- wireguard_key -----------------------------------------------------------------------------
def test_wireguard_key_lifecycle(play: Play, bao: OpenBao, kv: str, tmp_path: Path) -> None:
    peer, keyfile = "web1", tmp_path / "private.key"
    run = play.run(
        [
            {"name": "check", **wg(peer, kv), "check_mode": True, "diff": True},
            {"name": "create", **wg(peer, kv), "diff": True},
            {"name": "again", **wg(peer, kv), "diff": True},
            {"name": "rotate-check", **wg(peer, kv, rotate=True), "check_mode": True, "diff": True},
            {"name": "rotate", **wg(peer, kv, rotate=True), "diff": True},
            {"name": "restore", **wg(peer, kv, restore_version=1), "diff": True},
            {"name": "restore-again", **wg(peer, kv, restore_version=1)},
            {"name": "private", **wg(peer, kv, return_private_key=True), "no_log": True, "register": "priv"},
            {
                "name": "keep",
                "ansible.builtin.copy": {"content": "{{ priv.private_key }}", "dest": str(keyfile), "mode": "0600"},
                "no_log": True,
            },
            {"name": "private-logged", **wg(peer, kv, return_private_key=True), "ignore_errors": True},
            {"name": "bad-peer", **wg("Bad_Name", kv), "ignore_errors": True},
            {"name": "bad-restore", **wg(peer, kv, restore_version=9), "ignore_errors": True},
        ]
    )
    assert run.rc == 0, run.stdout + run.stderr
    check = run.result("check")
    assert check["changed"] is True and check["public_key"] is None and "public key" in check["msg"]
    assert check["diff"]["before"] == {} and check["diff"]["after"]["version"] == 1
    created = run.result("create")
    assert created["changed"] and created["created"] and created["version"] == 1  # check mode wrote nothing
    assert created["path"] == f"mesh/peers/{peer}/wireguard" and "private_key" not in created
    again = run.result("again")
    assert again["changed"] is False and again["public_key"] == created["public_key"] and again["version"] == 1
    assert run.result("rotate-check")["changed"] is True and run.result("rotate-check")["version"] == 2
    rotated = run.result("rotate")
    assert rotated["version"] == 2 and rotated["previous_version"] == 1  # rotate-check wrote nothing
    assert rotated["previous_public_key"] == created["public_key"] != rotated["public_key"]
    assert rotated["diff"]["before"] == {"public_key": created["public_key"], "version": 1}
    assert rotated["diff"]["after"] == {"public_key": rotated["public_key"], "version": 2}
    restored = run.result("restore")
    assert restored["version"] == 3 and restored["public_key"] == created["public_key"]
    assert restored["previous_public_key"] == rotated["public_key"]
    assert run.result("restore-again")["changed"] is False
    logged = run.result("private-logged")
    assert run.task("private-logged")["status"] == "failed"
    assert "no_log: true" in logged["msg"] and "private_key" not in logged
    assert "not a valid peer name" in run.result("bad-peer")["msg"]
    assert "cannot restore version 9" in run.result("bad-restore")["msg"]

    current, history = versions(bao, kv, f"mesh/peers/{peer}/wireguard")
    assert current == 3 and sorted(history) == ["1", "2", "3"]
    v1, v2, v3 = (read(bao, kv, f"mesh/peers/{peer}/wireguard", v) for v in (1, 2, 3))
    assert v3 == v1 and set(v1) == {"private_key", "public_key", "created_at"}
    assert v1["created_at"].endswith("Z")
    raw = base64.b64decode(v2["private_key"])
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40  # clamped
    assert public_of(v2["private_key"]) == v2["public_key"] == rotated["public_key"]
    assert keyfile.read_text() == v3["private_key"]
    everything = run.stdout + run.stderr + json.dumps(run.results)
    for data in (v1, v2):
        assert data["private_key"] not in everything


def test_wireguard_key_cas_conflict(play: Play, bao: OpenBao, kv: str) -> None:
    """A write between the read and the write (simulated with expected_version, and for real with
    module_utils' kv_write) fails with a clear message and writes nothing."""
    path = "mesh/peers/db1/wireguard"
    run = play.run([{"name": "create", **wg("db1", kv)}])
    assert run.rc == 0, run.stdout
    foreign = {"private_key": base64.b64encode(bytes(32)).decode(), "public_key": "x", "created_at": "now"}
    bao.client().secrets.kv.v2.create_or_update_secret(path=path, secret=foreign, cas=1, mount_point=kv)
    run = play.run(
        [
            {"name": "stale", **wg("db1", kv, rotate=True, expected_version=1), "ignore_errors": True},
            {"name": "stale-check", **wg("db1", kv, rotate=True, expected_version=1), "check_mode": True,
             "ignore_errors": True},
            {"name": "new-key-race", **wg("db2", kv, expected_version=0)},
        ]
    )
    stale = run.result("stale")
    assert run.task("stale")["status"] == "failed" and stale["changed"] is False
    assert "changed concurrently: expected version 1 but Vault has version 2" in stale["msg"], stale["msg"]
    assert "nothing was written" in stale["msg"]
    assert "changed concurrently: expected version 1" in run.result("stale-check")["msg"]
    assert versions(bao, kv, path)[0] == 2 and read(bao, kv, path) == foreign
    assert run.result("new-key-race")["version"] == 1


# ----- the vault role ----------------------------------------------------------------------------
def role_inventory(tmp_path: Path, peers: tuple[str, ...]) -> dict[str, Any]:
    hosts = {
        peer: {
            "ansible_connection": "local",
            "starling_vault_role_id_file": str(tmp_path / peer / "etc" / "vault-role-id"),
            "starling_vault_secret_id_file": str(tmp_path / peer / "etc" / "vault-secret-id"),
        }
        for peer in peers
    }
    return {
        "all": {
            "hosts": {"localhost": {"ansible_connection": "local"}},
            "children": {"starling_agents": {"hosts": hosts}},
        }
    }


def role_play(bao: OpenBao, mount: str, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "vault",
            "hosts": "localhost",
            "gather_facts": False,
            "roles": [
                {
                    "role": "starling.mesh.vault",
                    "starling_vault_url": bao.url,
                    "starling_vault_token": bao.root_token,
                    "starling_vault_mount": mount,
                    "starling_vault_credentials_owner": "",
                    "starling_vault_credentials_group": "",
                    **extra,
                }
            ],
        }
    ]


def approle_login(bao: OpenBao, role_id: str, secret_id: str) -> hvac.Client:
    client = hvac.Client(url=bao.url, timeout=10)
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    return client


def changed_tasks(run: PlayRun) -> list[str]:
    return [f"{r['task']} ({r['host']})" for r in run.results if r["result"].get("changed")]


@pytest.mark.slow
def test_vault_role(play: Play, bao: OpenBao, tmp_path: Path) -> None:
    mount, peers = uniq("role"), ("peer-a", "peer-b")
    inventory = role_inventory(tmp_path, peers)
    check = play.run(plays=role_play(bao, mount), inventory=inventory, args=("--check",))
    assert check.rc == 0, check.stdout + check.stderr
    assert f"{mount}/" not in bao.client().sys.list_mounted_secrets_engines()["data"]  # check mode wrote nothing
    assert not (tmp_path / "peer-a").exists()

    first = play.run(plays=role_play(bao, mount), inventory=inventory)
    assert first.rc == 0, first.stdout + first.stderr
    second = play.run(plays=role_play(bao, mount), inventory=inventory)
    assert second.rc == 0, second.stdout + second.stderr
    assert changed_tasks(second) == []
    assert "changed=0" in second.stdout

    files = {p: (tmp_path / p / "etc" / "vault-role-id", tmp_path / p / "etc" / "vault-secret-id") for p in peers}
    for role_file, secret_file in files.values():
        assert role_file.stat().st_mode & 0o777 == 0o600 and secret_file.stat().st_mode & 0o777 == 0o600
    secret_a = files["peer-a"][1].read_text()
    for text in (first.stdout, second.stdout, json.dumps(first.results)):
        assert secret_a not in text

    a = approle_login(bao, files["peer-a"][0].read_text(), secret_a)
    key_a = a.secrets.kv.v2.read_secret_version(path="mesh/peers/peer-a/wireguard", mount_point=mount)
    assert set(key_a["data"]["data"]) == {"private_key", "public_key", "created_at"}
    assert key_a["auth"] is None and a.auth.token.lookup_self()["data"]["renewable"] is True
    for denied in ("mesh/peers/peer-b/wireguard", "mesh/coordinator/turn_secret"):
        with pytest.raises(hvac.exceptions.Forbidden):
            a.secrets.kv.v2.read_secret_version(path=denied, mount_point=mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        a.secrets.kv.v2.create_or_update_secret(path="mesh/peers/peer-a/wireguard", secret={"x": "y"}, mount_point=mount)

    root = bao.client()
    root.secrets.kv.v2.create_or_update_secret(
        path="mesh/coordinator/turn_secret", secret={"value": "turn"}, cas=0, mount_point=mount
    )
    relay_role = "starling-mesh-relay"
    relay = approle_login(
        bao,
        root.auth.approle.read_role_id(relay_role)["data"]["role_id"],
        root.auth.approle.generate_secret_id(relay_role)["data"]["secret_id"],
    )
    turn = relay.secrets.kv.v2.read_secret_version(path="mesh/coordinator/turn_secret", mount_point=mount)
    assert turn["data"]["data"] == {"value": "turn"}
    with pytest.raises(hvac.exceptions.Forbidden):
        relay.secrets.kv.v2.read_secret_version(path="mesh/peers/peer-a/wireguard", mount_point=mount)
    role = root.auth.approle.read_role("starling-mesh-peer-peer-a")["data"]
    assert role["token_ttl"] == 3600 and role["token_max_ttl"] == 86400 and role["secret_id_ttl"] == 0
    assert role["token_policies"] == ["starling-mesh-peer-peer-a"]

    # rotation of the secret IDs: new files, the old secret ID no longer logs in
    rotated = play.run(plays=role_play(bao, mount, starling_vault_rotate_secret_id=True), inventory=inventory)
    assert rotated.rc == 0, rotated.stdout + rotated.stderr
    assert files["peer-a"][1].read_text() != secret_a
    with pytest.raises(hvac.exceptions.InvalidRequest):
        approle_login(bao, files["peer-a"][0].read_text(), secret_a)
    approle_login(bao, files["peer-a"][0].read_text(), files["peer-a"][1].read_text())
