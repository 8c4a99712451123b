"""Vault / OpenBao over HTTP for Starling's services: one small typed client on httpx.

This module owns how the agent (agent/vault_keys.py) and the coordinator (coordinator/secrets.py) talk to a
HashiCorp Vault or OpenBao server:

- authentication: a token (given, or read from a file) or an AppRole login (role and secret IDs given or read
  from files at each login); the client logs in again when the token's lease has run out or when Vault refuses
  it (a token file is read again: it may have been replaced), and renews a renewable token at half its lease
  (:meth:`VaultClient.renew_if_due`);
- the KV version 2 calls the services make: read the latest or a given version (:meth:`VaultClient.read`;
  a deleted or destroyed version comes back with its metadata and no data), read the metadata
  (:meth:`VaultClient.read_metadata`: versions, current version) and write, optionally with check-and-set
  (:meth:`VaultClient.write`);
- connection settings: namespace (``X-Vault-Namespace``), TLS verification (true/false or a CA bundle file or
  directory), one timeout for connect and read;
- the mapping of every failure onto :class:`VaultError` subclasses: :class:`VaultUnavailable`
  (:class:`VaultUnreachable`, :class:`VaultSealed`), :class:`VaultDenied` (:class:`VaultTokenRejected`,
  :class:`VaultLoginFailed`), :class:`VaultNotFound`, :class:`VaultInvalidRequest`
  (:class:`VaultCasMismatch`), :class:`VaultCredentialError` and :class:`VaultProtocolError`. Each carries
  the server URL, what was being done, the API path, the HTTP status and Vault's own error strings, and has a
  one-line message for operators. Messages and reprs never contain a token, a secret ID or a secret value.

What the services store where (layout in docs/vault.md) and the messages they show stay with them. The Ansible
collection keeps its own hvac-based client (plugins/module_utils/_vault.py): it runs on the controller, where
this package is not installed. Only httpx and the standard library are used, so the agent imports this without
any server dependency.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from starling_proto.vault_errors import (
    VaultCasMismatch,
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
    join_details,
)

__all__ = [
    "AppRoleAuth",
    "Auth",
    "KvMetadata",
    "KvSecret",
    "KvVersionInfo",
    "TokenAuth",
    "VaultCasMismatch",
    "VaultClient",
    "VaultCredentialError",
    "VaultDenied",
    "VaultError",
    "VaultInvalidRequest",
    "VaultLoginFailed",
    "VaultNotFound",
    "VaultProtocolError",
    "VaultSealed",
    "VaultTokenRejected",
    "VaultUnavailable",
    "VaultUnreachable",
]

#: A token this close to the end of its lease (seconds) is replaced by a fresh login before use.
EXPIRY_MARGIN = 5.0


# ----- authentication --------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class TokenAuth:
    """A Vault token: ``token`` itself or ``token_file`` (read at first use and again when Vault refuses the
    token it held: the file may have been replaced). Exactly one of the two."""

    token: str | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.token) == (self.token_file is not None):
            raise ValueError("TokenAuth needs exactly one of token and token_file")

    def __repr__(self) -> str:
        return f"TokenAuth(token_file={str(self.token_file)!r})" if self.token_file else "TokenAuth(token=<hidden>)"


@dataclass(frozen=True, repr=False)
class AppRoleAuth:
    """AppRole: ``role_id`` or ``role_id_file``, ``secret_id`` or ``secret_id_file`` (files are read at each
    login, so a secret ID delivered anew is picked up), auth method mounted at ``mount``."""

    role_id: str | None = None
    secret_id: str | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    mount: str = "approle"

    def __post_init__(self) -> None:
        if not (self.role_id or self.role_id_file):
            raise ValueError("AppRoleAuth needs role_id or role_id_file")
        if not (self.secret_id or self.secret_id_file):
            raise ValueError("AppRoleAuth needs secret_id or secret_id_file")
        if not self.mount.strip("/"):
            raise ValueError("AppRoleAuth needs a mount")

    def __repr__(self) -> str:
        role = f"role_id_file={str(self.role_id_file)!r}" if self.role_id_file else f"role_id={self.role_id!r}"
        secret = f"secret_id_file={str(self.secret_id_file)!r}" if self.secret_id_file else "secret_id=<hidden>"
        return f"AppRoleAuth({role}, {secret}, mount={self.mount!r})"


Auth = TokenAuth | AppRoleAuth


# ----- KV v2 results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvSecret:
    """One version of a KV v2 secret. ``data`` is None when that version is deleted or destroyed."""

    data: dict[str, Any] | None = field(repr=False)
    version: int | None
    created_time: str = ""
    deletion_time: str = ""
    destroyed: bool = False
    custom_metadata: dict[str, str] | None = None

    @property
    def deleted(self) -> bool:
        """True when this version's data is gone (soft-deleted or destroyed)."""
        return self.data is None


