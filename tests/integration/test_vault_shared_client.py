"""starling_proto.vault.VaultClient against a real OpenBao server (no mocks): KV v2 versions, metadata and
check-and-set, namespaces, AppRole re-login after a revoked token, a refused token told apart from a denied
path, lease renewal, and a sealed server. State is set up with hvac, not with the client under test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from starling_proto.vault import (
    AppRoleAuth,
    TokenAuth,
    VaultCasMismatch,
    VaultClient,
    VaultDenied,
    VaultLoginFailed,
    VaultNotFound,
    VaultSealed,
    VaultTokenRejected,
)
from tests.fixtures.openbao import OpenBao, dev_server, file_server

pytestmark = pytest.mark.vault


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with dev_server(tmp_path_factory.mktemp("openbao-client")) as server:
        yield server


@pytest.fixture
def path() -> str:
    return f"client/{uuid.uuid4().hex[:12]}"


def root(bao: OpenBao, **kw: object) -> VaultClient:
    return VaultClient(bao.url, TokenAuth(token=bao.root_token), timeout=5, **kw)  # type: ignore[arg-type]


def approle(bao: OpenBao, name: str, policy: str, **role: object) -> AppRoleAuth:
    c = bao.client()
    if "approle/" not in c.sys.list_auth_methods()["data"]:
        c.sys.enable_auth_method("approle")
    c.sys.create_or_update_policy(name, policy)
    c.auth.approle.create_or_update_approle(name, token_policies=[name], **role)
    role_id = c.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = c.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    return AppRoleAuth(role_id=role_id, secret_id=secret_id)


def test_kv_versions_metadata_and_check_and_set(bao: OpenBao, path: str) -> None:
    client = root(bao)
    assert client.write("secret", path, {"value": "one"}, cas=0) == 1
    with pytest.raises(VaultCasMismatch) as exc:
        client.write("secret", path, {"value": "lost"}, cas=0)
    assert exc.value.expected == 0 and "lost" not in str(exc.value)
    with pytest.raises(VaultCasMismatch):
        client.write("secret", path, {"value": "stale"}, cas=5)
    assert client.write("secret", path, {"value": "two"}, cas=1) == 2
    assert client.write("secret", path, {"value": "three"}) == 3

    latest = client.read("secret", path)
    assert latest.data == {"value": "three"} and latest.version == 3 and latest.created_time
    assert client.read("secret", path, version=1).data == {"value": "one"}
    meta = client.read_metadata("secret", path)
    assert meta.current_version == 3 and [v.version for v in meta.versions] == [1, 2, 3]
    # hvac's view agrees: exactly what was written, nothing more
    kv = bao.client().secrets.kv.v2
    raw = kv.read_secret_version(path=path, mount_point="secret", version=2, raise_on_deleted_version=True)
    assert raw["data"]["data"] == {"value": "two"}

    kv.delete_secret_versions(path=path, versions=[3], mount_point="secret")
    deleted = client.read("secret", path)
    assert deleted.deleted and deleted.version == 3 and deleted.deletion_time
    info = client.read_metadata("secret", path).version(3)
    assert info is not None and info.deleted
    with pytest.raises(VaultNotFound) as missing:
        client.read("secret", path, version=9)
    assert not missing.value.route_missing
    with pytest.raises(VaultNotFound) as unmounted:
        client.read("nope", path)
    assert unmounted.value.route_missing and "no handler for route" in str(unmounted.value)


def test_namespace(bao: OpenBao, path: str) -> None:
    namespace = f"ns{uuid.uuid4().hex[:6]}"
    bao.client().write(f"sys/namespaces/{namespace}")
    scoped = hvac.Client(url=bao.url, token=bao.root_token, namespace=namespace, timeout=10)
    scoped.sys.enable_secrets_engine("kv", path="team", options={"version": "2"})
    client = root(bao, namespace=namespace)
    assert client.write("team", path, {"value": "in-namespace"}) == 1
    assert client.read("team", path).data == {"value": "in-namespace"}
    raw = scoped.secrets.kv.v2.read_secret_version(path=path, mount_point="team", raise_on_deleted_version=True)
    assert raw["data"]["data"] == {"value": "in-namespace"}
    with pytest.raises(VaultNotFound) as exc:
        root(bao).read("team", path)  # outside the namespace there is no such mount
    assert exc.value.route_missing


def test_approle_logs_in_again_after_its_token_is_revoked(bao: OpenBao, path: str) -> None:
    root(bao).write("secret", path, {"value": "v"})
    name = f"client-{uuid.uuid4().hex[:6]}"
    auth = approle(bao, name, f'path "secret/data/{path}" {{ capabilities = ["read"] }}')
    client = VaultClient(bao.url, auth, timeout=5)
    assert client.read("secret", path).data == {"value": "v"}
    first = client.token
    assert first is not None and client.renewable
    bao.client().auth.token.revoke(first)
    assert client.read("secret", path).data == {"value": "v"}
    assert client.token not in (None, first)

    with pytest.raises(VaultDenied) as exc:  # a fresh token that still may not: the policy's verdict
        client.read("secret", path + "-other")
    assert type(exc.value) is VaultDenied and "permission denied reading secret/data/" in str(exc.value)
    assert auth.secret_id is not None and auth.secret_id not in str(exc.value) + repr(client)

    bad = AppRoleAuth(role_id=auth.role_id, secret_id="00000000-0000-0000-0000-000000000000")
    with pytest.raises(VaultLoginFailed) as login:
        VaultClient(bao.url, bad, timeout=5).read("secret", path)
    assert login.value.status == 400 and "invalid role or secret ID" in str(login.value)


def test_a_refused_token_is_told_apart_from_a_denied_path(bao: OpenBao, path: str, tmp_path: Path) -> None:
    name = f"narrow-{uuid.uuid4().hex[:6]}"
    bao.client().sys.create_or_update_policy(name, f'path "secret/data/{path}" {{ capabilities = ["read"] }}')
    narrow = bao.client().auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    with pytest.raises(VaultDenied) as denied:
        VaultClient(bao.url, TokenAuth(token=narrow)).read("secret", path + "-other")
    assert type(denied.value) is VaultDenied

    bad = "s.not-a-token-" + uuid.uuid4().hex
    with pytest.raises(VaultTokenRejected) as rejected:
        VaultClient(bao.url, TokenAuth(token=bad)).read("secret", path)
    assert bad not in str(rejected.value)

    # A token file whose token was revoked is read again: an operator may have put a new token there.
    token_file = tmp_path / "token"
    token_file.write_text(narrow + "\n")
    client = VaultClient(bao.url, TokenAuth(token_file=token_file))
    root(bao).write("secret", path, {"value": "v"})
    assert client.read("secret", path).data == {"value": "v"}
    bao.client().auth.token.revoke(narrow)
    token_file.write_text(bao.root_token + "\n")
    assert client.read("secret", path).data == {"value": "v"} and client.token == bao.root_token


def test_renewal(bao: OpenBao, path: str) -> None:
    name = f"renew-{uuid.uuid4().hex[:6]}"
    auth = approle(bao, name, 'path "secret/data/x" { capabilities = ["read"] }', token_ttl="60s", token_max_ttl="1h")
    client = VaultClient(bao.url, auth, timeout=5)
    assert client.lookup_self()["ttl"] <= 60
    first = client.token_expires
    assert not client.renew_if_due()
    client.renew_at = 0.0  # pretend half the lease has passed
    assert client.renew_if_due() and client.token_expires > first
    assert 50 <= client.lookup_self()["ttl"] <= 60


def test_sealed(tmp_path: Path) -> None:
    with file_server(tmp_path / "bao") as bao:
        auth = approle(bao, "sealed", 'path "secret/data/*" { capabilities = ["read"] }')
        client = root(bao)
        client.write("secret", "s", {"value": "v"})
        bao.seal()
        try:
            with pytest.raises(VaultSealed) as exc:
                client.read("secret", "s")
            assert exc.value.state == "sealed" and bao.url in str(exc.value)
            with pytest.raises(VaultSealed) as login:
                VaultClient(bao.url, auth, timeout=5).read("secret", "s")
            assert login.value.login
        finally:
            bao.unseal()
        assert client.read("secret", "s").data == {"value": "v"}
