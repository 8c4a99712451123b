"""starling_proto.seal and coordinator.identity: sealed requests open only with the keys they name, for
the purpose and coordinator they were made for; replies only with their request's keys; challenges only
when ours and fresh; low-order keys never."""

from __future__ import annotations

import base64
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.identity import ChallengeError, Identity, new_identity_key
from starling_proto.keys import KeyFormatError, decode_public_key, is_low_order, public_key_b64
from starling_proto.seal import SealError, open_request, seal

SERVER = X25519PrivateKey.generate()
SERVER_PUB = public_key_b64(SERVER)


def flip(text: str, index: int = 5) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index % len(raw)] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_round_trip_and_reply() -> None:
    peer = X25519PrivateKey.generate()
    wire, reply = seal("enroll", [peer], SERVER_PUB, "ch-1", {"hostname": "secret-host"})
    opened = open_request("enroll", SERVER, wire)
    assert opened.payload == {"hostname": "secret-host"} and opened.public_keys == (public_key_b64(peer),)
    assert opened.challenge == "ch-1"
    assert reply.open(opened.reply.seal({"credential": "spc_x"})) == {"credential": "spc_x"}
    assert b"secret-host" not in base64.b64decode(wire["box"])
    assert b"spc_x" not in base64.b64decode(opened.reply.seal({"credential": "spc_x"})["box"])


def test_another_key_named_does_not_open() -> None:
    wire, _ = seal("enroll", [X25519PrivateKey.generate()], SERVER_PUB, "c", {})
    victim = public_key_b64(X25519PrivateKey.generate())
    with pytest.raises(SealError) as err:
        open_request("enroll", SERVER, {**wire, "public_key": victim})
    assert err.value.reason == "forged"


@pytest.mark.parametrize("field", ["box", "nonce"])
def test_tampering_is_refused(field: str) -> None:
    wire, _ = seal("enroll", [X25519PrivateKey.generate()], SERVER_PUB, "c", {"a": 1})
    with pytest.raises(SealError) as err:
        open_request("enroll", SERVER, {**wire, field: flip(wire[field])})
    assert err.value.reason == "forged"


def test_bound_to_challenge_purpose_and_coordinator() -> None:
    keys = [X25519PrivateKey.generate(), X25519PrivateKey.generate()]
    wire, _ = seal("rotate", keys, SERVER_PUB, "c", {})
    assert open_request("rotate", SERVER, wire).public_keys == tuple(public_key_b64(k) for k in keys)
    with pytest.raises(SealError):
        open_request("rotate", SERVER, {**wire, "challenge": "d"})
    with pytest.raises(SealError):
        open_request("rotate", X25519PrivateKey.generate(), wire)  # another coordinator
    one, _ = seal("enroll", keys[:1], SERVER_PUB, "c", {})
    with pytest.raises(SealError):  # an enrollment replayed as a rotation naming a second key
        open_request("rotate", SERVER, {**one, "new_public_key": public_key_b64(keys[1])})
    with pytest.raises(SealError):  # the keys swapped
        open_request(
            "rotate", SERVER, {**wire, "public_key": wire["new_public_key"], "new_public_key": wire["public_key"]}
        )


def test_rotation_without_the_new_private_key() -> None:
    old, new = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    wire, _ = seal("rotate", [old, X25519PrivateKey.generate()], SERVER_PUB, "c", {})
    with pytest.raises(SealError) as err:
        open_request("rotate", SERVER, {**wire, "new_public_key": public_key_b64(new)})
    assert err.value.reason == "forged"


def test_reply_of_another_request_does_not_open() -> None:
    peer = X25519PrivateKey.generate()
    wire1, reply1 = seal("enroll", [peer], SERVER_PUB, "c1", {})
    wire2, _ = seal("enroll", [peer], SERVER_PUB, "c2", {})
    other = open_request("enroll", SERVER, wire2).reply.seal({"credential": "x"})
    with pytest.raises(SealError):
        reply1.open(other)
    with pytest.raises(SealError):
        reply1.open({**open_request("enroll", SERVER, wire1).reply.seal({"x": 1}), "box": "AAAA"})


def test_malformed_requests() -> None:
    wire, _ = seal("enroll", [X25519PrivateKey.generate()], SERVER_PUB, "c", {})
    for bad in ({**wire, "v": 2}, {**wire, "nonce": "!!"}, {**wire, "nonce": "AAAA"}, {**wire, "challenge": ""}):
        with pytest.raises(SealError) as err:
            open_request("enroll", SERVER, bad)
        assert err.value.reason == "malformed"
    with pytest.raises(SealError) as err:
        open_request("enroll", SERVER, {**wire, "public_key": "short"})
    assert err.value.reason == "key"


def test_low_order_points() -> None:
    zero = base64.b64encode(bytes(32)).decode()
    assert is_low_order(bytes(32)) and not is_low_order(base64.b64decode(SERVER_PUB))
    with pytest.raises(KeyFormatError, match="low-order"):
        decode_public_key(zero)
    with pytest.raises(SealError) as err:
        seal("enroll", [X25519PrivateKey.generate()], zero, "c", {})
    assert err.value.reason == "key"
    wire, _ = seal("enroll", [X25519PrivateKey.generate()], SERVER_PUB, "c", {})
    with pytest.raises(SealError) as err:
        open_request("enroll", SERVER, {**wire, "public_key": zero})
    assert err.value.reason == "key"


def test_challenges() -> None:
    ident = Identity(new_identity_key(), challenge_ttl=30)
    token, expires = ident.issue(now=1000)
    nonce, exp = ident.check(token, now=1010)
    assert exp == expires == 1030 and len(nonce) == 32
    assert ident.issue(now=1000)[0] != token
    with pytest.raises(ChallengeError) as err:
        ident.check(token, now=1031)
    assert err.value.reason == "stale"
    with pytest.raises(ChallengeError) as err:
        Identity(new_identity_key()).check(token, now=1010)
    assert err.value.reason == "forged"
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    raw[20] ^= 1  # extend the expiry: the MAC no longer matches
    with pytest.raises(ChallengeError) as err:
        ident.check(base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="), now=1010)
    assert err.value.reason == "forged"
    for bad in ("", "!!!", "AAAA", token + "AA"):
        with pytest.raises(ChallengeError) as err:
            ident.check(bad, now=1010)
        assert err.value.reason == "malformed"
    assert ident.check(ident.issue()[0])[1] > time.time()
