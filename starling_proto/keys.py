"""WireGuard (X25519) public keys as they enter Starling: base64 of 32 bytes, never a low-order point.

A low-order point (the all-zero key, 1, p-1, p, p+1 and the two points of order 8, in their canonical
and high-bit forms) makes every Diffie-Hellman with it yield the all-zero secret: a peer "holding" such a
key proves nothing, and WireGuard refuses it. The check asks the X25519 implementation itself
(`cryptography` raises on an all-zero shared secret) rather than a hand-kept list, so every encoding of
every low-order point is caught.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

KEY_BYTES = 32
_PROBE = X25519PrivateKey.generate()


class KeyFormatError(ValueError):
    """The value is not a usable WireGuard public key; the message says why."""


def decode_public_key(value: str) -> bytes:
    """The 32 raw bytes of a base64 WireGuard public key; KeyFormatError if malformed or low-order."""
    if not isinstance(value, str) or len(value) != 44:
        raise KeyFormatError("must be a base64-encoded 32-byte WireGuard key (44 characters)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError("must be a base64-encoded 32-byte WireGuard key") from exc
    if len(raw) != KEY_BYTES:
        raise KeyFormatError("must be a base64-encoded 32-byte WireGuard key")
    if is_low_order(raw):
        raise KeyFormatError("is a low-order X25519 point (no key pair can prove it): refused")
    return raw


def is_low_order(raw: bytes) -> bool:
    """True when X25519 with this point gives the all-zero secret for any private key."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return True
    return False


def public_key_b64(private: X25519PrivateKey) -> str:
    return base64.b64encode(private.public_key().public_bytes_raw()).decode()
