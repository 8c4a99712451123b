"""The Vault key source: the agent's WireGuard private key read from Vault/OpenBao KV v2.

The agent logs in with AppRole (role_id + secret_id, each from a file the `vault` role delivers) or
a token file, reads field `private_key` of the latest version at `<mount>/data/<path>` (layout in
docs/vault.md) and keeps the token alive (renew-self at half its lease, a fresh login when renewal
is refused). Only this host's key path is readable by its policy.

Vault down must not take the mesh down: the last key read is cached in a 0600 file in the state
directory and used at start-up when Vault is unreachable or sealed (never when Vault *refuses*:
wrong credentials or a denied path are configuration errors and stop the agent with a clear
message). `reload()` (key rotation) never uses the cache: a rotation must see Vault's latest key.

Vault is spoken to through the client both services share, `starling_proto.vault.VaultClient` (plain httpx,
no hvac: the agent's dependencies stay small); this module turns its errors into the agent's messages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.config import write_private
from agent.keys import KeyError_, decode_key
from starling_proto import vault

log = logging.getLogger(__name__)

_OPTIONS = {
    "type",
    "url",
    "mount",
    "path",
    "role_id",
    "role_id_file",
    "secret_id_file",
    "token_file",
    "approle_mount",
    "namespace",
    "verify",
    "timeout",
    "cache",
}


class VaultUnavailable(KeyError_):
    """Vault could not be asked (unreachable, sealed): the cached key may stand in at start-up."""


class VaultKeySource:
    name = "vault"

    def __init__(self, spec: dict[str, Any], state_dir: Path) -> None:
        unknown = set(spec) - _OPTIONS
        if unknown:
            raise KeyError_(f"key_source: unknown option(s) {', '.join(sorted(unknown))} for type vault")
        for required in ("url", "path"):
            if not isinstance(spec.get(required), str) or not spec[required]:
                raise KeyError_(f"key_source.{required} is required for type vault")
        self.url = str(spec["url"]).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise KeyError_(f"key_source.url {self.url!r} must start with http:// or https://")
        self.mount = str(spec.get("mount", "starling")).strip("/")
        self.path = str(spec["path"]).strip("/")
        if not self.mount or not self.path or ".." in f"{self.mount}/{self.path}".split("/"):
            raise KeyError_("key_source.mount and key_source.path must be non-empty Vault paths")
        self.approle_mount = str(spec.get("approle_mount", "approle")).strip("/")
        if not self.approle_mount:
            raise KeyError_("key_source.approle_mount must not be empty")
        role_id = spec.get("role_id")
        if role_id is not None and not isinstance(role_id, str):
            raise KeyError_("key_source.role_id must be a string")
        self.role_id = role_id or None
        self.role_id_file = _opt_path(spec, "role_id_file")
        self.secret_id_file = _opt_path(spec, "secret_id_file")
        self.token_file = _opt_path(spec, "token_file")
        auth: vault.Auth
        if self.token_file is not None:
            auth = vault.TokenAuth(token_file=self.token_file)
        elif self.secret_id_file and (self.role_id or self.role_id_file):
            auth = vault.AppRoleAuth(
                role_id=self.role_id,
                role_id_file=None if self.role_id else self.role_id_file,
                secret_id_file=self.secret_id_file,
                mount=self.approle_mount,
            )
        else:
            raise KeyError_(
                "key_source (vault) needs AppRole credentials (role_id or role_id_file, and secret_id_file) "
                "or a token_file"
            )
        namespace = spec.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise KeyError_("key_source.namespace must be a string")
        verify = spec.get("verify", True)
        if not isinstance(verify, bool | str):
            raise KeyError_("key_source.verify must be true/false or a CA bundle path")
        try:
            timeout = float(spec.get("timeout", 10))
        except (TypeError, ValueError):
            timeout = 0.0
        if not timeout > 0:
            raise KeyError_("key_source.timeout must be a positive number of seconds")
        self.namespace, self.verify, self.timeout = namespace, verify, timeout
        self.client = vault.VaultClient(self.url, auth, namespace=namespace, verify=verify, timeout=self.timeout)
        self.cache_file: Path | None = state_dir / "private.key.cache" if spec.get("cache", True) else None
        self.version: int | None = None
        self._loaded: str | None = None

    def __repr__(self) -> str:
        return f"VaultKeySource(url={self.url!r}, mount={self.mount!r}, path={self.path!r})"

    @property
    def where(self) -> str:
        return f"{self.mount}/{self.path}"

    # ----- public interface ------------------------------------------------------------------
    def load(self) -> str:
        """The key at start-up: Vault's latest version, or the cached copy when Vault is down."""
        if self._loaded is not None:
            return self._loaded
        try:
            self._loaded = self.reload()
        except VaultUnavailable as exc:
            cached = self._read_cache()
            if cached is None:
                raise KeyError_(f"{exc}; no cached key to start with") from exc
            log.warning("%s: starting with the cached key (version %s)", exc, self.version)
            self._loaded = cached
        return self._loaded

    def reload(self) -> str:
        """Vault's latest key (never the cache). Raises KeyError_ with an operator-facing message."""
        data, version = self._read_secret()
        value = data.get("private_key")
        if not isinstance(value, str):
            raise KeyError_(f"Vault secret {self.where} has no private_key field")
        try:
            decode_key(value)
        except KeyError_ as exc:
            raise KeyError_(f"Vault secret {self.where}: {exc}") from exc
        self.version = version
        self._loaded = value
        self._write_cache(value, version)
        return value

    def find(self, public_key: str, depth: int = 10) -> str | None:
        """The private key of an earlier version whose public key is `public_key` (up to `depth` versions
        back), or None: the proof for the key the coordinator still holds after a rotation made in Vault
        while this agent was down. Never the cache. (Versions are read one by one: a host's policy does not
        allow reading the metadata.)"""
        from agent.keys import public_key_of

        latest = self.version
        if latest is None:
            return None
        for version in range(latest - 1, max(0, latest - depth), -1):
            try:
                data, _ = self._read_secret(version)
            except KeyError_:
                continue
            value = data.get("private_key")
            if isinstance(value, str):
                try:
                    if public_key_of(value) == public_key:
                        return value
                except KeyError_:
                    continue
        return None

    def maintain(self) -> None:
        """Keep the token alive (called periodically by the daemon): renew at half its lease."""
        try:
            self.client.renew_if_due()
        except vault.VaultError as exc:
            log.info("Vault token renewal failed (%s): logging in again at next use", exc)

    # ----- Vault calls -----------------------------------------------------------------------
    def _read_secret(self, version: int | None = None) -> tuple[dict[str, Any], int | None]:
        try:
            secret = self.client.read(self.mount, self.path, version)
        except vault.VaultError as exc:
            raise self._error(exc) from exc
        if secret.data is None:
            raise KeyError_(f"Vault secret {self.where} has no data (deleted version?)")
        return secret.data, secret.version

    def _error(self, exc: vault.VaultError) -> KeyError_:
        """The agent's message for a failed Vault call (never a credential)."""
        if isinstance(exc, vault.VaultCredentialError):
            if exc.strerror is None:
                return KeyError_(f"key_source.{exc.option} {exc.path} is empty")
            return KeyError_(f"key_source.{exc.option} {exc.path}: {exc.strerror}")
        if isinstance(exc, vault.VaultUnreachable):
            why = "timed out" if exc.timed_out else exc.reason
            return VaultUnavailable(f"Vault at {self.url} is unreachable ({why})")
        if isinstance(exc, vault.VaultSealed):
            return VaultUnavailable(f"Vault at {self.url} is sealed or in standby (503)")
        if isinstance(exc, vault.VaultUnavailable):
            return VaultUnavailable(f"Vault at {self.url} is {exc.state} ({exc.status}: {exc.details})")
        if isinstance(exc, vault.VaultLoginFailed):
            if exc.status == 400:
                why = f"invalid role_id or secret_id (check {self.secret_id_file} and the role id)"
            else:
                why = f"{exc.details} (is AppRole auth enabled at auth/{self.approle_mount}/?)"
            return KeyError_(f"Vault refused the AppRole login at {self.url}: {why}")
        if isinstance(exc, vault.VaultTokenRejected):
            return KeyError_(
                f"Vault at {self.url} rejected the token in {self.token_file} (invalid, expired or revoked) "
                f"reading {self.where}"
            )
        if isinstance(exc, vault.VaultDenied):
            return KeyError_(
                f"Vault denied reading {self.where}: this host's policy does not allow it "
                "(wrong path, or the AppRole is bound to another host's policy)"
            )
        if isinstance(exc, vault.VaultNotFound):
            if exc.route_missing:
                return KeyError_(f"no KV v2 secrets engine is mounted at {self.mount}/ in Vault at {self.url}")
            if exc.action.startswith("reading version"):
                return KeyError_(f"no {exc.action.removeprefix('reading ').removesuffix(' of')} of {self.where}")
            return KeyError_(f"no secret at {self.where} in Vault (create it with starling.mesh.wireguard_key)")
        return KeyError_(str(exc))

    # ----- cache -----------------------------------------------------------------------------
    def _read_cache(self) -> str | None:
        if self.cache_file is None or not self.cache_file.exists():
            return None
        try:
            lines = self.cache_file.read_text().split()
            decode_key(lines[0])
        except (OSError, IndexError, KeyError_):
            return None
        self.version = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None
        return lines[0]

    def _write_cache(self, value: str, version: int | None) -> None:
        if self.cache_file is None:
            return
        try:
            write_private(self.cache_file, f"{value} {version or ''}\n")
        except OSError as exc:
            log.warning("cannot write the key cache %s: %s", self.cache_file, exc.strerror)


def _opt_path(spec: dict[str, Any], key: str) -> Path | None:
    value = spec.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise KeyError_(f"key_source.{key} must be a file path")
    return Path(value)
