"""Sealed requests: a fresh proof that the sender holds WireGuard private keys, and a reply only it can read.

Used for enrollment and re-login (one key) and for key rotation (the old and the new key). The model is
NetBird's management protocol (every body sealed with the peer's WireGuard key to the server's static
key) with a server challenge for freshness. The exact construction (docs/security.md):

    C        the coordinator's static X25519 public key (`GET /api/v1/challenge` publishes it)
    k_1..k_n the sender's X25519 private keys, P_i their public keys (n = 1, or 2 for a rotation)
    ch       the challenge: single-use, short-lived, issued and MACed by the coordinator
    ikm      = X25519(k_1, C) || ... || X25519(k_n, C)
    okm      = HKDF-SHA256(ikm, salt = ch, info = LABEL || purpose || 0x00 || P_1 || .. || P_n || C, 64 bytes)
    k_req    = okm[0:32], k_resp = okm[32:64]
    request  = ChaCha20-Poly1305(k_req,  random 96-bit nonce, JSON payload, aad = b"request")
    reply    = ChaCha20-Poly1305(k_resp, random 96-bit nonce, JSON reply,   aad = b"response")

Only a holder of every k_i (or of the coordinator's private key) can produce a request that opens; the
purpose, every public key and the coordinator key are bound by the KDF, so a request cannot be re-aimed at
another endpoint, key or coordinator. Each challenge derives fresh keys and is accepted once, so a
replayed request is refused by the coordinator's challenge check, and a reply cannot be fed to another
request. Primitives come from `cryptography`; nothing here is hand-rolled.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from starling_proto.keys import KeyFormatError, decode_public_key

VERSION = 1
LABEL = b"starling-seal v1 X25519-HKDF-SHA256-ChaCha20Poly1305"
NONCE_BYTES = 12
MAX_BOX_CHARS = 64 * 1024
MAX_CHALLENGE_CHARS = 256

Purpose = Literal["enroll", "rotate"]


class SealError(Exception):
    """A sealed message that must not be used. `reason`: malformed, forged (does not open with the keys
    it names), or key (a named public key is not a usable WireGuard key)."""

    def __init__(self, reason: Literal["malformed", "forged", "key"], detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_BOX_CHARS:
        raise SealError("malformed", f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SealError("malformed", f"{what} is not valid base64") from exc


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def _keys(purpose: str, challenge: str, publics: Sequence[bytes], server: bytes, shared: Sequence[bytes]) -> bytes:
    info = LABEL + purpose.encode() + b"\x00" + b"".join(publics) + server
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=challenge.encode(), info=info).derive(b"".join(shared))


def _dump(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _load(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SealError("malformed", "the sealed payload is not JSON") from exc
    if not isinstance(doc, dict):
        raise SealError("malformed", "the sealed payload is not a JSON object")
    return doc


@dataclass(frozen=True, slots=True)
class ReplyKey:
    """The key of the one reply that belongs to a sealed request (both ends derive it)."""

    key: bytes

    def seal(self, reply: dict[str, Any]) -> dict[str, Any]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        box = ChaCha20Poly1305(self.key).encrypt(nonce, _dump(reply), b"response")
        return {"v": VERSION, "nonce": _b64(nonce), "box": _b64(box)}

    def open(self, wire: object) -> dict[str, Any]:
        if not isinstance(wire, dict) or wire.get("v") != VERSION:
            raise SealError("malformed", f"the reply is not a version {VERSION} sealed reply")
        nonce, box = _unb64(wire.get("nonce"), "nonce"), _unb64(wire.get("box"), "box")
        if len(nonce) != NONCE_BYTES:
            raise SealError("malformed", "nonce must be 12 bytes")
        try:
            return _load(ChaCha20Poly1305(self.key).decrypt(nonce, box, b"response"))
        except InvalidTag as exc:
            raise SealError("forged", "the reply does not open with this request's key") from exc


def seal(
    purpose: Purpose,
    private_keys: Sequence[X25519PrivateKey],
    server_public: str,
    challenge: str,
    payload: dict[str, Any],
) -> tuple[dict[str, Any], ReplyKey]:
    """The wire form of a sealed request (`public_key`, and `new_public_key` for a rotation) and the key of
    its reply. Raises SealError("key") when the server key is not usable."""
    if not 1 <= len(private_keys) <= 2:
        raise ValueError("a sealed request carries one or two keys")
    try:
        server = decode_public_key(server_public)
    except KeyFormatError as exc:
        raise SealError("key", f"the coordinator's key {exc}") from exc
    peer = X25519PublicKey.from_public_bytes(server)
    publics = [_raw_public(k) for k in private_keys]
    okm = _keys(purpose, challenge, publics, server, [k.exchange(peer) for k in private_keys])
    nonce = secrets.token_bytes(NONCE_BYTES)
    box = ChaCha20Poly1305(okm[:32]).encrypt(nonce, _dump(payload), b"request")
    wire: dict[str, Any] = {
        "v": VERSION,
        "challenge": challenge,
        "public_key": _b64(publics[0]),
        "nonce": _b64(nonce),
        "box": _b64(box),
    }
    if len(publics) == 2:
        wire["new_public_key"] = _b64(publics[1])
    return wire, ReplyKey(okm[32:])


@dataclass(frozen=True, slots=True)
class OpenedRequest:
    payload: dict[str, Any]
    public_keys: tuple[str, ...]
    challenge: str
    reply: ReplyKey


def open_request(purpose: Purpose, server_private: X25519PrivateKey, wire: dict[str, Any]) -> OpenedRequest:
    """Open a sealed request; SealError if it is malformed, names an unusable key, or was not sealed with
    the private keys of the public keys it names. The caller checks the challenge (fresh, unused)."""
    if wire.get("v") != VERSION:
        raise SealError("malformed", f"only sealed requests of version {VERSION} are understood")
    challenge = wire.get("challenge")
    if not isinstance(challenge, str) or not 0 < len(challenge) <= MAX_CHALLENGE_CHARS:
        raise SealError("malformed", "challenge is missing")
    names = ["public_key", "new_public_key"] if purpose == "rotate" else ["public_key"]
    publics: list[bytes] = []
    for name in names:
        value = wire.get(name)
        try:
            publics.append(decode_public_key(value if isinstance(value, str) else ""))
        except KeyFormatError as exc:
            raise SealError("key", f"{name} {exc}") from exc
    if len(set(publics)) != len(publics):
        raise SealError("malformed", "new_public_key must differ from public_key")
    nonce, box = _unb64(wire.get("nonce"), "nonce"), _unb64(wire.get("box"), "box")
    if len(nonce) != NONCE_BYTES:
        raise SealError("malformed", "nonce must be 12 bytes")
    server = _raw_public(server_private)
    shared = [server_private.exchange(X25519PublicKey.from_public_bytes(p)) for p in publics]
    okm = _keys(purpose, challenge, publics, server, shared)
    try:
        plain = ChaCha20Poly1305(okm[:32]).decrypt(nonce, box, b"request")
    except InvalidTag as exc:
        raise SealError("forged", "the request was not sealed with the private key(s) of the key(s) it names") from exc
    return OpenedRequest(_load(plain), tuple(_b64(p) for p in publics), challenge, ReplyKey(okm[32:]))
