"""End-to-end encryption of signal messages between two peers, keyed by their WireGuard X25519 keys.

key     = HKDF-SHA256(X25519(own private, remote public), salt = sorted(pub_a, pub_b) joined,
                      info = b"starling-signal v1", 32 bytes)          (same key in both directions)
box     = base64(0x01 || nonce[12] || ChaCha20-Poly1305(key, nonce, plaintext, aad))
aad     = b"starling-signal v1" || 0x01 || sender public key || recipient public key
plaintext = JSON {"ts": unix time, "n": random id, "kind": str, "body": {...}}

The AAD binds the direction, so a box cannot be re-addressed to another peer nor reflected back to its
sender. The receiver rejects boxes older than `window` seconds or more than `skew` seconds in the
future, and remembers each sender's `n` values while they are inside the window (bounded memory).
Signal (the broker) only ever sees the box. This module shares no code with the coordinator.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"starling-signal v1"
VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
MAX_KIND_CHARS = 64
MAX_N_CHARS = 64

Reason = Literal["forged", "replayed", "stale", "malformed"]


class SignalCryptoError(Exception):
    """A box that must not be used; `reason` is forged, replayed, stale or malformed."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Envelope:
    """The plaintext inside a box."""

    kind: str
    body: dict[str, Any]
    ts: float
    n: str

    def to_json(self) -> bytes:
        doc = {"ts": self.ts, "n": self.n, "kind": self.kind, "body": self.body}
        try:
            return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"body is not JSON-serialisable: {exc}") from exc

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise SignalCryptoError("malformed", "plaintext is not JSON") from exc
        if not isinstance(doc, dict):
            raise SignalCryptoError("malformed", "plaintext is not a JSON object")
        ts, n, kind, body = doc.get("ts"), doc.get("n"), doc.get("kind"), doc.get("body")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise SignalCryptoError("malformed", "'ts' is not a number")
        if not isinstance(n, str) or not 1 <= len(n) <= MAX_N_CHARS:
            raise SignalCryptoError("malformed", "'n' is not a short string")
        if not isinstance(kind, str) or not 1 <= len(kind) <= MAX_KIND_CHARS:
            raise SignalCryptoError("malformed", "'kind' is not a short string")
        if not isinstance(body, dict):
            raise SignalCryptoError("malformed", "'body' is not an object")
        return cls(kind=kind, body=body, ts=float(ts), n=n)


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    """A verified message: who sent it (their public key, base64) and its envelope."""

    sender: str
    envelope: Envelope

    @property
    def kind(self) -> str:
        return self.envelope.kind

    @property
    def body(self) -> dict[str, Any]:
        return self.envelope.body


