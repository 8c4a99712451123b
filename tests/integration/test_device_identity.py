"""Device identity on a real coordinator: the peer-takeover chain of issue 14, step by step, is refused.

The attacker holds a valid reusable setup key of a low-trust `guest` group and knows the victim's public
key (public keys are in every neighbour's map). Every way of turning that into power over the victim is
tried and must fail, leave the victim's credential working, and leave an audit trail with the source
address. Then the freshness checks (replayed, stale, foreign challenges), low-order keys, and the peer
reports' limits (only peers in the reporter's map, no control or bidi characters).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from starling_proto.keys import public_key_b64
from starling_proto.seal import seal
from tests.fixtures.coordinator import CoordinatorProcess, running_coordinator
from tests.fixtures.enroll import challenge, new_private_key, sealed_enroll, sealed_rotate

LOW_ORDER = [
    bytes(32),  # zero
    b"\x01" + bytes(31),  # order 1
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # order 8
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # p - 1
    bytes.fromhex("ed" + "ff" * 30 + "ff"),  # p, high bit set (non-canonical)
]


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    # A short challenge lifetime (stale-challenge test) and brute-force limits out of the way: the attack
    # steps below fail on purpose, many times, from one address (tests/integration/test_auth_throttle.py
    # covers the limits).
    config = {"limits": {"challenge_ttl": 5, "auth_failures_burst": 0}}
    with running_coordinator(tmp_path_factory.mktemp("identity"), config) as proc:
        yield proc


class Scene:
    """A victim in `prod` (one-off key), a neighbour in `prod`, and an attacker's reusable `guest` key."""

    def __init__(self, coord: CoordinatorProcess) -> None:
        self.coord = coord
        with coord.client() as api:
            self.prod, self.guest = uniq("prod"), uniq("guest")
            for g in (self.prod, self.guest):
                api.post("/api/v1/groups", json={"name": g}).raise_for_status()
            api.post(
                "/api/v1/policies",
                json={"name": uniq("p"), "sources": {"groups": [self.prod]}, "destinations": {"groups": [self.prod]}},
            ).raise_for_status()
            prod_key = lambda: api.post(  # noqa: E731
                "/api/v1/setup-keys", json={"name": uniq("prod"), "auto_groups": [self.prod]}
            ).json()["key"]
            self.guest_key = api.post(
                "/api/v1/setup-keys", json={"name": uniq("guest"), "reusable": True, "auto_groups": [self.guest]}
            ).json()["key"]
            victim = sealed_enroll(coord.url, {"setup_key": prod_key(), "hostname": uniq("victim")})
            neighbour = sealed_enroll(coord.url, {"setup_key": prod_key(), "hostname": uniq("db")})
        assert victim.status_code == 200 and neighbour.status_code == 200
        self.victim_key = victim.private_key
        self.victim = victim.json()
        self.neighbour = neighbour.json()
        self.victim_public = victim.public_key

    def get(self, path: str, credential: str) -> httpx.Response:
        return httpx.get(self.coord.url + path, headers={"Authorization": f"Bearer {credential}"}, timeout=10)

    def post(self, path: str, credential: str, body: Any) -> httpx.Response:
        return httpx.post(
            self.coord.url + path, json=body, headers={"Authorization": f"Bearer {credential}"}, timeout=10
        )

    def victim_ok(self) -> None:
        r = self.get("/api/v1/peer/map", self.victim["credential"])
        assert r.status_code == 200, f"the victim lost its credential: {r.text}"
        assert r.json()["peer"]["public_key"] == self.victim_public

    def audit(self, action: str) -> list[dict[str, Any]]:
        with self.coord.client() as api:
            r = api.get("/api/v1/audit", params={"target_id": self.victim["peer"]["id"], "limit": 200})
        return [e for e in r.json()["items"] if e["action"] == action]


@pytest.fixture
def scene(coord: CoordinatorProcess) -> Scene:
    return Scene(coord)


def enroll_raw(coord: CoordinatorProcess, wire: dict[str, Any]) -> httpx.Response:
    return httpx.post(coord.url + "/api/v1/enroll", json=wire, timeout=10)


