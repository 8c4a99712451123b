"""Peer-facing API against a real coordinator: maps, live stream deltas, credentials, tokens, reports."""

from __future__ import annotations

import base64
import hashlib
import hmac
import queue
import time
import uuid
from typing import Any

import httpx
import pytest

from coordinator.signing import TokenError, TokenVerifier
from starling_proto.keys import public_key_b64
from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.enroll import new_private_key, sealed_enroll, sealed_rotate
from tests.fixtures.sse import SseReader


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Mesh:
    """dev -> db (tcp/5432) and an unrelated ci group, each with one enrolled peer."""

    def __init__(self, coord: CoordinatorProcess) -> None:
        self.coord = coord
        self.api = coord.client()
        self.groups = {g: uniq(g) for g in ("dev", "db", "ci")}
        for name in self.groups.values():
            assert self.api.post("/api/v1/groups", json={"name": name}).status_code == 201
        self.policy = self.api.post(
            "/api/v1/policies",
            json={
                "name": uniq("dev-db"),
                "protocol": "tcp",
                "ports": [5432],
                "sources": {"groups": [self.groups["dev"]]},
                "destinations": {"groups": [self.groups["db"]]},
            },
        ).json()
        self.peers = {role: self.enroll(role) for role in ("dev", "db", "ci")}

    def enroll(self, role: str) -> dict[str, Any]:
        key = self.api.post("/api/v1/setup-keys", json={"name": uniq("k"), "auto_groups": [self.groups[role]]}).json()
        r = sealed_enroll(self.coord.url, {"setup_key": key["key"], "hostname": uniq(role)})
        assert r.status_code == 200, r.text
        return {**r.json(), "private_key": r.private_key}

    def peer_client(self, role: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.coord.url, timeout=10, headers={"Authorization": f"Bearer {self.peers[role]['credential']}"}
        )

    def stream(self, role: str) -> SseReader:
        return SseReader(self.coord.url + "/api/v1/peer/stream", self.peers[role]["credential"])


@pytest.fixture
def mesh(coordinator: CoordinatorProcess) -> Mesh:
    return Mesh(coordinator)


def peer_names(doc: dict[str, Any]) -> set[str]:
    return {p["name"] for p in doc["peers"]}


def test_map_contains_exactly_what_policies_allow(mesh: Mesh) -> None:
    names = {role: p["peer"]["name"] for role, p in mesh.peers.items()}
    with mesh.peer_client("dev") as dev, mesh.peer_client("db") as db, mesh.peer_client("ci") as ci:
        dev_map, db_map, ci_map = (c.get("/api/v1/peer/map").json() for c in (dev, db, ci))
    assert names["db"] in peer_names(dev_map) and names["ci"] not in peer_names(dev_map)
    assert names["dev"] in peer_names(db_map)
    assert not {names["dev"], names["db"]} & peer_names(ci_map)
    rule = next(r for r in db_map["firewall"]["rules"] if r["policy_id"] == mesh.policy["id"])
    assert (rule["direction"], rule["protocol"], rule["ports"]) == ("in", "tcp", [[5432, 5432]])
    assert mesh.peers["dev"]["peer"]["mesh_ip"] in db_map["firewall"]["sets"][rule["peer_set"]]
    assert db_map["firewall"]["default_action"] == "drop"
    assert db_map["peer"]["mesh_ip"] == mesh.peers["db"]["peer"]["mesh_ip"]
    entry = next(p for p in dev_map["peers"] if p["name"] == names["db"])
    assert entry["allowed_ips"] == [mesh.peers["db"]["peer"]["mesh_ip"] + "/32"]
    assert entry["public_key"] == mesh.peers["db"]["peer"]["public_key"]


def test_turn_credentials_follow_the_coturn_rest_scheme(mesh: Mesh) -> None:
    secret = (mesh.coord.workdir / "state" / "secrets" / "turn_secret").read_text().strip()
    with mesh.peer_client("dev") as dev:
        relays = dev.get("/api/v1/peer/map").json()["relays"]
    (relay,) = relays
    expiry, name = relay["username"].split(":", 1)
    assert name == mesh.peers["dev"]["peer"]["name"]
    assert int(expiry) - time.time() >= 600 / 2 - 2  # at least half the TTL left
    expected = base64.b64encode(hmac.new(secret.encode(), relay["username"].encode(), hashlib.sha1).digest())
    assert relay["password"] == expected.decode()
    with mesh.coord.client() as api:
        admin_view = api.get(f"/api/v1/peers/{mesh.peers['dev']['peer']['id']}/map").json()
    assert admin_view["relays"][0]["password"] == "***"


