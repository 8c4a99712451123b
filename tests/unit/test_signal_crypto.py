"""agent.signal_crypto: end-to-end boxes between two WireGuard identities (no network)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent.signal_crypto import ReplayGuard, SignalCrypto, SignalCryptoError


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def raw_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def alice(clock: Clock) -> SignalCrypto:
    return SignalCrypto(raw_private(), clock=clock)


@pytest.fixture
def bob(clock: Clock) -> SignalCrypto:
    return SignalCrypto(raw_private(), clock=clock)


@pytest.fixture
def carol(clock: Clock) -> SignalCrypto:
    return SignalCrypto(raw_private(), clock=clock)


BODY: dict[str, Any] = {"candidates": [{"addr": "198.18.250.7:51820", "type": "host"}], "ufrag": "x9"}


def reason(exc: pytest.ExceptionInfo[SignalCryptoError]) -> str:
    return exc.value.reason


def test_round_trip_both_directions(alice: SignalCrypto, bob: SignalCrypto) -> None:
    box = alice.seal(bob.public_key, "offer", BODY)
    assert bob.open(alice.public_key, box) == ("offer", BODY)
    answer = bob.seal(alice.public_key, "answer", {"ok": True})
    opened = alice.open_message(bob.public_key, answer)
    assert (opened.sender, opened.kind, opened.body) == (bob.public_key, "answer", {"ok": True})
    assert opened.envelope.ts == alice._clock()


def test_box_hides_the_plaintext(alice: SignalCrypto, bob: SignalCrypto) -> None:
    box = alice.seal(bob.public_key, "offer", {"secret": "MARKER-198.18.250.7"})
    raw = base64.b64decode(box)
    assert b"MARKER" not in raw and b"offer" not in raw and b"198.18.250.7" not in raw
    assert box != alice.seal(bob.public_key, "offer", {"secret": "MARKER-198.18.250.7"})  # random nonce


def test_any_tampered_byte_is_refused(alice: SignalCrypto, bob: SignalCrypto) -> None:
    raw = base64.b64decode(alice.seal(bob.public_key, "offer", BODY))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        with pytest.raises(SignalCryptoError) as exc:
            bob.open(alice.public_key, base64.b64encode(bytes(tampered)).decode())
        # byte 0 is the version: flipping it is malformed; everything else fails authentication
        assert reason(exc) == ("malformed" if i == 0 else "forged"), i
    with pytest.raises(SignalCryptoError) as exc:
        bob.open(alice.public_key, base64.b64encode(raw[:-1]).decode())
    assert reason(exc) == "forged"


def test_readdressed_box_is_refused(alice: SignalCrypto, bob: SignalCrypto, carol: SignalCrypto) -> None:
    box = alice.seal(bob.public_key, "offer", BODY)
    with pytest.raises(SignalCryptoError) as exc:  # carol cannot open bob's box
        carol.open(alice.public_key, box)
    assert reason(exc) == "forged"
    with pytest.raises(SignalCryptoError) as exc:  # nor can it pass as coming from carol
        bob.open(carol.public_key, box)
    assert reason(exc) == "forged"
    reflected = bob.seal(alice.public_key, "offer", BODY)
    with pytest.raises(SignalCryptoError) as exc:  # a box reflected back to its sender
        bob.open(alice.public_key, reflected)
    assert reason(exc) == "forged"


def test_replay_is_refused(alice: SignalCrypto, bob: SignalCrypto, clock: Clock) -> None:
    box = alice.seal(bob.public_key, "candidate", BODY)
    bob.open(alice.public_key, box)
    clock.now += 60
    with pytest.raises(SignalCryptoError) as exc:
        bob.open(alice.public_key, box)
    assert reason(exc) == "replayed"
    assert bob.open(alice.public_key, alice.seal(bob.public_key, "candidate", BODY))[0] == "candidate"


def test_stale_and_future_boxes_are_refused(alice: SignalCrypto, bob: SignalCrypto, clock: Clock) -> None:
    box = alice.seal(bob.public_key, "offer", BODY)
    clock.now += 121
    with pytest.raises(SignalCryptoError) as exc:
        bob.open(alice.public_key, box)
    assert reason(exc) == "stale"
    clock.now -= 121 + 31  # the box now looks 31 s in the future (skew 30 s)
    with pytest.raises(SignalCryptoError) as exc:
        bob.open(alice.public_key, box)
    assert reason(exc) == "stale"
    clock.now += 31 + 119  # 119 s old: inside the window
    assert bob.open(alice.public_key, box)[0] == "offer"


def test_wrong_key_is_refused(alice: SignalCrypto, bob: SignalCrypto, clock: Clock) -> None:
    impostor = SignalCrypto(raw_private(), clock=clock)
    box = impostor.seal(bob.public_key, "offer", BODY)
    with pytest.raises(SignalCryptoError) as exc:  # claims to be alice, sealed with another key
        bob.open(alice.public_key, box)
    assert reason(exc) == "forged"


@pytest.mark.parametrize(
    "box",
    ["", "not base64!", base64.b64encode(b"\x01short").decode(), base64.b64encode(b"\x02" + bytes(40)).decode()],
)
def test_malformed_boxes(alice: SignalCrypto, bob: SignalCrypto, box: str) -> None:
    with pytest.raises(SignalCryptoError) as exc:
        bob.open(alice.public_key, box)
    assert reason(exc) == "malformed"


def test_bad_sender_key_and_bad_plaintext(alice: SignalCrypto, bob: SignalCrypto) -> None:
    box = alice.seal(bob.public_key, "offer", BODY)
    for key in ("AAAA", "x" * 44, base64.b64encode(bytes(31)).decode()):
        with pytest.raises(SignalCryptoError) as exc:
            bob.open(key, box)
        assert reason(exc) == "malformed"
    with pytest.raises(SignalCryptoError) as exc:  # low-order point: all-zero shared secret
        bob.open(base64.b64encode(bytes(32)).decode(), box)
    assert reason(exc) == "malformed"
    # a well-authenticated box whose plaintext is not an envelope
    remote = base64.b64decode(bob.public_key)
    aead = alice._aead(remote)
    nonce = bytes(12)
    sealed = aead.encrypt(nonce, json.dumps(["x"]).encode(), alice._aad(alice._public_raw, remote))
    with pytest.raises(SignalCryptoError) as exc:
        bob.open(alice.public_key, base64.b64encode(b"\x01" + nonce + sealed).decode())
    assert reason(exc) == "malformed"


def test_seal_rejects_bad_input(alice: SignalCrypto, bob: SignalCrypto) -> None:
    with pytest.raises(ValueError, match="recipient"):
        alice.seal("nope", "offer", {})
    with pytest.raises(ValueError, match="kind"):
        alice.seal(bob.public_key, "", {})
    with pytest.raises(ValueError, match="JSON"):
        alice.seal(bob.public_key, "offer", {"x": object()})
    with pytest.raises(ValueError):
        SignalCrypto(b"short")


def test_key_cache(alice: SignalCrypto, bob: SignalCrypto, carol: SignalCrypto) -> None:
    for _ in range(5):
        bob.open(alice.public_key, alice.seal(bob.public_key, "candidate", BODY))
    assert (alice.derivations, alice.cached_keys) == (1, 1)
    assert (bob.derivations, bob.cached_keys) == (1, 1)
    alice.seal(carol.public_key, "offer", BODY)
    assert (alice.derivations, alice.cached_keys) == (2, 2)
    small = SignalCrypto(raw_private(), max_cached_keys=1)
    small.seal(bob.public_key, "offer", BODY)
    small.seal(carol.public_key, "offer", BODY)
    small.seal(carol.public_key, "offer", BODY)
    assert (small.derivations, small.cached_keys) == (2, 1)
    # the cached key is the one both sides derive independently
    assert alice._aead(base64.b64decode(bob.public_key)) is alice._aead(base64.b64decode(bob.public_key))


def test_replay_memory_is_bounded() -> None:
    guard = ReplayGuard(window=120, max_per_sender=3, max_senders=2)
    for i in range(5):
        guard.check_and_remember("a", f"n{i}", ts=100.0 + i, now=105.0)
    assert len(guard) == 3
    with pytest.raises(SignalCryptoError):  # evicted id: below the sender's floor, so refused
        guard.check_and_remember("a", "n0", ts=100.0, now=105.0)
    guard.check_and_remember("a", "n9", ts=104.5, now=105.0)  # newer than the floor: fine
    guard.check_and_remember("b", "x", ts=104.0, now=105.0)
    guard.check_and_remember("c", "x", ts=104.0, now=105.0)  # evicts "a" (least recently active)
    assert len(guard._senders) == 2
    with pytest.raises(SignalCryptoError):  # a's boxes at or below its newest ts can no longer be checked
        guard.check_and_remember("a", "n1", ts=101.0, now=105.0)
    for i in range(10):  # entries leave once outside the window
        guard.check_and_remember("b", f"late{i}", ts=300.0 + i, now=310.0)
    assert len(guard._senders["b"].seen) == 3