def test_takeover_chain_is_refused_at_every_step(scene: Scene, coord: CoordinatorProcess) -> None:
    attacker = new_private_key()
    # Step 1 as found: the unsealed enrollment body of the first wave with the victim's public key.
    old_style = {"setup_key": scene.guest_key, "public_key": scene.victim_public, "hostname": "evil"}
    r = enroll_raw(coord, old_style)
    assert r.status_code == 422, r.text
    # Step 1 sealed by the attacker, naming the victim's key: the box does not open with the victim's key.
    ch = challenge(coord.url)
    payload = {"setup_key": scene.guest_key, "hostname": "evil"}
    wire, _ = seal("enroll", [attacker], ch["coordinator_public_key"], ch["challenge"], payload)
    r = enroll_raw(coord, {**wire, "public_key": scene.victim_public})
    assert r.status_code == 401 and "proof of possession" in r.json()["message"], r.text
    # Step 2: the victim is not locked out; nothing about it changed.
    scene.victim_ok()
    refused = scene.audit("peer.login.refused")
    assert refused and refused[0]["after"] == {"source": "127.0.0.1", "reason": "forged"}
    assert refused[0]["actor"] == "source:127.0.0.1"
    assert scene.audit("peer.login") == []
    # Step 3: without the victim's credential the attacker's guesses read nothing.
    assert scene.get("/api/v1/peer/map", "spc_" + "A" * 43).status_code == 401
    assert scene.post("/api/v1/peer/signal-token", "spc_guess", None).status_code == 401
    # Step 4: enrolled legitimately as a guest, the attacker tries to move onto the victim's key, and to move
    # the victim onto a key the attacker holds: neither can be sealed without the victim's private key.
    mine = sealed_enroll(coord.url, {"setup_key": scene.guest_key, "hostname": "guest"}, private_key=attacker)
    assert mine.status_code == 200 and mine.json()["login"] is False
    other = new_private_key()
    ch = challenge(coord.url)
    wire, _ = seal("rotate", [attacker, other], ch["coordinator_public_key"], ch["challenge"], {"phase": "commit"})
    r = scene.post("/api/v1/peer/key", mine.json()["credential"], {**wire, "new_public_key": scene.victim_public})
    assert r.status_code == 401, r.text
    r = sealed_rotate(coord.url, mine.json()["credential"], scene.victim_key, other)  # the victim's key, not ours
    assert r.status_code == 409, r.text
    ch = challenge(coord.url)
    wire, _ = seal("rotate", [attacker, other], ch["coordinator_public_key"], ch["challenge"], {"phase": "commit"})
    r = scene.post("/api/v1/peer/key", scene.victim["credential"] + "x", {**wire, "public_key": scene.victim_public})
    assert r.status_code == 401
    scene.victim_ok()
    with coord.client() as api:
        victim = api.get(f"/api/v1/peers/{scene.victim['peer']['id']}").json()
    assert victim["public_key"] == scene.victim_public and victim["groups"] == [scene.prod]
    # The neighbour's map still points the victim's mesh IP at the victim's key.
    peers = scene.get("/api/v1/peer/map", scene.neighbour["credential"]).json()["peers"]
    assert [(p["mesh_ip"], p["public_key"]) for p in peers] == [(scene.victim["peer"]["mesh_ip"], scene.victim_public)]


def test_the_key_holder_logs_in_and_a_setup_key_adds_nothing(scene: Scene, coord: CoordinatorProcess) -> None:
    # The victim itself (its private key) logs in without any setup key; a revoked or foreign setup key in
    # the payload changes nothing: the proof is the authority, the peer keeps its groups.
    again = sealed_enroll(
        coord.url, {"setup_key": scene.guest_key, "hostname": "victim-again"}, private_key=scene.victim_key
    )
    assert again.status_code == 200 and again.json()["login"] is True
    assert again.json()["peer"]["groups"] == [scene.prod] and again.json()["peer"]["id"] == scene.victim["peer"]["id"]
    assert scene.get("/api/v1/peer/map", scene.victim["credential"]).status_code == 401  # replaced by the new one
    assert scene.get("/api/v1/peer/map", again.json()["credential"]).status_code == 200
    login = scene.audit("peer.login")
    assert login and login[0]["after"]["source"] == "127.0.0.1" and login[0]["actor"].startswith("peer:")
    # A new key without a setup key is not enrolled.
    r = sealed_enroll(coord.url, {"hostname": "nobody"})
    assert r.status_code == 403 and "setup key is required" in r.json()["message"]


