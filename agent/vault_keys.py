"""The Vault key source: the agent's WireGuard private key read from Vault/OpenBao KV v2.

The agent logs in with AppRole (role_id + secret_id, each from a file the `vault` role delivers) or
a token file, reads field `private_key` of the latest version at `<mount>/data/<path>` (layout in
docs/vault.md) and keeps the token alive (renew-self at half its lease, a fresh login when renewal
is refused). Only this host's key path is readable by its policy.

Vault down must not take the mesh down: the last key read is cached in a 0600 file in the state
directory and used at start-up when Vault is unreachable or sealed (never when Vault *refuses*:
wrong credentials or a denied path are configuration errors and stop the agent with a clear
message). `reload()` (key rotation) never uses the cache: a rotation must see Vault's latest key.

Plain httpx, no hvac: the agent's dependencies stay small and three endpoints are all it needs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from agent.config import write_private
from agent.keys import FileKeySource, KeyError_, KeySource, decode_key

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
        if not self.mount or not self.path or ".." in self.path.split("/"):
            raise KeyError_("key_source.mount and key_source.path must be non-empty Vault paths")
        self.approle_mount = str(spec.get("approle_mount", "approle")).strip("/")
        self.role_id = spec.get("role_id")
        self.role_id_file = _opt_path(spec, "role_id_file")
        self.secret_id_file = _opt_path(spec, "secret_id_file")
        self.token_file = _opt_path(spec, "token_file")
        if self.token_file is None and not (self.secret_id_file and (self.role_id or self.role_id_file)):
            raise KeyError_(
                "key_source (vault) needs AppRole credentials (role_id or role_id_file, and secret_id_file) "
                "or a token_file"
            )
        self.namespace = spec.get("namespace")
        verify = spec.get("verify", True)
        if not isinstance(verify, bool | str):
            raise KeyError_("key_source.verify must be true/false or a CA bundle path")
        self.verify = verify
        self.timeout = float(spec.get("timeout", 10))
        self.cache_file: Path | None = state_dir / "private.key.cache" if spec.get("cache", True) else None
        self.version: int | None = None
        self._token: str | None = None
        self._token_expires = 0.0  # monotonic; 0 = never (root/periodic tokens)
        self._renew_at = 0.0
        self._renewable = False
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
        while this agent was down. Never the cache."""
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
        if self._token is None or self.token_file is not None or not self._renewable:
            return
        if time.monotonic() < self._renew_at:
            return
        try:
            body = self._request("POST", "/v1/auth/token/renew-self", {})
        except KeyError_ as exc:
            log.info("Vault token renewal failed (%s): logging in again at next use", exc)
            self._token = None
            return
        self._remember_lease(body.get("auth") or {})

    # ----- Vault calls -----------------------------------------------------------------------
    def _read_secret(self, version: int | None = None) -> tuple[dict[str, Any], int | None]:
        query = f"?version={version}" if version is not None else ""
        for attempt in (1, 2):
            self._ensure_token()
            try:
                body = self._request("GET", f"/v1/{self.mount}/data/{self.path}{query}")
            except _Denied:
                if attempt == 1 and self.token_file is None:
                    self._token = None  # a revoked or expired token: log in once more
                    continue
                raise KeyError_(
                    f"Vault denied reading {self.where}: this host's policy does not allow it "
                    "(wrong path, or the AppRole is bound to another host's policy)"
                ) from None
            data = (body.get("data") or {}).get("data")
            meta = (body.get("data") or {}).get("metadata") or {}
            if not isinstance(data, dict):
                raise KeyError_(f"Vault secret {self.where} has no data (deleted version?)")
            version = meta.get("version")
            return data, version if isinstance(version, int) else None
        raise AssertionError("unreachable")

    def _ensure_token(self) -> None:
        if self._token is not None and (self._token_expires == 0 or time.monotonic() < self._token_expires - 5):
            return
        if self.token_file is not None:
            self._token = _read_file(self.token_file, "token_file")
            self._token_expires = 0.0
            return
        role_id = self.role_id if isinstance(self.role_id, str) and self.role_id else None
        if role_id is None:
            assert self.role_id_file is not None
            role_id = _read_file(self.role_id_file, "role_id_file")
        assert self.secret_id_file is not None
        secret_id = _read_file(self.secret_id_file, "secret_id_file")
        try:
            body = self._request(
                "POST", f"/v1/auth/{self.approle_mount}/login", {"role_id": role_id, "secret_id": secret_id}, auth=False
            )
        except _Denied as exc:
            raise KeyError_(
                f"Vault refused the AppRole login at {self.url}: invalid role_id or secret_id "
                f"(check {self.secret_id_file} and the role id)"
            ) from exc
        auth = body.get("auth") or {}
        token = auth.get("client_token")
        if not isinstance(token, str) or not token:
            raise KeyError_(f"Vault AppRole login at {self.url} returned no token")
        self._token = token
        self._remember_lease(auth)

    def _remember_lease(self, auth: dict[str, Any]) -> None:
        lease = auth.get("lease_duration") or 0
        now = time.monotonic()
        self._renewable = bool(auth.get("renewable"))
        self._token_expires = now + lease if lease else 0.0
        self._renew_at = now + lease / 2 if lease else float("inf")

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *, auth: bool = True) -> Any:
        headers = {}
        if auth and self._token:
            headers["X-Vault-Token"] = self._token
        if self.namespace:
            headers["X-Vault-Namespace"] = str(self.namespace)
        try:
            resp = httpx.request(
                method, self.url + path, json=body, headers=headers, timeout=self.timeout, verify=self.verify
            )
        except httpx.HTTPError as exc:
            raise VaultUnavailable(f"Vault at {self.url} is unreachable ({exc.__class__.__name__})") from exc
        if resp.status_code == 503:
            raise VaultUnavailable(f"Vault at {self.url} is sealed or in standby (503)")
        if resp.status_code in (400, 403) and ("permission denied" in resp.text or "invalid" in resp.text):
            raise _Denied(resp.status_code)
        if resp.status_code == 404:
            raise KeyError_(f"no secret at {self.where} in Vault (create it with starling.mesh.wireguard_key)")
        if resp.status_code >= 400:
            raise KeyError_(f"Vault answered {resp.status_code} for {method} {path.split('?')[0]}")
        try:
            return resp.json() if resp.content else {}
        except ValueError as exc:
            raise KeyError_(f"Vault at {self.url} answered with something that is not JSON") from exc

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


class _Denied(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"denied ({status})")
        self.status = status


def _opt_path(spec: dict[str, Any], key: str) -> Path | None:
    value = spec.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise KeyError_(f"key_source.{key} must be a file path")
    return Path(value)


def _read_file(path: Path, option: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise KeyError_(f"key_source.{option} {path}: {exc.strerror}") from exc
    if not value:
        raise KeyError_(f"key_source.{option} {path} is empty")
    return value


def make_key_source(spec: dict[str, Any], state_dir: Path) -> KeySource:
    """The key source agent.yaml's `key_source` names: `file` (default) or `vault`."""
    kind = spec.get("type", "file")
    if kind == "file":
        return FileKeySource(Path(spec.get("path", state_dir / "private.key")))
    if kind == "vault":
        return VaultKeySource(spec, state_dir)
    raise KeyError_(f"key_source.type {kind!r} is not supported (file, vault)")
