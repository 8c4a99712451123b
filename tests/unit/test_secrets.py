"""Secret sources that need no Vault server: config/env values, persistence, config errors, validation, and
VaultSecrets' messages for each kind of Vault failure (Vault played by httpx.MockTransport)."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import httpx
import pytest

from coordinator.secrets import (
    SecretError,
    StaticSecrets,
    VaultSecrets,
    decode_signing_key,
    ensure_secrets,
    load_secret_source,
)
from starling_proto.vault import AppRoleAuth, TokenAuth, VaultClient


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_static_in_memory() -> None:
    src = StaticSecrets({"admin_token": "sat_a", "turn_secret": None, "signing_key": ""})
    assert src.name == "config"
    assert src.get("admin_token") == "sat_a"
    assert src.get("turn_secret") is None
    assert src.get("signing_key") is None  # empty counts as absent
    assert src.create("turn_secret", "t1") == "t1"
    assert src.create("turn_secret", "t2") == "t1"
    assert src.create("admin_token", "other") == "sat_a"
    assert "sat_a" not in repr(src) and "t1" not in repr(src)


def test_static_persist_dir(tmp_path: Path) -> None:
    d = tmp_path / "state" / "secrets"
    src = StaticSecrets({}, persist_dir=d)
    assert src.get("turn_secret") is None
    assert not d.exists()
    assert src.create("turn_secret", "t1") == "t1"
    assert mode(d) == 0o700
    assert mode(d / "turn_secret") == 0o600
    assert (d / "turn_secret").read_text() == "t1\n"
    assert [p.name for p in d.iterdir()] == ["turn_secret"]  # no temp files left behind
    again = StaticSecrets({}, persist_dir=d)
    assert again.get("turn_secret") == "t1"
    assert again.create("turn_secret", "t2") == "t1"
    # configured values win over persisted ones and are never written
    configured = StaticSecrets({"turn_secret": "from-config"}, persist_dir=d)
    assert configured.get("turn_secret") == "from-config"
    assert configured.create("turn_secret", "x") == "from-config"
    assert (d / "turn_secret").read_text() == "t1\n"


def test_static_persist_dir_tightens_existing_dir(tmp_path: Path) -> None:
    d = tmp_path / "secrets"
    d.mkdir(mode=0o755)
    StaticSecrets({}, persist_dir=d).create("admin_token", "sat_x")
    assert mode(d) == 0o700


def test_invalid_key_names(tmp_path: Path) -> None:
    src = StaticSecrets({}, persist_dir=tmp_path)
    for key in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(SecretError, match="invalid secret name"):
            src.create(key, "v")


def test_ensure_secrets_static(tmp_path: Path) -> None:
    src = load_secret_source({"source": "config", "admin_token": "sat_given"}, tmp_path)
    out = ensure_secrets(src)
    assert out["admin_token"] == "sat_given"
    assert len(out["turn_secret"]) >= 40
    decode_signing_key(out["signing_key"])
    assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["identity_key", "signing_key", "turn_secret"]
    assert ensure_secrets(load_secret_source({"admin_token": "sat_given"}, tmp_path)) == out


def test_ensure_secrets_generated_admin_token() -> None:
    out = ensure_secrets(StaticSecrets({}))
    assert out["admin_token"].startswith("sat_") and len(out["admin_token"]) > 40
    assert len(base64.b64decode(out["signing_key"], validate=True)) == 32


def test_env_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    monkeypatch.setenv("STARLING_ADMIN_TOKEN", "sat_env")
    monkeypatch.setenv("STARLING_SIGNING_KEY", key)
    monkeypatch.delenv("STARLING_TURN_SECRET", raising=False)
    src = load_secret_source({"source": "env"}, tmp_path)
    assert src.name == "env"
    out = ensure_secrets(src)
    assert out["admin_token"] == "sat_env" and out["signing_key"] == key
    assert (tmp_path / "secrets" / "turn_secret").read_text().strip() == out["turn_secret"]
    monkeypatch.setenv("STARLING_TURN_SECRET", "turn-env")
    assert ensure_secrets(load_secret_source({"source": "env"}, tmp_path))["turn_secret"] == "turn-env"


@pytest.mark.parametrize(
    "value",
    [
        "not base64!!",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 64).decode(),
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # urlsafe alphabet is not standard base64
    ],
)
def test_signing_key_validation(value: str) -> None:
    src = StaticSecrets({"signing_key": value}, name="env")
    with pytest.raises(SecretError, match=r"signing_key is not .*32-byte.*env source") as exc:
        ensure_secrets(src)
    assert value not in str(exc.value)


def test_signing_key_round_trip() -> None:
    src = StaticSecrets({})
    value = ensure_secrets(src)["signing_key"]
    key = decode_signing_key(value)
    assert key.sign(b"m")  # a usable Ed25519 key


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"source": "file"}, "secrets.source must be 'config', 'env' or 'vault'"),
        ({"source": "config", "admin_token": 123}, "secrets.admin_token must be a string"),
        ({"source": "vault"}, "secrets.vault section is required"),
        ({"source": "vault", "vault": {"token": "t"}}, "secrets.vault.url is required"),
        ({"source": "vault", "vault": {"url": "http://127.0.0.1:1"}}, "secrets.vault: give either token"),
        ({"source": "vault", "vault": {"url": "http://127.0.0.1:1", "tokn": "t"}}, "secrets.vault.tokn"),
        ({"source": "vault", "vault": {"url": "http://127.0.0.1:1", "token": "t", "role_id": "r"}}, "exactly one"),
        (
            {"source": "vault", "vault": {"url": "http://127.0.0.1:1", "role_id": "r"}},
            "role_id needs secret_id or secret_id_file",
        ),
        (
            {"source": "vault", "vault": {"url": "http://127.0.0.1:1", "token": "t", "timeout": "5"}},
            "secrets.vault.timeout must be a number",
        ),
        (
            {"source": "vault", "vault": {"url": "http://127.0.0.1:1", "token": "t", "verify": 1}},
            "secrets.vault.verify must be",
        ),
    ],
)
def test_bad_config(cfg: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_secret_source(cfg, tmp_path)


def test_vault_repr_hides_credentials(tmp_path: Path) -> None:
    src = load_secret_source(
        {"source": "vault", "vault": {"url": "http://127.0.0.1:1", "role_id": "rid", "secret_id": "sid-123"}},
        tmp_path,
    )
    assert isinstance(src, VaultSecrets)
    assert "sid-123" not in repr(src) and "approle" in repr(src)


def test_vault_missing_token_file(tmp_path: Path) -> None:
    src = VaultSecrets(url="http://127.0.0.1:1", token_file=tmp_path / "nope")
    with pytest.raises(SecretError, match="cannot read token_file"):
        src.get("admin_token")


# ----- VaultSecrets' messages for every kind of Vault failure (Vault played by httpx.MockTransport) ----------------
URL = "http://127.0.0.1:1"
WHERE = "secret/data/starling/coordinator/admin_token"
APPROLE = {"role_id": "rid", "secret_id": "sid-never-shown"}


def errors(status: int, *messages: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": list(messages)})


@pytest.mark.parametrize(
    ("respond", "approle", "message"),
    [
        (httpx.ReadTimeout("slow"), False, f"unreachable while reading {WHERE} (timed out)"),
        (httpx.ConnectError("refused"), False, f"unreachable while reading {WHERE} (connection failed)"),
        (errors(503, "Vault is sealed"), False, f"vault is sealed (while reading {WHERE})"),
        (errors(501, "Vault is not initialized"), False, "vault is not initialized"),
        (errors(503, "standby"), False, f"vault is unavailable (standby) (while reading {WHERE})"),
        (errors(500, "boom"), False, f"reading {WHERE} failed: VaultProtocolError: boom"),
        (errors(400, "invalid role or secret ID"), True, "AppRole login failed (invalid role or secret ID)"),
        (errors(403, "permission denied"), True, "AppRole login denied (is AppRole auth enabled at auth/approle/?)"),
        (errors(503, "Vault is sealed"), True, "vault is sealed (while logging in with AppRole auth/approle/login)"),
        (
            httpx.Response(200, json={"data": {"data": {"v": 1}, "metadata": {"version": 1}}}),
            False,
            f"{WHERE} has no string field 'value'",
        ),
    ],
)
def test_vault_error_messages(respond: httpx.Response | Exception, approle: bool, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(respond, Exception):
            raise respond
        return respond

    src = VaultSecrets(url=URL, **(APPROLE if approle else {"token": "t"}))
    auth = AppRoleAuth(role_id="rid", secret_id=APPROLE["secret_id"]) if approle else TokenAuth(token="t")
    src._client = VaultClient(URL, auth, transport=httpx.MockTransport(handler))
    with pytest.raises(SecretError) as exc:
        src.get("admin_token")
    assert str(exc.value) == f"vault at {URL}: {message}"
    assert APPROLE["secret_id"] not in str(exc.value)