@dataclass(frozen=True)
class KvVersionInfo:
    """What KV v2 metadata says about one version."""

    version: int
    created_time: str = ""
    deletion_time: str = ""
    destroyed: bool = False

    @property
    def deleted(self) -> bool:
        return bool(self.deletion_time) or self.destroyed


@dataclass(frozen=True)
class KvMetadata:
    """A KV v2 secret's metadata: its versions (oldest kept first) and settings."""

    current_version: int
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    created_time: str = ""
    updated_time: str = ""
    versions: tuple[KvVersionInfo, ...] = ()
    custom_metadata: dict[str, str] | None = None

    def version(self, number: int) -> KvVersionInfo | None:
        return next((v for v in self.versions if v.version == number), None)


# ----- the client --------------------------------------------------------------------------------------
class VaultClient:
    """A Vault/OpenBao client for one server and one identity (see the module docstring).

    Thread-safe: the token is shared, logins are serialized. ``transport`` replaces the network (tests use
    ``httpx.MockTransport``); ``clock`` is the monotonic clock leases are measured with. The token's state is
    readable: ``token``, ``token_expires`` (monotonic time, 0 = no expiry), ``renew_at`` (when
    :meth:`renew_if_due` renews) and ``renewable``.
    """

    def __init__(
        self,
        url: str,
        auth: Auth,
        *,
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Vault URL {url!r} must start with http:// or https://")
        self.url, self.auth, self.namespace = url, auth, namespace or None
        self.verify, self.timeout = verify, float(timeout)
        self._transport, self._clock = transport, clock
        self._http_client: httpx.Client | None = None
        self._lock = threading.RLock()
        self._token: str | None = None
        self.token_expires = 0.0
        self.renew_at = float("inf")
        self.renewable = False

    def __repr__(self) -> str:
        return f"VaultClient(url={self.url!r}, auth={self.auth!r}, namespace={self.namespace!r})"

    @property
    def token(self) -> str | None:
        """The token in use (None before the first call or after it was dropped)."""
        return self._token

    def close(self) -> None:
        with self._lock:
            if self._http_client is not None:
                self._http_client.close()
                self._http_client = None

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- authentication ------------------------------------------------------------------------
    def login(self) -> str:
        """Get a fresh token now (AppRole login, or the token (file) read again) and return it."""
        with self._lock:
            self._login_locked()
            assert self._token is not None
            return self._token

    def forget_token(self) -> None:
        """Drop the token: the next call logs in again."""
        with self._lock:
            self._token = None

    def lookup_self(self) -> dict[str, Any]:
        """``auth/token/lookup-self``: the token's own properties (policies, ttl...)."""
        body = self.request("GET", "auth/token/lookup-self", action="looking up the token at")
        return _data(body, self, "auth/token/lookup-self")

    def renew_self(self) -> None:
        """Renew the token (``auth/token/renew-self``) and remember its new lease. On failure the token is
        dropped (the next call logs in again) and the error raised."""
        token = self._current_token()[0]
        try:
            body = self._send("POST", "auth/token/renew-self", token=token, json={}, action="renewing the token at")
        except VaultError:
            with self._lock:
                if self._token == token:
                    self._token = None
            raise
        auth = body.get("auth")
        with self._lock:
            if self._token == token and isinstance(auth, dict):
                self._remember_lease(auth)

    def renew_if_due(self) -> bool:
        """Renew a renewable token once half its lease has passed (call it periodically); True if it did.
        Raises like :meth:`renew_self` (the token is then dropped)."""
        with self._lock:
            due = self._token is not None and self.renewable and self._clock() >= self.renew_at
        if due:
            self.renew_self()
        return due

    def _current_token(self) -> tuple[str, bool]:
        """The token to use, and whether it was obtained just now."""
        with self._lock:
            if self._token is not None and (
                self.token_expires == 0 or self._clock() < self.token_expires - EXPIRY_MARGIN
            ):
                return self._token, False
            self._login_locked()
            assert self._token is not None
            return self._token, True

    def _login_locked(self) -> None:
        auth = self.auth
        if isinstance(auth, TokenAuth):
            self._token = auth.token or _read_credential(auth.token_file, "token_file", self.url)
            self.token_expires, self.renew_at, self.renewable = 0.0, float("inf"), False
            return
        role_id = auth.role_id or _read_credential(auth.role_id_file, "role_id_file", self.url)
        secret_id = auth.secret_id or _read_credential(auth.secret_id_file, "secret_id_file", self.url)
        mount = auth.mount.strip("/")
        self._token = None
        body = self._send(
            "POST",
            f"auth/{mount}/login",
            token=None,
            json={"role_id": role_id, "secret_id": secret_id},
            action="logging in with AppRole at",
            login=True,
        )
        lease = body.get("auth")
        token = lease.get("client_token") if isinstance(lease, dict) else None
        if not isinstance(lease, dict) or not isinstance(token, str) or not token:
            raise VaultLoginFailed(
                f"Vault at {self.url}: the AppRole login at auth/{mount}/login returned no token",
                url=self.url,
                action="logging in with AppRole at",
                where=f"auth/{mount}/login",
                status=200,
                login=True,
            )
        self._token = token
        self._remember_lease(lease)

    def _remember_lease(self, auth: Mapping[str, Any]) -> None:
        lease = auth.get("lease_duration") or 0
        lease = float(lease) if isinstance(lease, int | float) and not isinstance(lease, bool) else 0.0
        now = self._clock()
        self.renewable = bool(auth.get("renewable"))
        self.token_expires = now + lease if lease > 0 else 0.0
        self.renew_at = now + lease / 2 if lease > 0 else float("inf")

    def _retry_after_denial(self, token: str) -> bool:
        """After a 403 with ``token``: is there another token worth one more try?"""
        with self._lock:
            if self._token != token:  # another thread has replaced it meanwhile
                return self._token is not None
            auth = self.auth
            if isinstance(auth, AppRoleAuth):  # expired or revoked: log in again at the next try
                self._token = None
                return True
            if auth.token_file is None:
                return False
            fresh = _read_credential(auth.token_file, "token_file", self.url)
            if fresh == token:
                return False
            self._token = fresh
            return True

    def _token_rejected(self, token: str) -> bool:
        """Is ``token`` itself refused (lookup-self is allowed to every valid token)?"""
        try:
            self._send("GET", "auth/token/lookup-self", token=token, action="looking up the token at")
        except VaultDenied:
            return True
        except VaultError:
            return False
        return False

    # ----- requests --------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        action: str = "calling",
    ) -> dict[str, Any]:
        """An authenticated call of ``/v1/<path>``; the JSON answer ({} when empty).

        A refused token is replaced once (AppRole: a new login; token file: read again if it changed) and the
        call retried; a token that is still refused raises :class:`VaultTokenRejected` (token auth) or
        :class:`VaultDenied`."""
        path = _api_path(path)
        retried = False
        while True:
            token, fresh = self._current_token()
            try:
                return self._send(method, path, token=token, json=json, params=params, action=action)
            except VaultDenied as exc:
                if not retried and not fresh and self._retry_after_denial(token):
                    retried = True
                    continue
                if isinstance(self.auth, TokenAuth) and self._token_rejected(token):
                    raise VaultTokenRejected(
                        f"Vault at {self.url}: token rejected (invalid, expired or revoked) while {action} {path}",
                        url=self.url,
                        action=action,
                        where=path,
                        status=exc.status,
                        errors=exc.errors,
                    ) from exc
                raise

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._http_client is None:
                headers = {"X-Vault-Request": "true"}
                if self.namespace:
                    headers["X-Vault-Namespace"] = self.namespace
                self._http_client = httpx.Client(
                    base_url=self.url,
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout),
                    verify=self._ssl_verify(),
                    transport=self._transport,
                    follow_redirects=False,
                )
            return self._http_client

    def _ssl_verify(self) -> bool | ssl.SSLContext:
        if isinstance(self.verify, bool) or self._transport is not None or not self.url.startswith("https://"):
            return self.verify if isinstance(self.verify, bool) else True
        bundle = Path(self.verify)
        try:
            if bundle.is_dir():
                return ssl.create_default_context(capath=str(bundle))
            return ssl.create_default_context(cafile=str(bundle))
        except OSError as exc:
            raise VaultCredentialError(
                f"cannot read verify {bundle}: {exc.strerror}",
                option="verify",
                path=bundle,
                strerror=exc.strerror or type(exc).__name__,
                url=self.url,
            ) from None
        except ssl.SSLError as exc:
            raise VaultCredentialError(
                f"verify {bundle} is not a PEM CA bundle ({exc.reason})",
                option="verify",
                path=bundle,
                strerror="not a PEM CA bundle",
                url=self.url,
            ) from None

    def _send(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        action: str,
        login: bool = False,
    ) -> dict[str, Any]:
        ctx: dict[str, Any] = {"url": self.url, "action": action, "where": path, "login": login}
        headers = {"X-Vault-Token": token} if token else None
        try:
            resp = self._http().request(method, "/v1/" + path, json=json, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise VaultUnreachable(
                f"Vault at {self.url} is unreachable while {action} {path} (timed out after {self.timeout:g} s)",
                timed_out=True,
                reason=type(exc).__name__,
                **ctx,
            ) from exc
        except httpx.HTTPError as exc:
            raise VaultUnreachable(
                f"Vault at {self.url} is unreachable while {action} {path} (connection failed: {type(exc).__name__})",
                reason=type(exc).__name__,
                **ctx,
            ) from exc
        body: Any
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = None
        if resp.status_code < 400:
            if not isinstance(body, dict):
                raise VaultProtocolError(
                    f"Vault at {self.url} answered {action} {path} with something that is not a JSON object",
                    status=resp.status_code,
                    **ctx,
                )
            return body
        raise self._error(resp.status_code, body if isinstance(body, dict) else {}, ctx)

    def _error(self, status: int, body: dict[str, Any], ctx: dict[str, Any]) -> VaultError:
        raw = body.get("errors")
        errors = tuple(str(e) for e in raw) if isinstance(raw, list) else ()
        details, url, action, where = join_details(errors), self.url, ctx["action"], ctx["where"]
        kw: dict[str, Any] = {**ctx, "status": status, "errors": errors}
        if status == 503 and "sealed" in details.lower():
            return VaultSealed(f"Vault at {url} is sealed (503 while {action} {where})", **kw)
        if status == 501:
            error = VaultUnavailable(f"Vault at {url} is not initialized (501 while {action} {where})", **kw)
            error.state = "not initialized"
            return error
        if status in (429, 502, 503, 504):
            return VaultUnavailable(f"Vault at {url} is unavailable ({status}: {details}) while {action} {where}", **kw)
        if ctx["login"] and status in (400, 403, 404):
            why = (
                "invalid role or secret ID"
                if status == 400 and "invalid" in details.lower()
                else f"{details}; is an auth method of that kind enabled at {where.rsplit('/', 1)[0]}/?"
            )
            return VaultLoginFailed(f"Vault at {url} refused the login at {where} ({status}: {why})", **kw)
        if status == 403:
            return VaultDenied(f"Vault at {url}: permission denied {action} {where}", **kw)
        if status == 404:
            if any("no handler for route" in e for e in errors):
                msg = f"Vault at {url}: nothing is mounted that serves {where} ({details})"
            else:
                msg = f"Vault at {url}: nothing at {where} (404 while {action} it)"
            return VaultNotFound(msg, body=body, **kw)
        if status in (400, 405):
            return VaultInvalidRequest(f"Vault at {url} refused {action} {where} ({status}: {details})", **kw)
        return VaultProtocolError(f"Vault at {url} answered {status} while {action} {where} ({details})", **kw)

    # ----- KV version 2 ------------------------------------------------------------------------------
    def read(self, mount: str, path: str, version: int | None = None) -> KvSecret:
        """Version ``version`` (default: the latest) of the KV v2 secret ``path`` in the engine at ``mount``.

        A deleted or destroyed version is returned with ``data=None`` (and its metadata); a secret or version
        that does not exist raises :class:`VaultNotFound` (``route_missing`` when no engine is mounted there)."""
        api = f"{_api_path(mount)}/data/{_api_path(path)}"
        params = {"version": str(int(version))} if version is not None else None
        action = f"reading version {version} of" if version is not None else "reading"
        try:
            body = self.request("GET", api, params=params, action=action)
        except VaultNotFound as exc:
            data = exc.body.get("data")
            if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
                return _kv_secret(data, self, api)  # a deleted or destroyed version: metadata, no data
            raise
        return _kv_secret(_data(body, self, api), self, api)

    def read_metadata(self, mount: str, path: str) -> KvMetadata:
        """The KV v2 metadata of ``path``: current version and every kept version's times."""
        api = f"{_api_path(mount)}/metadata/{_api_path(path)}"
        data = _data(self.request("GET", api, action="reading the metadata of"), self, api)
        versions = data.get("versions")
        infos = []
        if isinstance(versions, dict):
            for number, info in versions.items():
                if str(number).isdigit() and isinstance(info, dict):
                    infos.append(
                        KvVersionInfo(
                            version=int(number),
                            created_time=str(info.get("created_time") or ""),
                            deletion_time=str(info.get("deletion_time") or ""),
                            destroyed=bool(info.get("destroyed")),
                        )
                    )
        return KvMetadata(
            current_version=_int(data.get("current_version")),
            oldest_version=_int(data.get("oldest_version")),
            max_versions=_int(data.get("max_versions")),
            cas_required=bool(data.get("cas_required")),
            created_time=str(data.get("created_time") or ""),
            updated_time=str(data.get("updated_time") or ""),
            versions=tuple(sorted(infos, key=lambda v: v.version)),
            custom_metadata=_str_dict(data.get("custom_metadata")),
        )

    def write(self, mount: str, path: str, data: Mapping[str, Any], *, cas: int | None = None) -> int:
        """Write ``data`` as a new version of ``path``; the new version number.

        ``cas``: check-and-set, 0 = create only, N = only if the current version is N; a mismatch raises
        :class:`VaultCasMismatch` and writes nothing."""
        api = f"{_api_path(mount)}/data/{_api_path(path)}"
        body: dict[str, Any] = {"data": dict(data)}
        if cas is not None:
            body["options"] = {"cas": int(cas)}
        try:
            answer = self.request("POST", api, json=body, action="writing")
        except VaultInvalidRequest as exc:
            if cas is None or not any("check-and-set" in e for e in exc.errors):
                raise
            expected = "no version (create only)" if cas == 0 else f"version {cas}"
            raise VaultCasMismatch(
                f"Vault at {self.url}: {api} changed concurrently: check-and-set expected {expected} "
                f"({exc.details}); nothing was written",
                expected=cas,
                url=self.url,
                action="writing",
                where=api,
                status=exc.status,
                errors=exc.errors,
            ) from exc
        return _int(_data(answer, self, api).get("version"))


# ----- helpers -------------------------------------------------------------------------------------------
def _api_path(path: str) -> str:
    clean = path.strip("/")
    if not clean or any(part in ("", ".", "..") for part in clean.split("/")):
        raise ValueError(f"not a usable Vault path: {path!r}")
    return clean


def _read_credential(file: Path | None, option: str, url: str) -> str:
    assert file is not None
    try:
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise VaultCredentialError(
            f"cannot read {option} {file}: {exc.strerror}",
            option=option,
            path=file,
            strerror=exc.strerror or type(exc).__name__,
            url=url,
        ) from None
    if not value:
        raise VaultCredentialError(f"{option} {file} is empty", option=option, path=file, strerror=None, url=url)
    return value


def _data(body: Mapping[str, Any], client: VaultClient, where: str) -> dict[str, Any]:
    data = body.get("data")
    if not isinstance(data, dict):
        raise VaultProtocolError(
            f"Vault at {client.url} answered for {where} without a data object", url=client.url, where=where
        )
    return data


def _kv_secret(data: Mapping[str, Any], client: VaultClient, where: str) -> KvSecret:
    meta = data.get("metadata")
    if not isinstance(meta, dict):
        raise VaultProtocolError(
            f"Vault at {client.url}: {where} has no KV v2 metadata (is the engine KV version 1?)",
            url=client.url,
            where=where,
        )
    values = data.get("data")
    version = meta.get("version")
    return KvSecret(
        data=dict(values) if isinstance(values, dict) else None,
        version=version if isinstance(version, int) and not isinstance(version, bool) else None,
        created_time=str(meta.get("created_time") or ""),
        deletion_time=str(meta.get("deletion_time") or ""),
        destroyed=bool(meta.get("destroyed")),
        custom_metadata=_str_dict(meta.get("custom_metadata")),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str_dict(value: Any) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None
