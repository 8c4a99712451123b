"""Dashboard sessions: a signed, stateless cookie (HMAC-SHA256) and CSRF tokens.

The signing key is derived from the coordinator's admin-token hash, so every replica that shares
the secrets accepts the same sessions, and rotating the admin token ends every session at once.
The cookie holds who logged in (actor, scope, API token id), a CSRF token and an expiry; never
the API token itself. Sessions of API tokens are re-checked against the store on every request,
so revoking (or expiring) the token ends its dashboard sessions too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

SESSION_COOKIE = "starling_session"
LOGIN_COOKIE = "starling_login"
KEY_CONTEXT = b"starling dashboard session v1"
MAX_COOKIE = 2048


def derive_key(admin_token_hash: str) -> bytes:
    """32-byte HMAC key bound to this mesh's admin token (hex SHA-256 as kept on the Coordinator)."""
    try:
        material = bytes.fromhex(admin_token_hash)
    except ValueError:
        material = admin_token_hash.encode()
    return hmac.new(material, KEY_CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    actor: str
    scope: Literal["read", "write"]
    token_id: str  # "" for the admin bootstrap token
    csrf: str
    issued_at: int
    expires_at: int

    @property
    def can_write(self) -> bool:
        return self.scope == "write"


class SessionCodec:
    def __init__(self, key: bytes, ttl: int) -> None:
        self.key = key
        self.ttl = ttl

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())

    def issue(
        self, actor: str, scope: Literal["read", "write"], token_id: str, now: float, not_after: float | None = None
    ) -> tuple[str, Session]:
        expires = int(now) + self.ttl
        if not_after is not None:
            expires = min(expires, int(not_after))
        session = Session(actor, scope, token_id, secrets.token_urlsafe(24), int(now), expires)
        body: dict[str, Any] = {
            "v": 1,
            "a": actor,
            "s": scope,
            "t": token_id,
            "c": session.csrf,
            "i": session.issued_at,
            "e": session.expires_at,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}", session

    def decode(self, value: str | None, now: float) -> Session | None:
        """The session in a cookie value, or None when missing, forged, malformed or expired."""
        if not value or len(value) > MAX_COOKIE or value.count(".") != 1:
            return None
        payload, signature = value.split(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            body = json.loads(_unb64(payload))
            scope = body["s"]
            session = Session(
                str(body["a"]),
                "write" if scope == "write" else "read",
                str(body["t"]),
                str(body["c"]),
                int(body["i"]),
                int(body["e"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if body.get("v") != 1 or session.expires_at <= now:
            return None
        return session


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)
