"""The errors of `starling_proto.vault` (Vault / OpenBao over HTTP): one class per kind of failure, each with
the server URL, what was being done, the API path, the HTTP status and Vault's own error strings, and a
one-line message for operators. Messages and reprs never contain a token, a secret ID or a secret value."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class VaultError(Exception):
    """A Vault operation failed. ``str(e)`` is one line for operators, never carrying a secret.

    ``url`` is the server, ``action`` what was being done ("reading", "writing", "logging in with AppRole"...),
    ``where`` the API path (without ``/v1/`` and query), ``status`` the HTTP status (None when there was no
    answer), ``errors`` Vault's own error strings, ``login`` whether it happened while logging in.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        action: str = "",
        where: str = "",
        status: int | None = None,
        errors: tuple[str, ...] = (),
        login: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url, self.action, self.where = url, action, where
        self.status, self.errors, self.login = status, errors, login

    @property
    def details(self) -> str:
        """Vault's error strings on one line, or "no details"."""
        return join_details(self.errors)


class VaultUnavailable(VaultError):
    """Vault could not serve the request: unreachable, sealed, not initialized, standby, overloaded.

    ``state`` says which ("unreachable", "sealed", "not initialized", "unavailable"). Nothing is wrong with
    the request or the credentials: the same call may succeed later.
    """

    state = "unavailable"


class VaultUnreachable(VaultUnavailable):
    """No HTTP answer: connection refused or reset, DNS or TLS failure, or a timeout (``timed_out``)."""

    state = "unreachable"

    def __init__(self, message: str, *, timed_out: bool = False, reason: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.timed_out = timed_out
        self.reason = reason


class VaultSealed(VaultUnavailable):
    """Vault answered that it is sealed (503)."""

    state = "sealed"


class VaultDenied(VaultError):
    """Vault refused the request (403): the token's policies do not allow it."""


class VaultTokenRejected(VaultDenied):
    """The token itself is refused (invalid, expired or revoked), not just this path."""


class VaultLoginFailed(VaultDenied):
    """A login was refused: wrong role or secret ID, or no such auth method at that mount."""


class VaultNotFound(VaultError):
    """Nothing at that path (404). ``body`` is Vault's answer (parsed JSON, possibly empty)."""

    def __init__(self, message: str, *, body: Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.body: Mapping[str, Any] = body or {}

    @property
    def route_missing(self) -> bool:
        """No secrets engine or auth method is mounted there ("no handler for route"), as opposed to an
        engine that holds nothing at that path."""
        return any("no handler for route" in e for e in self.errors)


class VaultInvalidRequest(VaultError):
    """Vault refused the request as invalid (400, 405), e.g. a malformed body or a KV v1 mount."""


class VaultCasMismatch(VaultInvalidRequest):
    """A check-and-set write lost: the secret's current version is not ``expected`` (0: it exists)."""

    def __init__(self, message: str, *, expected: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.expected = expected


class VaultCredentialError(VaultError):
    """A local credential file (``option``: token_file, role_id_file, secret_id_file, verify) cannot be used:
    ``strerror`` says why, None when the file is empty."""

    def __init__(self, message: str, *, option: str, path: Path, strerror: str | None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.option, self.path, self.strerror = option, path, strerror


class VaultProtocolError(VaultError):
    """Vault's answer is not what its API promises (not JSON, fields missing), or an unexpected status."""


def join_details(errors: tuple[str, ...]) -> str:
    text = "; ".join(" ".join(e.split()) for e in errors if e.strip())
    return text or "no details"
