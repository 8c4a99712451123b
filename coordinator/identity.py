"""The coordinator's static X25519 identity key and the challenges that make sealed requests fresh.

The identity key (secret `identity_key`: base64 of 32 random bytes, kept with the other secrets, in Vault
when configured) is what agents seal enrollment, login and key-rotation requests to (starling_proto.seal).

A challenge is stateless until it is used: `base64url(version || nonce[16] || expires[8] || mac[16])`, the
MAC being HMAC-SHA256 under a key derived from the identity key, so every replica sharing the key can check
any replica's challenges. Single use is enforced by the store: the nonce of an accepted request is written
to `consumed_challenges` in the same transaction as the enrollment (a unique key), and expired rows are
purged by the maintenance loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from starling_proto.keys import public_key_b64

CHALLENGE_VERSION = 1
NONCE_BYTES = 16
MAC_BYTES = 16
_LAYOUT = struct.Struct(f">B{NONCE_BYTES}sQ")
TOKEN_BYTES = _LAYOUT.size + MAC_BYTES


class ChallengeError(Exception):
    """A challenge that must not be accepted: malformed, forged (not ours) or stale (expired)."""

    def __init__(self, reason: Literal["malformed", "forged", "stale"], detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def new_identity_key() -> str:
    """A fresh identity key: base64 of 32 raw X25519 private-key bytes."""
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def decode_identity_key(value: str) -> X25519PrivateKey:
    """Parse a stored identity key; ValueError (no key material in the message) when it is not 32 bytes."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("identity_key is not the base64 encoding of a 32-byte X25519 private key")
    return X25519PrivateKey.from_private_bytes(raw)


class Identity:
    """The identity key pair and the challenge issuer/checker derived from it."""

    def __init__(self, private_b64: str, challenge_ttl: int = 30) -> None:
        self.private = decode_identity_key(private_b64)
        self.public_key_b64 = public_key_b64(self.private)
        self.challenge_ttl = challenge_ttl
        raw = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self._mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"starling challenge mac v1").derive(
            raw
        )

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._mac_key, body, hashlib.sha256).digest()[:MAC_BYTES]

    def issue(self, now: float | None = None) -> tuple[str, int]:
        """A new challenge and its expiry (unix seconds)."""
        expires = int(time.time() if now is None else now) + self.challenge_ttl
        body = _LAYOUT.pack(CHALLENGE_VERSION, secrets.token_bytes(NONCE_BYTES), expires)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("="), expires

    def check(self, token: str, now: float | None = None) -> tuple[str, int]:
        """(nonce id, expiry) of a challenge this coordinator issued and that has not expired."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as exc:
            raise ChallengeError("malformed", "the challenge is not one this coordinator issues") from exc
        if len(raw) != TOKEN_BYTES or raw[0] != CHALLENGE_VERSION:
            raise ChallengeError("malformed", "the challenge is not one this coordinator issues")
        body, mac = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise ChallengeError("forged", "the challenge was not issued by this coordinator")
        _version, nonce, expires = _LAYOUT.unpack(body)
        if expires < (time.time() if now is None else now):
            raise ChallengeError("stale", "the challenge has expired: fetch a new one")
        return nonce.hex(), expires
