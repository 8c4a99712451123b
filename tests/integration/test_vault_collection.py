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
    """Someone wrote between the task's read and its write (expected_version = the version an earlier task saw):
    a clear failure and nothing written."""
    path, c = "mesh/peers/db1/wireguard", bao.client()
    mine = {"private_key": base64.b64encode(bytes(range(32))).decode(), "created_at": "2025-01-01T00:00:00Z"}
    foreign = dict(mine, created_at="2025-01-02T00:00:00Z")
    c.secrets.kv.v2.create_or_update_secret(path=path, secret=mine, cas=0, mount_point=kv)
    c.secrets.kv.v2.create_or_update_secret(path=path, secret=foreign, cas=1, mount_point=kv)
    run = play.run(
        [
            {"name": "stale", **wg("db1", kv, rotate=True, expected_version=1), "ignore_errors": True},
            {
                "name": "stale-check",
                **wg("db1", kv, rotate=True, expected_version=1),
                "check_mode": True,
                "ignore_errors": True,
            },
            {"name": "stale-restore", **wg("db1", kv, restore_version=1, expected_version=1), "ignore_errors": True},
        ]
    )
    for name in ("stale", "stale-check", "stale-restore"):
        result = run.result(name)
        assert run.task(name)["status"] == "failed" and result["changed"] is False
        assert "changed concurrently: expected version 1 but Vault has version 2" in result["msg"], result["msg"]
        assert "nothing was written" in result["msg"]
    assert versions(bao, kv, path)[0] == 2 and read(bao, kv, path) == foreign


def test_kv_write_race_module_utils(bao: OpenBao, kv: str) -> None:
    """The real interleaving, in-process: read (version 1), another writer (version 2), CAS write -> refused."""
    from tests.ansible import collection_loader

    collection_loader.install()
    from ansible_collections.starling.mesh.plugins.module_utils import _vault  # type: ignore[import-not-found]

    vault = _vault.Vault({"url": bao.url, "token": bao.root_token, "auth_method": "token", "timeout": 10})
    path = "mesh/coordinator/turn_secret"
    assert vault.kv_write(kv, path, {"value": "one"}, cas=0) == 1
    entry = vault.kv_read(kv, path)
    assert (entry.version, entry.data) == (1, {"value": "one"})
    bao.client().secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "two"}, cas=1, mount_point=kv)
    with pytest.raises(_vault.VaultCasMismatch) as exc:
        vault.kv_write(kv, path, {"value": "three"}, cas=entry.version, what="secret x")
    assert (exc.value.expected, exc.value.current) == (1, 2)
    expected = f"secret x at {kv}/data/{path} changed concurrently: expected version 1 but Vault has version 2"
    assert expected in exc.value.msg
    assert "three" not in exc.value.msg and vault.writes == [f"wrote {kv}/data/{path}"]
    with pytest.raises(_vault.VaultCasMismatch, match=r"expected version 0 \(no secret yet\) but Vault has version 2"):
        vault.kv_write(kv, path, {"value": "four"}, cas=0)
    assert read(bao, kv, path) == {"value": "two"} and versions(bao, kv, path)[0] == 2


@pytest.mark.slow
def test_file_storage_sealed(collections_path: Path, tmp_path: Path) -> None:
    """A real server with on-disk storage (init/unseal): the module writes there; once sealed, every module fails
    with a clear message and nothing changes."""
    with file_server(tmp_path / "openbao") as server:
        server.client().sys.enable_secrets_engine("kv", path="starling", options={"version": "2"})
        play = Play(collections_path, tmp_path, server.url, server.root_token)
        run = play.run([{"name": "create", "starling.mesh.wireguard_key": {"peer": "db1"}}])
        assert run.rc == 0, run.stdout + run.stderr
        before = read(server, "starling", "mesh/peers/db1/wireguard")
        server.seal()
        run = play.run(
            [
                {"name": "rotate", **wg("db1", "starling", rotate=True), "ignore_errors": True},
                {"name": "secret", **sec("coordinator/turn_secret", "starling", generate=True), "ignore_errors": True},
            ]
        )
        for name in ("rotate", "secret"):
            msg = run.result(name)["msg"]
            assert run.task(name)["status"] == "failed" and run.result(name)["changed"] is False
            assert msg.startswith(f"Vault at {server.url} is sealed (while reading starling/metadata/mesh/"), msg
            assert msg.endswith("unseal it and re-run; nothing was changed"), msg
        server.unseal()
        assert versions(server, "starling", "mesh/peers/db1/wireguard")[0] == 1
        assert read(server, "starling", "mesh/peers/db1/wireguard") == before
        with pytest.raises(hvac.exceptions.InvalidPath):
            server.client().secrets.kv.v2.read_secret_metadata(
                path="mesh/coordinator/turn_secret", mount_point="starling"
            )