def test_replayed_stale_and_foreign_challenges_are_refused(scene: Scene, coord: CoordinatorProcess) -> None:
    ch = challenge(coord.url)
    wire, reply = seal("enroll", [scene.victim_key], ch["coordinator_public_key"], ch["challenge"], {"hostname": "v"})
    first = enroll_raw(coord, wire)
    assert first.status_code == 200
    credential = reply.open(first.json())["credential"]
    replay = enroll_raw(coord, wire)
    assert replay.status_code == 401 and "already used" in replay.json()["message"], replay.text
    assert scene.get("/api/v1/peer/map", credential).status_code == 200  # the replay changed nothing
    # A challenge from another coordinator (another identity key): its MAC does not verify here.
    with running_coordinator(coord.workdir.parent / uniq("other")) as other:
        foreign = challenge(other.url)
    wire, _ = seal("enroll", [scene.victim_key], ch["coordinator_public_key"], foreign["challenge"], {"hostname": "v"})
    r = enroll_raw(coord, wire)
    assert r.status_code == 401 and "not issued by this coordinator" in r.json()["message"], r.text
    # Sealed to another coordinator's key with our challenge: does not open.
    wire, _ = seal("enroll", [scene.victim_key], foreign["coordinator_public_key"], ch["challenge"], {"hostname": "v"})
    assert enroll_raw(coord, wire).status_code == 401
    # A stale challenge (this coordinator: challenge_ttl 5 s).
    stale = challenge(coord.url)
    time.sleep(max(0.0, stale["expires_at"] - time.time()) + 1.1)
    wire, _ = seal("enroll", [scene.victim_key], stale["coordinator_public_key"], stale["challenge"], {"hostname": "v"})
    r = enroll_raw(coord, wire)
    assert r.status_code == 401 and "expired" in r.json()["message"], r.text
    assert scene.get("/api/v1/peer/map", credential).status_code == 200
    reasons = [e["after"]["reason"] for e in scene.audit("peer.login.refused")]
    assert sorted(reasons) == ["forged", "forged", "stale"], reasons  # foreign challenge, foreign key, stale


def test_rotation_needs_both_private_keys(scene: Scene, coord: CoordinatorProcess) -> None:
    credential = scene.victim["credential"]
    new = new_private_key()
    # Without the new private key: sealed with the old key and some other key, naming `new`'s public key.
    ch = challenge(coord.url)
    wire, _ = seal("rotate", [scene.victim_key, new_private_key()], ch["coordinator_public_key"], ch["challenge"], {})
    r = scene.post("/api/v1/peer/key", credential, {**wire, "new_public_key": public_key_b64(new)})
    assert r.status_code == 401, r.text
    # Without the old private key: sealed with another key naming the victim's current key.
    ch = challenge(coord.url)
    wire, _ = seal("rotate", [new_private_key(), new], ch["coordinator_public_key"], ch["challenge"], {})
    r = scene.post("/api/v1/peer/key", credential, {**wire, "public_key": scene.victim_public})
    assert r.status_code == 401, r.text
    # Not sealed at all: the first wave's body.
    r = scene.post("/api/v1/peer/key", credential, {"public_key": public_key_b64(new), "previous_public_key": "x"})
    assert r.status_code == 422
    scene.victim_ok()
    assert [e["after"]["reason"] for e in scene.audit("peer.key.refused")] == ["forged", "forged"]
    # With both: accepted, and a replay of that very request is refused.
    ch = challenge(coord.url)
    wire, _ = seal(
        "rotate", [scene.victim_key, new], ch["coordinator_public_key"], ch["challenge"], {"phase": "prepare"}
    )
    assert scene.post("/api/v1/peer/key", credential, wire).status_code == 200
    again = scene.post("/api/v1/peer/key", credential, wire)
    assert again.status_code == 401 and "already used" in again.json()["message"]
    r = sealed_rotate(coord.url, credential, scene.victim_key, new, phase="commit")
    assert r.status_code == 200 and r.json()["public_key"] == public_key_b64(new)