def decode_public_key(value: str) -> bytes:
    """Raw 32 bytes of a base64 WireGuard public key; SignalCryptoError('malformed') otherwise."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SignalCryptoError("malformed", "public key is not base64") from exc
    if len(raw) != KEY_BYTES:
        raise SignalCryptoError("malformed", "public key is not 32 bytes")
    return raw


@dataclass
class _SenderWindow:
    seen: dict[str, float] = field(default_factory=dict)  # n -> ts, in arrival order
    floor: float = -math.inf  # boxes at or below this ts cannot be checked any more (evicted)
    newest: float = -math.inf


class ReplayGuard:
    """Remembers (sender, n) while `ts` is inside the window; memory bounded per sender and in senders.

    When a sender's table is full the oldest entry is evicted and its `ts` becomes that sender's floor:
    boxes not newer than the floor are refused as replayed (they can no longer be told apart). When too
    many senders are tracked, the least recently active one is dropped and the global floor rises to
    its newest `ts` (only reached with more than `max_senders` peers active inside one window).
    """

    def __init__(self, window: float, max_per_sender: int = 4096, max_senders: int = 4096) -> None:
        self.window = window
        self.max_per_sender = max_per_sender
        self.max_senders = max_senders
        self._senders: OrderedDict[str, _SenderWindow] = OrderedDict()
        self._global_floor = -math.inf

    def __len__(self) -> int:
        return sum(len(w.seen) for w in self._senders.values())

    def check_and_remember(self, sender: str, n: str, ts: float, now: float) -> None:
        state = self._senders.get(sender)
        if state is None:
            state = self._senders[sender] = _SenderWindow()
        self._senders.move_to_end(sender)
        self._prune(state, now)
        if n in state.seen or ts <= state.floor or ts <= self._global_floor:
            raise SignalCryptoError("replayed", "message id already seen")
        state.seen[n] = ts
        state.newest = max(state.newest, ts)
        while len(state.seen) > self.max_per_sender:
            oldest = next(iter(state.seen))
            state.floor = max(state.floor, state.seen.pop(oldest))
        self._bound_senders(now)

    def _prune(self, state: _SenderWindow, now: float) -> None:
        limit = now - self.window
        for key in [k for k, t in state.seen.items() if t < limit]:
            del state.seen[key]

    def _bound_senders(self, now: float) -> None:
        if len(self._senders) <= self.max_senders:
            return
        for sender in list(self._senders):  # least recently active first
            state = self._senders[sender]
            self._prune(state, now)
            if not state.seen and state.floor < now - self.window:
                del self._senders[sender]
        while len(self._senders) > self.max_senders:
            _, state = self._senders.popitem(last=False)
            self._global_floor = max(self._global_floor, state.newest)


class SignalCrypto:
    """Seal and open signal boxes for one WireGuard identity (its raw 32-byte X25519 private key)."""

    def __init__(
        self,
        private_key: bytes | X25519PrivateKey,
        *,
        window: float = 120.0,
        skew: float = 30.0,
        clock: Callable[[], float] = time.time,
        max_cached_keys: int = 4096,
    ) -> None:
        if isinstance(private_key, X25519PrivateKey):
            self._private = private_key
        else:
            if len(private_key) != KEY_BYTES:
                raise ValueError("private key must be 32 raw bytes")
            self._private = X25519PrivateKey.from_private_bytes(private_key)
        self._public_raw = self._private.public_key().public_bytes_raw()
        self.public_key = base64.b64encode(self._public_raw).decode()
        self.window = window
        self.skew = skew
        self._clock = clock
        self._max_cached = max_cached_keys
        self._keys: OrderedDict[bytes, ChaCha20Poly1305] = OrderedDict()
        self.replay = ReplayGuard(window)
        self.derivations = 0  # key derivations done (the cache avoids one per message)

    # ----- keys ---------------------------------------------------------------------------------
    def _aead(self, remote_raw: bytes) -> ChaCha20Poly1305:
        aead = self._keys.get(remote_raw)
        if aead is not None:
            self._keys.move_to_end(remote_raw)
            return aead
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(remote_raw))
        except ValueError as exc:  # a low-order point gives an all-zero secret
            raise SignalCryptoError("malformed", "unusable public key") from exc
        salt = b"".join(sorted((self._public_raw, remote_raw)))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=INFO).derive(shared)
        aead = self._keys[remote_raw] = ChaCha20Poly1305(key)
        self.derivations += 1
        while len(self._keys) > self._max_cached:
            self._keys.popitem(last=False)
        return aead

    @property
    def cached_keys(self) -> int:
        return len(self._keys)

    @staticmethod
    def _aad(sender_raw: bytes, recipient_raw: bytes) -> bytes:
        return INFO + bytes([VERSION]) + sender_raw + recipient_raw

    # ----- seal / open --------------------------------------------------------------------------
    def seal(self, to_pub: str, kind: str, body: dict[str, Any]) -> str:
        """Encrypt `{kind, body}` for `to_pub`; returns the box (base64). ValueError for bad input."""
        if not isinstance(kind, str) or not 1 <= len(kind) <= MAX_KIND_CHARS:
            raise ValueError(f"kind must be a string of 1 to {MAX_KIND_CHARS} characters")
        if not isinstance(body, dict):
            raise ValueError("body must be a dict")
        try:
            remote_raw = decode_public_key(to_pub)
        except SignalCryptoError as exc:
            raise ValueError(f"bad recipient key: {exc.detail}") from exc
        envelope = Envelope(kind=kind, body=body, ts=self._clock(), n=secrets.token_hex(16))
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead(remote_raw).encrypt(nonce, envelope.to_json(), self._aad(self._public_raw, remote_raw))
        return base64.b64encode(bytes([VERSION]) + nonce + sealed).decode()

    def open_message(self, from_pub: str, box: str) -> OpenedMessage:
        """Decrypt and check a box from `from_pub`; SignalCryptoError(forged|replayed|stale|malformed)."""
        remote_raw = decode_public_key(from_pub)
        try:
            raw = base64.b64decode(box, validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise SignalCryptoError("malformed", "box is not base64") from exc
        if len(raw) < 1 + NONCE_BYTES + TAG_BYTES:
            raise SignalCryptoError("malformed", "box too short")
        if raw[0] != VERSION:
            raise SignalCryptoError("malformed", f"unknown box version {raw[0]}")
        nonce, sealed = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
        try:
            plain = self._aead(remote_raw).decrypt(nonce, sealed, self._aad(remote_raw, self._public_raw))
        except InvalidTag as exc:
            raise SignalCryptoError("forged", "authentication failed") from exc
        envelope = Envelope.from_json(plain)
        now = self._clock()
        if envelope.ts < now - self.window:
            raise SignalCryptoError("stale", f"box is {now - envelope.ts:.0f}s old")
        if envelope.ts > now + self.skew:
            raise SignalCryptoError("stale", f"box is {envelope.ts - now:.0f}s in the future")
        self.replay.check_and_remember(from_pub, envelope.n, envelope.ts, now)
        return OpenedMessage(sender=from_pub, envelope=envelope)

    def open(self, from_pub: str, box: str) -> tuple[str, dict[str, Any]]:
        """Decrypt and check a box from `from_pub`; returns (kind, body)."""
        message = self.open_message(from_pub, box)
        return message.kind, message.body