# ----- vault_secret --------------------------------------------------------------------------------
def sec(path: str, mount: str, **extra: Any) -> dict[str, Any]:
    return {"starling.mesh.vault_secret": {"path": path, "mount": mount, **extra}}


@pytest.mark.slow
def test_vault_secret(play: Play, bao: OpenBao, kv: str, tmp_path: Path) -> None:
    turn, tok, out = "coordinator/turn_secret", "tokens/ci", tmp_path / "value"
    run = play.run(
        [
            {"name": "gen-check", **sec(turn, kv, generate=True), "check_mode": True, "diff": True},
            {"name": "gen", **sec(turn, kv, generate=True), "diff": True},
            {"name": "gen-again", **sec(turn, kv, generate=True)},
            {"name": "rotate", **sec(turn, kv, rotate=True), "diff": True},
            {"name": "set", **sec(turn, kv, value="s3cr3t-value"), "diff": True},
            {"name": "set-again", **sec(turn, kv, value="s3cr3t-value")},
            {"name": "restore", **sec(turn, kv, restore_version=1)},
            {"name": "read", **sec(turn, kv, return_value=True), "no_log": True, "register": "got"},
            {"name": "keep", "ansible.builtin.copy": {"content": "{{ got.value }}", "dest": str(out)}, "no_log": True},
            {"name": "signing", **sec("coordinator/signing_key", kv, generate=True, encoding="base64")},
            {"name": "admin", **sec("coordinator/admin_token", kv, generate=True, value_prefix="sat_", length=24)},
            {"name": "token", **sec(tok, kv, value="sat_tok", fields={"scope": "read"}), "diff": True},
            {"name": "token-fields", **sec(tok, kv, value="sat_tok", fields={"scope": "write"}), "diff": True},
            {"name": "absent", **sec(tok, kv, state="absent"), "diff": True},
            {"name": "absent-again", **sec(tok, kv, state="absent")},
            {"name": "missing", **sec("tokens/none", kv), "ignore_errors": True},
            {"name": "bad-path", **sec("../x", kv, generate=True), "ignore_errors": True},
            {"name": "no-mount", **sec(turn, "nomount", generate=True), "ignore_errors": True},
            {"name": "bad-token", **sec(turn, kv, token="hvs.not-a-token"), "ignore_errors": True},
            {
                "name": "unreachable",
                **sec(turn, kv, generate=True, url=f"http://127.0.0.1:{free_port()}"),
                "ignore_errors": True,
            },
        ]
    )
    assert run.rc == 0, run.stdout + run.stderr
    assert run.result("gen-check")["changed"] and run.result("gen-check")["diff"]["before"] == {}
    assert run.result("gen")["version"] == 1 and run.result("gen")["created"] is True  # check mode wrote nothing
    assert run.result("gen-again")["changed"] is False and run.result("gen-again")["version"] == 1
    rotated = run.result("rotate")
    assert rotated["version"] == 2 and rotated["previous_version"] == 1
    assert rotated["diff"]["after"]["value"] == "(hidden, changed)"
    assert run.result("set")["version"] == 3 and run.result("set-again")["changed"] is False
    assert run.result("restore")["version"] == 4
    v1, v2, v3, v4 = (read(bao, kv, f"mesh/{turn}", v) for v in (1, 2, 3, 4))
    assert v4 == v1 != v2 and v3 == {"value": "s3cr3t-value"} and len(v1["value"]) == 43  # token_urlsafe(32)
    assert out.read_text() == v1["value"]
    assert len(base64.b64decode(read(bao, kv, "mesh/coordinator/signing_key")["value"], validate=True)) == 32
    assert read(bao, kv, "mesh/coordinator/admin_token")["value"].startswith("sat_")
    fields = run.result("token-fields")
    assert fields["version"] == 2 and fields["diff"]["before"]["fields"] == {"scope": "read"}
    assert fields["diff"]["after"] == {"version": 2, "value": "(hidden)", "fields": {"scope": "write"}}
    assert run.result("absent")["changed"] and run.result("absent-again")["changed"] is False
    assert versions(bao, kv, f"mesh/{tok}")[1]["2"]["deletion_time"]  # soft delete: history kept
    assert read(bao, kv, f"mesh/{tok}", 1) == {"value": "sat_tok", "scope": "read"}
    assert "does not exist" in run.result("missing")["msg"]
    assert "path '../x' is invalid" in run.result("bad-path")["msg"]
    assert "no KV v2 secrets engine is mounted at nomount/" in run.result("no-mount")["msg"]
    assert "rejected the token (invalid, expired or revoked)" in run.result("bad-token")["msg"]
    unreachable = run.result("unreachable")["msg"]
    assert "is unreachable (connection failed while reading" in unreachable and "nothing was changed" in unreachable
    everything = run.stdout + run.stderr + json.dumps(run.results)
    for value in (v1["value"], v2["value"], "s3cr3t-value", bao.root_token):
        assert value not in everything


