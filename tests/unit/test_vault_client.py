"""starling_proto.vault.VaultClient without a server: httpx.MockTransport plays Vault's HTTP API (answers
shaped like OpenBao 2.x's, see tests/integration/test_vault_secrets.py for the real thing). Covers the error
mapping, re-login (AppRole after a refusal or an expired lease, token files read again), lease renewal, the
KV v2 calls and that no credential ever reaches a message or a repr."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from starling_proto.vault import (
    AppRoleAuth,
    Auth,
    TokenAuth,
    VaultCasMismatch,
    VaultClient,
    VaultCredentialError,
    VaultDenied,
    VaultError,
    VaultInvalidRequest,
    VaultLoginFailed,
    VaultNotFound,
    VaultProtocolError,
    VaultSealed,
    VaultTokenRejected,
    VaultUnavailable,
    VaultUnreachable,
)

URL = "http://127.0.0.1:8200"
SECRET_ID = "sid-7a1c0f-never-shown"
ROOT = "hvs.root-token-never-shown"

Handler = Callable[[httpx.Request], httpx.Response]


def errors(status: int, *messages: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": list(messages)})


def kv_answer(data: dict[str, Any] | None, version: int, deleted: bool = False) -> dict[str, Any]:
    meta = {"created_time": "t1", "deletion_time": "t2" if deleted else "", "destroyed": False, "version": version}
    return {"data": {"data": data, "metadata": meta}}


@dataclass
class FakeVault:
    """A scripted Vault: `routes` maps "METHOD path" to a handler; records every request."""

    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[httpx.Request] = field(default_factory=list)
    logins: int = 0
    valid_tokens: set[str] = field(default_factory=lambda: {ROOT})
    lease: int = 3600

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        path = request.url.path.removeprefix("/v1/")
        if f"{request.method} {path}" in self.routes:
            return self.routes[f"{request.method} {path}"](request)
        if path == "auth/approle/login":
            body = json.loads(request.content)
            if body != {"role_id": "rid", "secret_id": SECRET_ID}:
                return errors(400, "invalid role or secret ID")
            self.logins += 1
            token = f"hvs.approle-{self.logins}"
            self.valid_tokens.add(token)
            auth = {"client_token": token, "lease_duration": self.lease, "renewable": True}
            return httpx.Response(200, json={"auth": auth})
        if request.headers.get("X-Vault-Token") not in self.valid_tokens:
            return errors(403, "permission denied")
        if path == "auth/token/lookup-self":
            return httpx.Response(200, json={"data": {"ttl": 60}})
        if path == "secret/data/app/key":
            return httpx.Response(200, json=kv_answer({"value": "v1"}, 4))
        return errors(404)

    def client(self, auth: Auth | None = None, **kw: Any) -> VaultClient:
        return VaultClient(URL, auth or TokenAuth(token=ROOT), transport=httpx.MockTransport(self.handle), **kw)

    def paths(self) -> list[str]:
        return [r.url.path.removeprefix("/v1/") for r in self.seen]


def approle(**kw: Any) -> AppRoleAuth:
    return AppRoleAuth(role_id="rid", secret_id=SECRET_ID, **kw)


def no_secret_in(error: BaseException | str) -> None:
    text = str(error)
    assert SECRET_ID not in text and ROOT not in text and "hvs.approle" not in text


# ----- requests and KV v2 -----------------------------------------------------------------------------
def test_read_sends_token_namespace_and_parses_the_version() -> None:
    vault = FakeVault()
    secret = vault.client(namespace="team-a").read("secret", "/app/key/")
    assert secret.data == {"value": "v1"} and secret.version == 4 and not secret.deleted
    request = vault.seen[0]
    assert request.url.path == "/v1/secret/data/app/key" and not request.url.query
    assert request.headers["X-Vault-Token"] == ROOT and request.headers["X-Vault-Namespace"] == "team-a"
    assert "v1" not in repr(secret)  # a secret's repr never shows its data


def test_read_a_given_version_and_a_deleted_one() -> None:
    def versioned(request: httpx.Request) -> httpx.Response:
        version = int(request.url.params["version"])
        if version == 2:
            return httpx.Response(404, json=kv_answer(None, 2, deleted=True))
        return httpx.Response(200, json=kv_answer({"value": f"v{version}"}, version))

    vault = FakeVault(routes={"GET secret/data/app/versioned": versioned})
    client = vault.client()
    assert client.read("secret", "app/versioned", version=3).data == {"value": "v3"}
    deleted = client.read("secret", "app/versioned", version=2)
    assert deleted.deleted and deleted.data is None and deleted.version == 2 and deleted.deletion_time == "t2"


def test_not_found_and_missing_mount() -> None:
    route = 'no handler for route "nope/data/x". route entry not found.'
    vault = FakeVault(routes={"GET nope/data/x": lambda r: errors(404, route)})
    client = vault.client()
    with pytest.raises(VaultNotFound) as exc:
        client.read("secret", "missing")
    assert not exc.value.route_missing and exc.value.status == 404 and "secret/data/missing" in str(exc.value)
    with pytest.raises(VaultNotFound) as exc:
        client.read("nope", "x")
    assert exc.value.route_missing and "no handler for route" in str(exc.value) and URL in str(exc.value)


def test_write_with_check_and_set() -> None:
    bodies: list[dict[str, Any]] = []

    def write(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if body.get("options", {}).get("cas") == 0:
            return errors(400, "check-and-set parameter did not match the current version")
        return httpx.Response(200, json={"data": {"version": 5, "created_time": "t"}})

    client = FakeVault(routes={"POST secret/data/app/key": write}).client()
    assert client.write("secret", "app/key", {"value": "new"}, cas=4) == 5
    assert client.write("secret", "app/key", {"value": "any"}) == 5
    assert bodies[0] == {"data": {"value": "new"}, "options": {"cas": 4}} and bodies[1] == {"data": {"value": "any"}}
    with pytest.raises(VaultCasMismatch) as exc:
        client.write("secret", "app/key", {"value": "s3cr3t-value"}, cas=0)
    assert isinstance(exc.value, VaultInvalidRequest) and exc.value.expected == 0
    assert "changed concurrently" in str(exc.value) and "nothing was written" in str(exc.value)
    assert "s3cr3t-value" not in str(exc.value)


def test_other_bad_requests_are_invalid_requests() -> None:
    routes = {"POST secret/data/app/key": lambda r: errors(400, "no data provided")}
    with pytest.raises(VaultInvalidRequest) as exc:
        FakeVault(routes=routes).client().write("secret", "app/key", {})
    assert not isinstance(exc.value, VaultCasMismatch)
    assert exc.value.errors == ("no data provided",) and "no data provided" in str(exc.value)


def test_read_metadata() -> None:
    meta = {
        "current_version": 3,
        "oldest_version": 1,
        "max_versions": 10,
        "cas_required": False,
        "created_time": "c",
        "updated_time": "u",
        "custom_metadata": None,
        "versions": {
            "3": {"created_time": "c3", "deletion_time": "", "destroyed": False},
            "1": {"created_time": "c1", "deletion_time": "", "destroyed": True},
            "2": {"created_time": "c2", "deletion_time": "d2", "destroyed": False},
        },
    }
    routes = {"GET secret/metadata/app/key": lambda r: httpx.Response(200, json={"data": meta})}
    metadata = FakeVault(routes=routes).client().read_metadata("secret", "app/key")
    assert metadata.current_version == 3 and metadata.max_versions == 10
    assert [v.version for v in metadata.versions] == [1, 2, 3]
    assert [v.deleted for v in metadata.versions] == [True, True, False]
    info = metadata.version(2)
    assert info is not None and info.deletion_time == "d2"


def test_paths_that_leave_the_mount_are_refused() -> None:
    client = FakeVault().client()
    for path in ("../sys/seal", "a/../../b", "", "/"):
        with pytest.raises(ValueError, match="not a usable Vault path"):
            client.read("secret", path)


# ----- error mapping --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("response", "kind", "state", "words"),
    [
        (errors(503, "Vault is sealed"), VaultSealed, "sealed", ["is sealed", "secret/data/app/key"]),
        (errors(503, "standby node"), VaultUnavailable, "unavailable", ["unavailable", "503", "standby node"]),
        (errors(501, "Vault is not initialized"), VaultUnavailable, "not initialized", ["not initialized"]),
        (errors(429, "rate limit"), VaultUnavailable, "unavailable", ["429", "rate limit"]),
    ],
)
def test_unavailable_answers(response: httpx.Response, kind: type[VaultError], state: str, words: list[str]) -> None:
    client = FakeVault(routes={"GET secret/data/app/key": lambda r: response}).client()
    with pytest.raises(VaultUnavailable) as exc:
        client.read("secret", "app/key")
    assert type(exc.value) is kind and exc.value.state == state and exc.value.status == response.status_code
    assert URL in str(exc.value) and all(w in str(exc.value) for w in words), str(exc.value)
    no_secret_in(exc.value)


@pytest.mark.parametrize(
    ("failure", "timed_out", "words"),
    [
        (httpx.ConnectError("refused"), False, ["connection failed", "ConnectError"]),
        (httpx.ReadTimeout("slow"), True, ["timed out after 2.5 s"]),
        (httpx.RemoteProtocolError("reset"), False, ["connection failed", "RemoteProtocolError"]),
    ],
)
def test_unreachable(failure: httpx.HTTPError, timed_out: bool, words: list[str]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    client = VaultClient(URL, TokenAuth(token=ROOT), transport=httpx.MockTransport(fail), timeout=2.5)
    with pytest.raises(VaultUnreachable) as exc:
        client.read("secret", "app/key")
    error = exc.value
    assert isinstance(error, VaultUnavailable) and error.timed_out is timed_out and error.status is None
    assert error.action == "reading" and error.where == "secret/data/app/key" and not error.login
    assert str(error).startswith(f"Vault at {URL} is unreachable while reading secret/data/app/key")
    assert all(w in str(error) for w in words), str(error)


def test_answers_that_are_not_vault_json() -> None:
    routes = {
        "GET secret/data/app/html": lambda r: httpx.Response(200, text="<html>proxy login</html>"),
        "GET secret/data/app/boom": lambda r: httpx.Response(500, text="internal"),
        "GET secret/data/app/v1": lambda r: httpx.Response(200, json={"data": {"value": "x"}}),
    }
    client = FakeVault(routes=routes).client()
    with pytest.raises(VaultProtocolError, match="not a JSON object"):
        client.read("secret", "app/html")
    with pytest.raises(VaultProtocolError, match=r"answered 500 while reading secret/data/app/boom \(no details\)"):
        client.read("secret", "app/boom")
    with pytest.raises(VaultProtocolError, match="KV version 1"):
        client.read("secret", "app/v1")


def test_a_refused_token_is_told_apart_from_a_denied_path() -> None:
    vault = FakeVault(routes={"GET secret/data/other": lambda r: errors(403, "permission denied")})
    with pytest.raises(VaultDenied) as denied:
        vault.client().read("secret", "other")  # the token is fine (lookup-self works): the policy says no
    assert type(denied.value) is VaultDenied
    assert str(denied.value) == f"Vault at {URL}: permission denied reading secret/data/other"

    bad = "hvs.bad-token-never-shown"
    client = FakeVault().client(TokenAuth(token=bad))
    with pytest.raises(VaultTokenRejected) as rejected:
        client.read("secret", "app/key")
    assert isinstance(rejected.value, VaultDenied) and rejected.value.status == 403
    assert "token rejected (invalid, expired or revoked) while reading secret/data/app/key" in str(rejected.value)
    assert bad not in str(rejected.value) and bad not in repr(client)


# ----- AppRole and re-login ------------------------------------------------------------------------------------
def test_approle_logs_in_once_and_reuses_the_token() -> None:
    vault = FakeVault()
    client = vault.client(approle())
    for _ in range(3):
        assert client.read("secret", "app/key").data == {"value": "v1"}
    assert vault.logins == 1 and vault.paths().count("auth/approle/login") == 1
    assert vault.seen[1].headers["X-Vault-Token"] == "hvs.approle-1"
    assert "X-Vault-Token" not in vault.seen[0].headers  # the login itself carries no token
    assert SECRET_ID not in repr(client) and "rid" in repr(client)


def test_approle_logs_in_again_when_vault_refuses_the_token() -> None:
    vault = FakeVault()
    client = vault.client(approle())
    client.read("secret", "app/key")
    vault.valid_tokens.discard("hvs.approle-1")  # revoked, or expired early
    assert client.read("secret", "app/key").data == {"value": "v1"}
    assert vault.logins == 2 and client.token == "hvs.approle-2"
    assert vault.paths()[-3:] == ["secret/data/app/key", "auth/approle/login", "secret/data/app/key"]


def test_approle_denied_even_after_a_fresh_login_is_a_policy_denial() -> None:
    vault = FakeVault(routes={"GET secret/data/other": lambda r: errors(403, "permission denied")})
    client = vault.client(approle())
    client.read("secret", "app/key")
    with pytest.raises(VaultDenied) as exc:
        client.read("secret", "other")
    assert type(exc.value) is VaultDenied and vault.logins == 2  # one retry with a fresh token, then the verdict
    with pytest.raises(VaultDenied):
        vault.client(approle()).read("secret", "other")  # a token fresh from login is not retried
    assert vault.logins == 3
    no_secret_in(exc.value)


def test_approle_logs_in_again_before_the_lease_runs_out() -> None:
    now = [1000.0]
    vault = FakeVault(lease=60)
    client = vault.client(approle(), clock=lambda: now[0])
    client.read("secret", "app/key")
    assert client.token_expires == 1060.0 and client.renew_at == 1030.0 and client.renewable
    now[0] = 1054.0
    client.read("secret", "app/key")
    assert vault.logins == 1
    now[0] = 1056.0  # within the last 5 seconds of the lease: a fresh login first
    client.read("secret", "app/key")
    assert vault.logins == 2 and client.token_expires == 1116.0


@pytest.mark.parametrize(
    ("response", "kind", "words"),
    [
        (errors(400, "invalid role or secret ID"), VaultLoginFailed, ["refused the login", "invalid role or secret"]),
        (errors(403, "permission denied"), VaultLoginFailed, ["refused the login", "enabled at auth/approle/?"]),
        (errors(503, "Vault is sealed"), VaultSealed, ["is sealed", "logging in with AppRole at auth/approle/login"]),
        (httpx.Response(200, json={"auth": None}), VaultLoginFailed, ["returned no token"]),
    ],
)
def test_login_failures(response: httpx.Response, kind: type[VaultError], words: list[str]) -> None:
    vault = FakeVault(routes={"POST auth/approle/login": lambda r: response})
    with pytest.raises(VaultError) as exc:
        vault.client(approle()).read("secret", "app/key")
    assert type(exc.value) is kind and exc.value.login and exc.value.where == "auth/approle/login"
    assert all(w in str(exc.value) for w in words), str(exc.value)
    assert vault.paths() == ["auth/approle/login"]  # nothing was read without a token
    no_secret_in(exc.value)


def test_approle_files_and_mount(tmp_path: Path) -> None:
    (tmp_path / "role-id").write_text("rid\n")
    (tmp_path / "secret-id").write_text(SECRET_ID + "\n")
    seen: list[dict[str, str]] = []

    def login(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"auth": {"client_token": ROOT, "lease_duration": 0}})

    vault = FakeVault(routes={"POST auth/hosts/login": login})
    auth = AppRoleAuth(role_id_file=tmp_path / "role-id", secret_id_file=tmp_path / "secret-id", mount="/hosts/")
    client = vault.client(auth)
    client.read("secret", "app/key")
    assert seen == [{"role_id": "rid", "secret_id": SECRET_ID}]
    assert client.token_expires == 0 and not client.renewable  # no lease: never expires, nothing to renew
    assert SECRET_ID not in repr(client) and str(tmp_path / "secret-id") in repr(client)


def test_credential_files_that_cannot_be_used(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    vault = FakeVault()
    with pytest.raises(VaultCredentialError) as exc:
        vault.client(TokenAuth(token_file=tmp_path / "missing")).read("secret", "app/key")
    assert exc.value.option == "token_file" and exc.value.strerror == "No such file or directory"
    assert str(exc.value) == f"cannot read token_file {tmp_path / 'missing'}: No such file or directory"
    with pytest.raises(VaultCredentialError) as exc:
        vault.client(AppRoleAuth(role_id="rid", secret_id_file=tmp_path / "empty")).read("secret", "app/key")
    assert exc.value.option == "secret_id_file" and exc.value.strerror is None
    assert str(exc.value) == f"secret_id_file {tmp_path / 'empty'} is empty"
    assert vault.seen == []


def test_a_token_file_is_read_again_when_its_token_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("hvs.old\n")
    vault = FakeVault(valid_tokens={"hvs.old"})
    client = vault.client(TokenAuth(token_file=token_file))
    client.read("secret", "app/key")
    vault.valid_tokens = {"hvs.new"}  # the token was rotated: the file holds the new one
    token_file.write_text("hvs.new\n")
    assert client.read("secret", "app/key").data == {"value": "v1"} and client.token == "hvs.new"
    vault.valid_tokens = set()  # now revoked, and the file has nothing newer: a clear verdict
    with pytest.raises(VaultTokenRejected):
        client.read("secret", "app/key")


def test_literal_tokens_are_never_retried() -> None:
    vault = FakeVault(routes={"GET secret/data/other": lambda r: errors(403, "permission denied")})
    with pytest.raises(VaultDenied):
        vault.client().read("secret", "other")
    assert vault.paths() == ["secret/data/other", "auth/token/lookup-self"]


# ----- renewal --------------------------------------------------------------------------------------------------
def test_renewal_at_half_the_lease() -> None:
    now = [0.0]
    renewals: list[str | None] = []

    def renew(request: httpx.Request) -> httpx.Response:
        renewals.append(request.headers.get("X-Vault-Token"))
        return httpx.Response(200, json={"auth": {"client_token": "hvs.approle-1", "lease_duration": 100}})

    vault = FakeVault(lease=100, routes={"POST auth/token/renew-self": renew})
    client = vault.client(approle(), clock=lambda: now[0])
    assert not client.renew_if_due()  # no token yet: nothing to renew
    client.read("secret", "app/key")
    now[0] = 49.0
    assert not client.renew_if_due() and renewals == []
    now[0] = 50.0
    assert client.renew_if_due() and renewals == ["hvs.approle-1"]
    assert client.token == "hvs.approle-1" and client.token_expires == 150.0 and client.renew_at == 100.0
    assert vault.logins == 1


def test_a_failed_renewal_drops_the_token() -> None:
    now = [0.0]
    vault = FakeVault(lease=100, routes={"POST auth/token/renew-self": lambda r: errors(403, "permission denied")})
    client = vault.client(approle(), clock=lambda: now[0])
    client.read("secret", "app/key")
    now[0] = 60.0
    with pytest.raises(VaultDenied):
        client.renew_if_due()
    assert client.token is None
    client.read("secret", "app/key")  # the next use logs in again
    assert vault.logins == 2


def test_token_auth_is_never_renewed() -> None:
    client = FakeVault().client()
    client.read("secret", "app/key")
    client.renew_at = 0.0
    assert not client.renew_if_due()


# ----- construction ------------------------------------------------------------------------------------------------
def test_construction_checks() -> None:
    with pytest.raises(ValueError, match="must start with http"):
        VaultClient("127.0.0.1:8200", TokenAuth(token=ROOT))
    with pytest.raises(ValueError, match="exactly one"):
        TokenAuth()
    with pytest.raises(ValueError, match="exactly one"):
        TokenAuth(token=ROOT, token_file=Path("/x"))
    with pytest.raises(ValueError, match="secret_id"):
        AppRoleAuth(role_id="rid")
    assert ROOT not in repr(TokenAuth(token=ROOT)) and ROOT not in repr(VaultClient(URL, TokenAuth(token=ROOT)))


def test_a_missing_ca_bundle_is_a_credential_error(tmp_path: Path) -> None:
    client = VaultClient("https://127.0.0.1:8200", TokenAuth(token=ROOT), verify=str(tmp_path / "ca.pem"))
    with pytest.raises(VaultCredentialError) as exc:
        client.read("secret", "app/key")
    assert exc.value.option == "verify" and "cannot read verify" in str(exc.value)
