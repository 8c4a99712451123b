"""VaultSecrets against a real OpenBao server (no mocks)."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.secrets import SecretError, VaultSecrets, ensure_secrets, load_secret_source
from tests.fixtures.openbao import OpenBao, dev_server, file_server, free_port

pytestmark = pytest.mark.vault


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with dev_server(tmp_path_factory.mktemp("openbao-dev")) as server:
        yield server


@pytest.fixture
def sealable_bao(tmp_path: Path) -> Iterator[OpenBao]:
    with file_server(tmp_path / "openbao") as server:
        yield server


@pytest.fixture
def path() -> str:
    """A fresh secrets path per test, so tests sharing the module's server never collide."""
    return f"starling/test-{uuid.uuid4().hex[:12]}"


def vault(bao: OpenBao, path: str, **kw: object) -> VaultSecrets:
    kw.setdefault("token", bao.root_token)
    return VaultSecrets(url=bao.url, path=path, timeout=5, **kw)  # type: ignore[arg-type]


@dataclass
class AppRole:
    role_id: str
    secret_id: str


@pytest.fixture(scope="module")
def approle(bao: OpenBao) -> AppRole:
    c = bao.client()
    c.sys.enable_auth_method("approle")
    c.sys.create_or_update_policy(
        "starling-coordinator-read", 'path "secret/data/starling/coordinator/*" { capabilities = ["read"] }'
    )
    c.auth.approle.create_or_update_approle("coordinator", token_policies=["starling-coordinator-read"])
    role_id = c.auth.approle.read_role_id("coordinator")["data"]["role_id"]
    secret_id = c.auth.approle.generate_secret_id("coordinator")["data"]["secret_id"]
    return AppRole(role_id, secret_id)


def test_token_get_create_round_trip(bao: OpenBao, path: str) -> None:
    src = vault(bao, path)
    assert src.get("admin_token") is None
    assert src.create("admin_token", "sat_one") == "sat_one"
    assert src.get("admin_token") == "sat_one"
    assert vault(bao, path).get("admin_token") == "sat_one"  # a new client sees it too
    # one KV v2 entry per secret, with the single field "value"
    raw = bao.client().secrets.kv.v2.read_secret_version(
        path=f"{path}/admin_token", mount_point="secret", raise_on_deleted_version=True
    )
    assert raw["data"]["data"] == {"value": "sat_one"}


def test_token_file(bao: OpenBao, path: str, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(bao.root_token + "\n")
    src = VaultSecrets(url=bao.url, path=path, token_file=tmp_path / "token")
    assert src.create("turn_secret", "t") == "t"
    assert bao.root_token not in repr(src)


def test_create_if_absent_race(bao: OpenBao, path: str) -> None:
    a, b = vault(bao, path), vault(bao, path)
    assert a.create("turn_secret", "first") == "first"
    assert b.create("turn_secret", "second") == "first"
    assert a.get("turn_secret") == "first"
    # and a real concurrent race: every writer ends up with the single winner's value
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: vault(bao, path).create("admin_token", f"v{i}"), range(8)))
    assert len(set(results)) == 1
    assert vault(bao, path).get("admin_token") == results[0]


def test_kv_metadata_version_1(bao: OpenBao, path: str) -> None:
    src = vault(bao, path)
    src.create("signing_key", "x")
    src.create("signing_key", "y")  # a no-op: the entry exists
    meta = bao.client().secrets.kv.v2.read_secret_metadata(path=f"{path}/signing_key", mount_point="secret")
    assert meta["data"]["current_version"] == 1
    assert sorted(meta["data"]["versions"]) == ["1"]