def test_peer_credentials_are_scoped_to_the_peer_api(mesh: Mesh) -> None:
    with mesh.peer_client("dev") as dev:
        assert dev.get("/api/v1/peers").status_code == 401
        assert dev.post("/api/v1/groups", json={"name": uniq("x")}).status_code == 401
    with mesh.coord.client() as api:
        assert api.get("/api/v1/peer/map").status_code == 401
    assert httpx.get(mesh.coord.url + "/api/v1/peer/map").status_code == 401


def test_signal_token_verifies_offline_and_forgeries_fail(mesh: Mesh) -> None:
    public = httpx.get(mesh.coord.url + "/api/v1/signing-key").json()["public_key"]
    with mesh.peer_client("dev") as dev:
        issued = dev.post("/api/v1/peer/signal-token").json()
    verifier = TokenVerifier(public)
    claims = verifier.verify(issued["token"], audience="signal")
    assert claims["sub"] == mesh.peers["dev"]["peer"]["public_key"]
    assert claims["exp"] == issued["expires_at"]
    head, body, sig = issued["token"].split(".")
    forged_body = (
        base64.urlsafe_b64encode(base64.urlsafe_b64decode(body + "==").replace(b'"sub":"', b'"sub":"X'))
        .rstrip(b"=")
        .decode()
    )
    for bad in (f"{head}.{forged_body}.{sig}", issued["token"] + "x", "v1.abc", "garbage"):
        with pytest.raises(TokenError):
            verifier.verify(bad, audience="signal")
    with pytest.raises(TokenError, match="audience"):
        verifier.verify(issued["token"], audience="other")
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(issued["token"], audience="signal", now=issued["expires_at"] + 60)


def test_state_report_is_stored_validated_and_rate_limited(mesh: Mesh) -> None:
    db_id = mesh.peers["db"]["peer"]["id"]
    report = {
        "connections": [
            {
                "peer_id": db_id,
                "path": "direct",
                "endpoint": "198.18.1.2:51820",
                "latency_ms": 1.5,
                "last_handshake": "2026-01-01T00:00:00Z",
                "rx_bytes": 10,
            }
        ]
    }
    with mesh.peer_client("dev") as dev:
        assert (
            dev.post("/api/v1/peer/state", json={"connections": [{"peer_id": db_id, "path": "teleport"}]}).status_code
            == 422
        )
        assert dev.post("/api/v1/peer/state", json=report).status_code == 204
        assert dev.post("/api/v1/peer/state", json=report).status_code == 429
    with mesh.coord.client() as api:
        peer = api.get(f"/api/v1/peers/{mesh.peers['dev']['peer']['id']}").json()
    assert peer["connections"][0]["path"] == "direct" and peer["connections_reported_at"]


def test_stream_sends_map_then_deltas_and_coalesces(mesh: Mesh) -> None:
    reader = mesh.stream("db")
    try:
        first = reader.next()
        assert first.event == "map"
        doc = first.json()
        assert mesh.peers["dev"]["peer"]["name"] in peer_names(doc)
        with mesh.coord.client() as api:
            assert api.get(f"/api/v1/peers/{mesh.peers['db']['peer']['id']}").json()["connected"] is True
            # A new dev peer joins: db learns it in a delta (peer entry + firewall set update).
            started = time.monotonic()
            newcomer = mesh.enroll("dev")
            delta = reader.next()
            latency = time.monotonic() - started
            assert delta.event == "delta" and latency < 2
            body = delta.json()
            assert body["base_serial"] == doc["serial"] and body["serial"] > doc["serial"]
            assert [p["name"] for p in body["peers_upsert"]] == [newcomer["peer"]["name"]]
            assert newcomer["peer"]["mesh_ip"] in next(iter(body["sets_replace"].values()))
            # Disabling the policy removes both dev peers and the rule in one delta.
            api.patch(f"/api/v1/policies/{mesh.policy['id']}", json={"enabled": False})
            gone = reader.next().json()
            assert set(gone["peers_remove"]) == {mesh.peers["dev"]["peer"]["id"], newcomer["peer"]["id"]}
            assert gone["rules"] == [] and gone["sets_remove"]
            # A change that does not concern db sends nothing to it.
            api.post("/api/v1/groups", json={"name": uniq("unrelated")})
            with pytest.raises(queue.Empty):
                reader.next(timeout=0.5)
            # Deleting the peer ends its stream with a reason.
            api.delete(f"/api/v1/peers/{mesh.peers['db']['peer']['id']}")
            assert reader.next().event == "deleted"
    finally:
        reader.close()


