"""Short-lived tokens signed with the coordinator's Ed25519 key, verifiable offline (by signal).

Format: `v1.<base64url(JSON claims)>.<base64url(signature over "v1." + claims part)>`.
Claims: `sub` (peer WireGuard public key), `aud`, `iat`, `exp`, `name` (peer name).
This module is deliberately free of coordinator imports so the signal service can reuse it.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAX_TOKEN_BYTES = 4096


class TokenError(Exception):
    """The token is malformed, forged, expired or for another audience."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, private_key_b64: str) -> None:
        raw = base64.b64decode(private_key_b64, validate=True)
        if len(raw) != 32:
            raise ValueError("signing key must be 32 raw Ed25519 bytes, base64-encoded")
        self._key = Ed25519PrivateKey.from_private_bytes(raw)
        self.public_key_b64 = base64.b64encode(
            self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        ).decode()

    def issue(self, subject: str, *, audience: str, ttl: int, now: float | None = None, **extra: Any) -> str:
        issued = int(time.time() if now is None else now)
        claims = {"sub": subject, "aud": audience, "iat": issued, "exp": issued + ttl, **extra}
        body = "v1." + _b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return body + "." + _b64url(self._key.sign(body.encode()))


class TokenVerifier:
    def __init__(self, public_key_b64: str) -> None:
        raw = base64.b64decode(public_key_b64, validate=True)
        if len(raw) != 32:
            raise ValueError("verify key must be 32 raw Ed25519 bytes, base64-encoded")
        self._key = Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, token: str, *, audience: str, now: float | None = None, leeway: int = 5) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("token too large")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise TokenError("malformed token")
        try:
            signature = _unb64url(parts[2])
            self._key.verify(signature, (parts[0] + "." + parts[1]).encode())
        except (InvalidSignature, ValueError) as exc:
            raise TokenError("bad signature") from exc
        try:
            claims = json.loads(_unb64url(parts[1]))
        except ValueError as exc:
            raise TokenError("malformed claims") from exc
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
            raise TokenError("malformed claims")
        if claims.get("aud") != audience:
            raise TokenError("wrong audience")
        current = time.time() if now is None else now
        if claims["exp"] + leeway < current:
            raise TokenError("token expired")
        return claims