def test_approle_read_only_policy(bao: OpenBao, approle: AppRole, tmp_path: Path) -> None:
    key = f"k{uuid.uuid4().hex[:8]}"
    vault(bao, "starling/coordinator").create(key, "from-root")
    (tmp_path / "secret_id").write_text(approle.secret_id)
    src = VaultSecrets(url=bao.url, role_id=approle.role_id, secret_id_file=tmp_path / "secret_id", timeout=5)
    assert src.get(key) == "from-root"
    assert src.get("missing-key") is None
    with pytest.raises(SecretError, match=r"permission denied writing secret/data/starling/coordinator/"):
        src.create("other", "v")
    denied = VaultSecrets(url=bao.url, path="starling/other", role_id=approle.role_id, secret_id=approle.secret_id)
    with pytest.raises(SecretError, match=r"permission denied reading secret/data/starling/other/x") as exc:
        denied.get("x")
    assert approle.secret_id not in str(exc.value)
    assert approle.secret_id not in repr(denied)


def test_approle_bad_secret_id(bao: OpenBao, approle: AppRole) -> None:
    src = VaultSecrets(url=bao.url, role_id=approle.role_id, secret_id="not-the-secret-id")
    with pytest.raises(SecretError, match="AppRole login failed") as exc:
        src.get("admin_token")
    assert "not-the-secret-id" not in str(exc.value)


def test_wrong_token(bao: OpenBao, path: str) -> None:
    bad = "hvs.wrong-token-" + uuid.uuid4().hex
    src = VaultSecrets(url=bao.url, path=path, token=bad)
    with pytest.raises(SecretError, match="token rejected") as exc:
        src.get("admin_token")
    assert bad not in str(exc.value)
    assert bao.url in str(exc.value)
    assert bad not in repr(src)


def test_missing_mount(bao: OpenBao, path: str) -> None:
    with pytest.raises(SecretError, match="no KV v2 secrets engine mounted at nope/"):
        vault(bao, path, mount="nope").get("admin_token")


def test_deleted_entry(bao: OpenBao, path: str) -> None:
    src = vault(bao, path)
    src.create("turn_secret", "v")
    kv = bao.client().secrets.kv.v2
    kv.delete_latest_version_of_secret(path=f"{path}/turn_secret", mount_point="secret")
    assert src.get("turn_secret") is None
    with pytest.raises(SecretError, match="latest version is deleted"):
        src.create("turn_secret", "w")


def test_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    src = VaultSecrets(url=url, token="t", timeout=5)
    start = time.monotonic()
    with pytest.raises(SecretError, match=r"unreachable while reading .*connection failed") as exc:
        src.get("admin_token")
    assert time.monotonic() - start < 3
    assert url in str(exc.value)


def test_sealed(sealable_bao: OpenBao) -> None:
    src = VaultSecrets(url=sealable_bao.url, token=sealable_bao.root_token)
    assert src.create("admin_token", "sat_x") == "sat_x"
    sealable_bao.seal()
    with pytest.raises(SecretError, match="sealed"):
        src.get("admin_token")
    with pytest.raises(SecretError, match="sealed"):
        src.create("turn_secret", "t")
    sealable_bao.unseal()
    assert src.get("admin_token") == "sat_x"


def test_ensure_secrets_generates_then_rereads(bao: OpenBao, path: str) -> None:
    first = ensure_secrets(vault(bao, path))
    assert first["admin_token"].startswith("sat_")
    assert len(base64.b64decode(first["signing_key"], validate=True)) == 32
    assert ensure_secrets(vault(bao, path)) == first


def test_load_secret_source_vault(bao: OpenBao, path: str, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(bao.root_token)
    cfg = {
        "source": "vault",
        "vault": {
            "url": bao.url,
            "mount": "secret",
            "path": path,
            "token_file": str(tmp_path / "token"),
            "verify": False,
        },
    }
    src = load_secret_source(cfg, tmp_path / "state")
    assert src.name == "vault"
    assert ensure_secrets(src) == ensure_secrets(load_secret_source(cfg, tmp_path / "state"))
    assert not (tmp_path / "state").exists()  # nothing written locally with vault