def test_new_stream_replaces_the_old_one(mesh: Mesh) -> None:
    first = mesh.stream("ci")
    try:
        assert first.next().event == "map"
        second = mesh.stream("ci")
        try:
            assert second.next().event == "map"
            assert first.next().event == "closed"
        finally:
            second.close()
    finally:
        first.close()


def test_agent_events_land_in_the_audit_log(mesh: Mesh) -> None:
    with mesh.peer_client("dev") as dev:
        r = dev.post("/api/v1/peer/events", json={"kind": "firewall.drift", "message": "table flushed; restored"})
        assert r.status_code == 204, r.text
        assert dev.post("/api/v1/peer/events", json={"kind": "rm -rf", "message": "x"}).status_code == 422
    with mesh.coord.client() as api:
        events = api.get(
            "/api/v1/audit", params={"action": "peer.firewall.drift", "target_id": mesh.peers["dev"]["peer"]["id"]}
        ).json()["items"]
    assert events[0]["actor"] == "peer:" + mesh.peers["dev"]["peer"]["name"]
    assert events[0]["after"] == {"message": "table flushed; restored"}


def test_both_ends_of_every_path_get_matching_rules(mesh: Mesh) -> None:
    with mesh.coord.client() as api:
        report = api.get("/api/v1/maps/consistency").json()
    assert report["peers_checked"] >= 3 and report["violations"] == []


def test_key_rotation_is_checked_audited_and_pushed_to_both_ends(mesh: Mesh) -> None:
    dev = mesh.peers["dev"]["peer"]
    old_private, new_private = mesh.peers["dev"]["private_key"], new_private_key()
    old, new = dev["public_key"], public_key_b64(new_private)
    credential = mesh.peers["dev"]["credential"]
    db_reader, dev_reader = mesh.stream("db"), mesh.stream("dev")
    try:
        assert db_reader.next().event == "map" and dev_reader.next().event == "map"

        def change(current: Any = old_private, new_key: Any = new_private, **body: Any) -> httpx.Response:
            return sealed_rotate(mesh.coord.url, credential, current, new_key, **body)

        assert change(phase="switch").status_code == 422
        stale = change(current=new_private_key())  # a key the coordinator does not hold for this peer
        assert stale.status_code == 409 and stale.json()["field"] == "public_key"
        taken = change(new_key=mesh.peers["db"]["private_key"])
        assert taken.status_code == 409 and "another peer" in taken.json()["message"]
        assert change(phase="prepare", version=7, source="vault").status_code == 200
        with pytest.raises(queue.Empty):  # prepare pushes nothing
            db_reader.next(timeout=0.5)
        r = change(phase="commit", version=7, source="vault")
        assert r.status_code == 200 and r.json()["public_key"] == new
        assert change(phase="commit").status_code == 200  # idempotent
        # The neighbour learns the new key, and the peer's own map says which key the coordinator holds.
        upsert = db_reader.next().json()["peers_upsert"]
        assert [(p["id"], p["public_key"]) for p in upsert] == [(dev["id"], new)]
        assert dev_reader.next().json()["peer"]["public_key"] == new
        with pytest.raises(queue.Empty):  # the idempotent repeat sent nothing
            db_reader.next(timeout=0.5)
    finally:
        db_reader.close()
        dev_reader.close()
    with mesh.coord.client() as api:
        events = api.get("/api/v1/audit", params={"target_id": dev["id"], "limit": 10}).json()["items"]
    actions = [e["action"] for e in events]
    assert actions.count("peer.key.rotate") == 1 and actions.count("peer.key.prepare") == 1, actions
    rotate = next(e for e in events if e["action"] == "peer.key.rotate")
    assert rotate["before"] == {"public_key": old} and rotate["after"]["version"] == 7
    assert rotate["actor"] == "peer:" + dev["name"]
