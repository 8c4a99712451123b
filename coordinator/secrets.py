"""Where the coordinator's secrets come from.

This module owns the coordinator's four secrets -- ``admin_token`` (bootstrap API token),
``turn_secret`` (coturn shared secret), ``signing_key`` (base64 of 32 raw Ed25519 private key
bytes) and ``identity_key`` (base64 of 32 raw X25519 private key bytes: agents seal enrollment, login
and key rotation to it, see coordinator.identity) -- and the sources they are read from: the config file or environment
(:class:`StaticSecrets`, optionally persisting generated values under the state directory) or a
Vault/OpenBao KV v2 engine (:class:`VaultSecrets`, one entry per secret with a single ``value``
field). :func:`ensure_secrets` reads all four and generates whichever is missing.
Secret values and tokens never appear in exceptions, logs or reprs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from coordinator.identity import decode_identity_key, new_identity_key
from starling_proto.vault import (
    AppRoleAuth,
    Auth,
    TokenAuth,
    VaultCasMismatch,
    VaultClient,
    VaultCredentialError,
    VaultDenied,
    VaultError,
    VaultNotFound,
    VaultSealed,
    VaultTokenRejected,
    VaultUnavailable,
    VaultUnreachable,
)

log = logging.getLogger(__name__)

SECRET_KEYS = ("admin_token", "turn_secret", "signing_key", "identity_key")
ENV_VARS = {key: f"STARLING_{key.upper()}" for key in SECRET_KEYS}
_VAULT_OPTIONS: dict[str, tuple[tuple[type, ...], str]] = dict.fromkeys(
    ("url", "mount", "path", "token", "token_file", "role_id", "secret_id", "secret_id_file", "namespace"),
    ((str,), "a string"),
) | {"verify": ((bool, str), "true/false or a CA bundle path"), "timeout": ((int, float), "a number")}
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class SecretError(Exception):
    """A secret cannot be read, stored or validated; the message is meant for operators."""


class SecretSource(Protocol):
    name: str

    def get(self, key: str) -> str | None: ...

    def create(self, key: str, value: str) -> str: ...


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise SecretError(f"invalid secret name {key!r}")


class StaticSecrets:
    """Secrets given by the config file or the environment, plus generated ones."""

    def __init__(self, values: Mapping[str, str | None], persist_dir: Path | None = None, name: str = "config") -> None:
        self.name = name
        self._values = {k: v for k, v in values.items() if v}
        self._dir = persist_dir

    def __repr__(self) -> str:
        return f"StaticSecrets(name={self.name!r}, keys={sorted(self._values)}, persist_dir={self._dir})"

    def get(self, key: str) -> str | None:
        _check_key(key)
        if key in self._values:
            return self._values[key]
        if self._dir is None:
            return None
        file = self._dir / key
        try:
            value = file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SecretError(f"cannot read secret file {file}: {e.strerror}") from e
        if file.stat().st_mode & 0o077:
            log.warning("secret file %s is accessible by group/others; expected mode 0600", file)
        return value or None

    def create(self, key: str, value: str) -> str:
        existing = self.get(key)
        if existing is not None:
            return existing
        if self._dir is None:
            self._values[key] = value
            return value
        file, tmp = self._dir / key, self._dir / f".{key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, file)  # atomic create-if-absent, never a half-written file
            except FileExistsError:
                log.info("secret %s was created concurrently in %s; using that one", key, self._dir)
        except OSError as e:
            raise SecretError(f"cannot store secret {key} in {self._dir}: {e.strerror}") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        stored = self.get(key)
        if stored is None:
            raise SecretError(f"secret file {file} is empty")
        return stored


class VaultSecrets:
    """Secrets in a Vault/OpenBao KV v2 engine: ``<mount>/data/<path>/<key>``, field ``value``.

    Vault is spoken to through :class:`starling_proto.vault.VaultClient` (token or AppRole, re-login when the
    token expires or is refused); its errors become :class:`SecretError` with the messages operators see."""

    name = "vault"

    def __init__(
        self,
        *,
        url: str,
        mount: str = "secret",
        path: str = "starling/coordinator",
        token: str | None = None,
        token_file: Path | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        secret_id_file: Path | None = None,
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
    ) -> None:
        if not url:
            raise SecretError("vault: url is required")
        has_token, has_role = bool(token or token_file), bool(role_id)
        if has_token == has_role:
            raise SecretError("vault: give either token (or token_file) or role_id (AppRole), exactly one")
        if has_role and not (secret_id or secret_id_file):
            raise SecretError("vault: role_id needs secret_id or secret_id_file")
        self.url, self.mount, self.path = url.rstrip("/"), mount.strip("/"), path.strip("/")
        if not self.mount or not self.path or ".." in f"{self.mount}/{self.path}".split("/"):
            raise SecretError("vault: mount and path must be non-empty Vault paths")
        self._approle = has_role
        auth: Auth = (
            AppRoleAuth(role_id=role_id, secret_id=secret_id or None, secret_id_file=secret_id_file)
            if has_role
            else TokenAuth(token=token or None, token_file=None if token else token_file)
        )
        try:
            self._client = VaultClient(self.url, auth, namespace=namespace, verify=verify, timeout=timeout)
        except ValueError as e:
            raise SecretError(f"vault: url {self.url!r} must start with http:// or https://") from e

    def __repr__(self) -> str:
        auth = "approle" if self._approle else "token"
        return f"VaultSecrets(url={self.url!r}, mount={self.mount!r}, path={self.path!r}, auth={auth!r})"

    def _where(self, key: str) -> str:
        return f"{self.mount}/data/{self.path}/{key}"

    def _error(self, e: VaultError, verb: str, where: str) -> SecretError:
        prefix = f"vault at {self.url}"
        if isinstance(e, VaultCredentialError):
            return SecretError(f"vault: {e}")
        if e.login and not isinstance(e, VaultUnavailable):
            if e.status == 400:
                return SecretError(f"{prefix}: AppRole login failed ({e.details})")
            if e.status in (403, 404):
                return SecretError(f"{prefix}: AppRole login denied (is AppRole auth enabled at auth/approle/?)")
        if e.login:
            verb, where = "logging in with AppRole", e.where
        if isinstance(e, VaultUnreachable):
            return SecretError(f"{prefix}: unreachable while {verb} {where} ({_why(e)})")
        if isinstance(e, VaultSealed):
            return SecretError(f"{prefix}: vault is sealed (while {verb} {where})")
        if isinstance(e, VaultUnavailable) and e.state == "not initialized":
            return SecretError(f"{prefix}: vault is not initialized")
        if isinstance(e, VaultUnavailable):
            return SecretError(f"{prefix}: vault is unavailable ({e.details}) (while {verb} {where})")
        if isinstance(e, VaultTokenRejected):
            return SecretError(f"{prefix}: token rejected (invalid, expired or revoked) while {verb} {where}")
        if isinstance(e, VaultDenied):
            return SecretError(f"{prefix}: permission denied {verb} {where}")
        if isinstance(e, VaultNotFound) and e.route_missing:
            return SecretError(f"{prefix}: no KV v2 secrets engine mounted at {self.mount}/ ({e.details})")
        return SecretError(f"{prefix}: {verb} {where} failed: {type(e).__name__}: {e.details}")

    def get(self, key: str) -> str | None:
        _check_key(key)
        try:
            secret = self._client.read(self.mount, f"{self.path}/{key}")
        except VaultNotFound as e:
            if e.route_missing:  # "no handler for route": the mount is missing
                raise self._error(e, "reading", self._where(key)) from None
            return None  # no such entry
        except VaultError as e:
            raise self._error(e, "reading", self._where(key)) from None
        if secret.data is None:
            return None  # its latest version is deleted (or destroyed)
        value = secret.data.get("value")
        if not isinstance(value, str):
            raise SecretError(f"vault at {self.url}: {self._where(key)} has no string field 'value'")
        return value

    def create(self, key: str, value: str) -> str:
        _check_key(key)
        try:
            self._client.write(self.mount, f"{self.path}/{key}", {"value": value}, cas=0)
            return value
        except VaultCasMismatch:
            pass  # it exists already
        except VaultError as e:
            raise self._error(e, "writing", self._where(key)) from None
        existing = self.get(key)
        if existing is None:
            raise SecretError(
                f"vault at {self.url}: {self._where(key)} exists but its latest version is deleted; "
                "undelete or destroy it"
            )
        log.info("secret %s was created concurrently in vault; using that one", key)
        return existing


def _why(e: VaultUnreachable) -> str:
    return "timed out" if e.timed_out else "connection failed"


def load_secret_source(cfg: Mapping[str, Any], state_dir: Path) -> SecretSource:
    """Build the secret source described by the coordinator config's ``secrets`` section."""
    source = cfg.get("source", "config")
    persist = state_dir / "secrets"
    if source == "config":
        values: dict[str, str | None] = {}
        for key in SECRET_KEYS:
            v = cfg.get(key)
            if v is not None and not isinstance(v, str):
                raise SecretError(f"secrets.{key} must be a string")
            values[key] = v
        return StaticSecrets(values, persist_dir=persist, name="config")
    if source == "env":
        return StaticSecrets({k: os.environ.get(v) for k, v in ENV_VARS.items()}, persist, name="env")
    if source != "vault":
        raise SecretError(f"secrets.source must be 'config', 'env' or 'vault', not {source!r}")
    v_cfg = cfg.get("vault")
    if not isinstance(v_cfg, Mapping):
        raise SecretError("secrets.vault section is required when secrets.source is 'vault'")
    opts = {k: v for k, v in v_cfg.items() if v is not None}
    for k, v in opts.items():
        if k not in _VAULT_OPTIONS:
            raise SecretError(f"unknown option secrets.vault.{k}")
        types, what = _VAULT_OPTIONS[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise SecretError(f"secrets.vault.{k} must be {what}")
    if not opts.get("url"):
        raise SecretError("secrets.vault.url is required")
    opts.update({k: Path(opts[k]) for k in ("token_file", "secret_id_file") if k in opts})
    try:
        return VaultSecrets(**opts)
    except SecretError as e:
        raise SecretError(f"secrets.{e}") from None


def new_signing_key() -> str:
    """A fresh Ed25519 private key, as base64 of its 32 raw bytes."""
    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode("ascii")


def decode_signing_key(value: str) -> Ed25519PrivateKey:
    """Parse a stored ``signing_key``; SecretError if it is not base64 of 32 bytes."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise SecretError("signing_key is not the base64 encoding of a 32-byte Ed25519 private key")
    return Ed25519PrivateKey.from_private_bytes(raw)


_GENERATORS: dict[str, Callable[[], str]] = {
    "admin_token": lambda: "sat_" + secrets.token_urlsafe(32),
    "turn_secret": lambda: secrets.token_urlsafe(32),
    "signing_key": new_signing_key,
    "identity_key": new_identity_key,
}


def ensure_secrets(source: SecretSource) -> dict[str, str]:
    """Return all coordinator secrets, generating (create-if-absent) the missing ones."""
    out: dict[str, str] = {}
    for key in SECRET_KEYS:
        value = source.get(key)
        if value is None:
            value = source.create(key, _GENERATORS[key]())
            log.info("generated secret %s in %s source", key, source.name)
        out[key] = value
    try:
        decode_signing_key(out["signing_key"])
    except SecretError as e:
        raise SecretError(f"{e} (from the {source.name} source)") from None
    try:
        decode_identity_key(out["identity_key"])
    except ValueError as e:
        raise SecretError(f"{e} (from the {source.name} source)") from None
    return out