# ----- vault_kv_mount, vault_policy, vault_approle --------------------------------------------------
@pytest.mark.slow
def test_mount_policy_approle(play: Play, bao: OpenBao, tmp_path: Path) -> None:
    mount, kv1, pol, role, amount = uniq("m"), uniq("v1"), uniq("pol-"), uniq("role-"), uniq("ar")
    root = bao.client()
    root.sys.enable_secrets_engine("kv", path=kv1, options={"version": "1"})
    paths = {f"{mount}/data/mesh/peers/a/wireguard": ["read"], f"{mount}/metadata/mesh/*": ["list", "read"]}
    approle = {
        "name": role,
        "approle_mount": amount,
        "token_policies": [pol],
        "token_ttl": "1h",
        "token_max_ttl": 86400,
    }
    out = tmp_path / "secret-id"
    login = {"auth_method": "approle", "approle_mount": amount, "role_id": "{{ created.role_id }}"}
    as_role = wg("a", mount, **login, secret_id="{{ sid.secret_id }}")
    bad_login = wg("a", mount, **login, secret_id="not-the-secret-id")
    run = play.run(
        [
            {"name": "mount-check", "starling.mesh.vault_kv_mount": {"mount": mount}, "check_mode": True},
            {"name": "mount", "starling.mesh.vault_kv_mount": {"mount": mount, "max_versions": 5}, "diff": True},
            {"name": "mount-again", "starling.mesh.vault_kv_mount": {"mount": mount, "max_versions": 5}},
            {"name": "mount-more", "starling.mesh.vault_kv_mount": {"mount": mount, "max_versions": 7}, "diff": True},
            {"name": "mount-kv1", "starling.mesh.vault_kv_mount": {"mount": kv1}, "ignore_errors": True},
            {"name": "pol-check", "starling.mesh.vault_policy": {"name": pol, "paths": paths}, "check_mode": True},
            {"name": "pol", "starling.mesh.vault_policy": {"name": pol, "paths": paths}, "diff": True},
            {"name": "pol-again", "starling.mesh.vault_policy": {"name": pol, "paths": paths}},
            {
                "name": "pol-bad",
                "starling.mesh.vault_policy": {"name": pol, "paths": {"x/*": ["rread"]}},
                "ignore_errors": True,
            },
            {"name": "role-check", "starling.mesh.vault_approle": approle, "check_mode": True},
            {"name": "role", "starling.mesh.vault_approle": approle, "diff": True, "register": "created"},
            {"name": "role-again", "starling.mesh.vault_approle": approle},
            {
                "name": "sid",
                "starling.mesh.vault_approle": {"name": role, "approle_mount": amount, "generate_secret_id": True},
                "no_log": True,
                "register": "sid",
            },
            {
                "name": "keep",
                "ansible.builtin.copy": {"content": "{{ sid.secret_id }}", "dest": str(out)},
                "no_log": True,
            },
            {
                "name": "prune",
                "starling.mesh.vault_approle": {"name": role, "approle_mount": amount, "keep_secret_id_accessors": []},
                "check_mode": True,
            },
            {"name": "pol-absent", "starling.mesh.vault_policy": {"name": pol + "-x", "state": "absent"}},
            {"name": "as-role-check", **as_role, "check_mode": True},
            {"name": "as-role", **as_role, "ignore_errors": True},
            {"name": "bad-secret-id", **bad_login, "ignore_errors": True},
            {"name": "key-on-kv1", **wg("a", kv1), "ignore_errors": True},
        ]
    )
    assert run.rc == 0, run.stdout + run.stderr
    assert run.result("mount-check")["changed"] and run.result("mount")["created"] is True
    assert run.result("mount")["config"]["max_versions"] == 5 and run.result("mount-again")["changed"] is False
    assert run.result("mount-more")["diff"]["before"]["max_versions"] == 5
    assert root.secrets.kv.v2.read_configuration(mount_point=mount)["data"]["max_versions"] == 7
    assert "KV version 1 engine is mounted at" in run.result("mount-kv1")["msg"]
    assert root.sys.list_mounted_secrets_engines()["data"][f"{kv1}/"]["options"]["version"] == "1"
    text = run.result("pol")["policy"]
    assert run.result("pol")["diff"]["after"] == text and f'path "{mount}/data/mesh/peers/a/wireguard"' in text
    assert 'capabilities = ["read", "list"]' in text and run.result("pol-again")["changed"] is False
    assert root.sys.read_acl_policy(pol)["data"]["policy"] == text
    assert "unknown capabilities rread" in run.result("pol-bad")["msg"]
    assert run.result("role-check")["role_id"] is None and run.result("role-check")["changed"]
    created = run.result("role")
    assert created["role"]["token_ttl"] == 3600 and created["role"]["token_max_ttl"] == 86400
    assert run.result("role-again")["changed"] is False and run.result("role-again")["role_id"] == created["role_id"]
    assert run.result("prune")["changed"] and len(run.result("prune")["destroyed_secret_id_accessors"]) == 1
    login = hvac.Client(url=bao.url, timeout=10)
    login.auth.approle.login(role_id=created["role_id"], secret_id=out.read_text(), mount_point=amount)
    assert pol in login.auth.token.lookup_self()["data"]["policies"]
    assert out.read_text() not in run.stdout + json.dumps(run.results)
    assert run.result("as-role-check")["changed"] is True  # the AppRole may read the metadata and its key
    denied = run.result("as-role")["msg"]
    assert denied == (
        f"Vault at {bao.url}: permission denied on {mount}/data/mesh/peers/a/wireguard (writing); nothing was changed"
    )
    assert f"the secrets engine at {kv1}/ is KV version 1, not KV version 2" in run.result("key-on-kv1")["msg"]
    with pytest.raises(hvac.exceptions.InvalidPath):  # nothing was written there
        root.secrets.kv.v1.list_secrets(path="", mount_point=kv1)
    bad = run.result("bad-secret-id")["msg"]
    assert (
        bad.startswith(f"Vault at {bao.url}: AppRole login at auth/{amount} failed (")
        and "not-the-secret-id" not in bad
    )


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
    check = play.run(
        plays=role_play(bao, mount, starling_vault_peers=["peer-a"]), inventory=inventory, args=("--check",)
    )
    assert check.rc == 0, check.stdout + check.stderr
    assert f"{mount}/" not in bao.client().sys.list_mounted_secrets_engines()["data"]  # check mode wrote nothing
    assert not (tmp_path / "peer-a").exists()
    with pytest.raises(hvac.exceptions.InvalidPath):
        bao.client().sys.read_acl_policy("starling-mesh-peer-peer-a")

    first = play.run(plays=role_play(bao, mount), inventory=inventory)
    assert first.rc == 0, first.stdout + first.stderr
    second = play.run(plays=role_play(bao, mount), inventory=inventory)
    assert second.rc == 0, second.stdout + second.stderr
    assert changed_tasks(second) == []
    assert "changed=0" in second.stdout

    files = {p: (tmp_path / p / "etc" / "vault-role-id", tmp_path / p / "etc" / "vault-secret-id") for p in peers}
    for role_file, secret_file in files.values():
        assert role_file.stat().st_mode & 0o777 == 0o600 and secret_file.stat().st_mode & 0o777 == 0o600
    secret_a, secret_b = files["peer-a"][1].read_text(), files["peer-b"][1].read_text()
    for text in (first.stdout, second.stdout, json.dumps(first.results)):
        assert secret_a not in text

    a = approle_login(bao, files["peer-a"][0].read_text(), secret_a)
    key_a = a.secrets.kv.v2.read_secret_version(
        path="mesh/peers/peer-a/wireguard", mount_point=mount, raise_on_deleted_version=True
    )
    assert set(key_a["data"]["data"]) == {"private_key", "public_key", "created_at"}
    assert key_a["auth"] is None and a.auth.token.lookup_self()["data"]["renewable"] is True
    for denied in ("mesh/peers/peer-b/wireguard", "mesh/coordinator/turn_secret"):
        with pytest.raises(hvac.exceptions.Forbidden):
            a.secrets.kv.v2.read_secret_version(path=denied, mount_point=mount, raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        a.secrets.kv.v2.create_or_update_secret(
            path="mesh/peers/peer-a/wireguard", secret={"x": "y"}, mount_point=mount
        )

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
    turn = relay.secrets.kv.v2.read_secret_version(
        path="mesh/coordinator/turn_secret", mount_point=mount, raise_on_deleted_version=True
    )
    assert turn["data"]["data"] == {"value": "turn"}
    with pytest.raises(hvac.exceptions.Forbidden):
        relay.secrets.kv.v2.read_secret_version(
            path="mesh/peers/peer-a/wireguard", mount_point=mount, raise_on_deleted_version=True
        )
    role = root.auth.approle.read_role("starling-mesh-peer-peer-a")["data"]
    assert role["token_ttl"] == 3600 and role["token_max_ttl"] == 86400 and role["secret_id_ttl"] == 0
    assert role["token_policies"] == ["starling-mesh-peer-peer-a"]

    # rotation of peer-a's secret ID (peer tasks only): a new file, the old secret ID no longer logs in
    extra = {
        "starling_vault_rotate_secret_id": True,
        "starling_vault_peers": ["peer-a"],
        "starling_vault_peer_keys": False,
    }
    files["peer-a"][0].chmod(0o644)  # drift: the run puts it back
    rotated = play.run(
        plays=role_play(bao, mount, **extra), inventory=inventory, args=("--tags", "starling_vault_peers")
    )
    assert rotated.rc == 0, rotated.stdout + rotated.stderr
    assert files["peer-a"][1].read_text() != secret_a
    assert files["peer-a"][0].stat().st_mode & 0o777 == 0o600
    with pytest.raises(hvac.exceptions.InvalidRequest):
        approle_login(bao, files["peer-a"][0].read_text(), secret_a)
    approle_login(bao, files["peer-a"][0].read_text(), files["peer-a"][1].read_text())
    assert files["peer-b"][1].read_text() == secret_b  # only peer-a was rotated