@pytest.mark.parametrize("raw", LOW_ORDER, ids=[f"low-order-{i}" for i in range(len(LOW_ORDER))])
def test_low_order_keys_are_refused(raw: bytes, scene: Scene, coord: CoordinatorProcess) -> None:
    bad = base64.b64encode(raw).decode()
    ch = challenge(coord.url)
    wire, _ = seal("enroll", [new_private_key()], ch["coordinator_public_key"], ch["challenge"], {"hostname": "x"})
    r = enroll_raw(coord, {**wire, "public_key": bad})
    assert r.status_code == 422 and r.json()["field"] == "public_key" and "low-order" in r.json()["message"], r.text
    ch = challenge(coord.url)
    wire, _ = seal("rotate", [scene.victim_key, new_private_key()], ch["coordinator_public_key"], ch["challenge"], {})
    r = scene.post("/api/v1/peer/key", scene.victim["credential"], {**wire, "new_public_key": bad})
    assert r.status_code == 422 and r.json()["field"] == "new_public_key", r.text
    scene.victim_ok()


def test_reports_only_about_the_map_and_only_clean_text(scene: Scene, coord: CoordinatorProcess) -> None:
    credential = scene.victim["credential"]
    neighbour = scene.neighbour["peer"]["id"]
    outsider = sealed_enroll(coord.url, {"setup_key": scene.guest_key, "hostname": "guest"}).json()["peer"]["id"]
    state = {"peer_id": outsider, "path": "direct"}
    r = scene.post("/api/v1/peer/state", credential, {"connections": [state]})
    assert r.status_code == 422 and outsider in r.json()["message"], r.text
    r = scene.post("/api/v1/peer/state", credential, {"connections": [{"peer_id": "no-such-peer", "path": "direct"}]})
    assert r.status_code == 422
    with coord.client() as api:
        assert api.get(f"/api/v1/peers/{scene.victim['peer']['id']}").json()["connections"] == []
    r = scene.post("/api/v1/peer/state", credential, {"connections": [{"peer_id": neighbour, "path": "direct"}]})
    assert r.status_code == 204, r.text
    with coord.client() as api:
        assert [c["peer_id"] for c in api.get(f"/api/v1/peers/{scene.victim['peer']['id']}").json()["connections"]] == [
            neighbour
        ]
    for evil in ("host\x00name", "line\nbreak", "right\u202eleft", "esc\x1b[31m", "iso\u2066late", "x" * 254):
        r = sealed_enroll(coord.url, {"hostname": evil}, private_key=scene.victim_key)
        assert r.status_code == 422 and r.json()["field"] == "hostname", (evil, r.text)
    for field, value in (("os", "Linux\u202e"), ("os", "x" * 129), ("agent_version", "1.0\x7f")):
        r = sealed_enroll(coord.url, {"hostname": "ok", field: value}, private_key=scene.victim_key)
        assert r.status_code == 422 and r.json()["field"] == field, (field, r.text)
    r = scene.post("/api/v1/peer/events", credential, {"kind": "firewall.drift", "message": "a\u202eb"})
    assert r.status_code == 422
    scene.victim_ok()  # none of the refused logins replaced the credential


def test_challenge_endpoint_is_not_cached_and_names_the_key(coord: CoordinatorProcess, tmp_path: Path) -> None:
    r = httpx.post(coord.url + "/api/v1/challenge", timeout=10)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["algorithm"] == "starling-seal-v1" and len(base64.b64decode(body["coordinator_public_key"])) == 32
    assert body["expires_at"] - time.time() <= 6
    assert httpx.post(coord.url + "/api/v1/challenge", timeout=10).json()["challenge"] != body["challenge"]


def test_a_full_mesh_prefix_is_a_clear_409(tmp_path: Path) -> None:
    """/30: two host addresses. The third enrollment is refused with 409 (not a 500) and changes nothing."""
    with running_coordinator(tmp_path / "small", {"mesh": {"prefix": "100.64.0.0/30"}}) as small:
        with small.client() as api:
            key = api.post("/api/v1/setup-keys", json={"name": "k", "reusable": True}).json()["key"]
        assert [sealed_enroll(small.url, {"setup_key": key, "hostname": f"h{i}"}).status_code for i in (1, 2)] == [
            200,
            200,
        ]
        r = sealed_enroll(small.url, {"setup_key": key, "hostname": "h3"})
        assert r.status_code == 409 and "is full" in r.json()["message"], r.text
        with small.client() as api:
            assert len(api.get("/api/v1/peers").json()["items"]) == 2
            assert api.get("/api/v1/setup-keys").json()["items"][0]["used_count"] == 2
