"""PeerConnection after a change under a working direct path (roaming): stale WireGuard readings do not
point the peer back at an address it left, and the path proves itself (handshake or data) or is lost."""

from __future__ import annotations

import time

import pytest

from agent import peers
from agent.peers import ENDPOINT_SETTLE, PATH_VERIFY, VERIFY_KICK, Candidate, PathState, PeerConnection

KEY = "A" * 43 + "="
OLD, NEW = "198.18.7.1:51820", "198.18.8.1:51820"


class Clock:
    """The monotonic clock PeerConnection reads, under the test's control."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(peers.time, "monotonic", lambda: self.now)


def direct(clock: Clock) -> tuple[PeerConnection, float]:
    """A connection with a working direct path to OLD (handshake a second ago)."""
    conn = PeerConnection("p1", KEY, "n1", "100.64.0.1")
    assert conn.remote_candidates([Candidate(OLD, "srflx")], []) == OLD
    wall = time.time()
    assert conn.observe(wall - 1, 100, 100, OLD, wall) is None
    assert conn.state == PathState.DIRECT
    return conn, wall


def test_a_reading_from_before_our_change_does_not_undo_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    conn, wall = direct(clock)
    clock.now += 30
    taken = clock.now  # the watchdog reads WireGuard here ...
    conn.endpoint, conn.endpoint_set_at = NEW, clock.now + 0.01  # ... the peer moves meanwhile
    clock.now += 0.02
    conn.observe(wall - 1, 200, 200, OLD, wall, taken=taken)  # the reading still says OLD
    assert conn.endpoint == NEW
    # Once our change has settled, WireGuard's endpoint (where the peer really is) wins again.
    clock.now += ENDPOINT_SETTLE
    conn.observe(wall - 1, 300, 300, "198.18.9.1:40000", wall, taken=clock.now)
    assert conn.endpoint == "198.18.9.1:40000"


def test_an_unproven_path_is_kicked_then_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    conn, wall = direct(clock)
    conn.reverify(wall + 1, clock.now, controlling=True)
    assert conn.verify_since
    assert not conn.kick_due(clock.now)
    # The old handshake is still "fresh" for WireGuard, but no newer one and no data arrive.
    for _ in range(3):
        clock.now += VERIFY_KICK / 2
        assert conn.observe(wall - 1, 100, 100, OLD, wall + 1, taken=clock.now) is None
        assert conn.state == PathState.DIRECT
    assert conn.kick_due(clock.now) and not conn.kick_due(clock.now)  # once per VERIFY_KICK
    clock.now += PATH_VERIFY
    changes = conn.path_changes
    conn.observe(wall - 1, 100, 100, OLD, wall + 2, taken=clock.now)
    # Lost, and straight on to the candidates (back to the only one: a fresh attempt).
    assert conn.state in (PathState.LOST, PathState.CONNECTING) and conn.path_changes > changes
    assert conn.last_error is not None and "after the path changed" in conn.last_error
    assert not conn.verify_since and not conn.kick_due(clock.now)


def test_the_controlled_side_kicks_later(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    conn, wall = direct(clock)
    conn.reverify(wall + 1, clock.now, controlling=False)
    clock.now += VERIFY_KICK
    assert not conn.kick_due(clock.now)
    clock.now += VERIFY_KICK / 2
    assert conn.kick_due(clock.now)


def test_data_from_the_peer_is_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    conn, wall = direct(clock)
    conn.reverify(wall + 1, clock.now, controlling=True)
    clock.now += 0.5
    conn.observe(wall - 1, 100, 100, OLD, wall + 1, taken=clock.now)  # baseline
    assert conn.verify_since
    clock.now += 0.5
    conn.observe(wall - 1, 180, 100, OLD, wall + 1, taken=clock.now)  # the peer's packets arrive
    assert not conn.verify_since
    clock.now += PATH_VERIFY * 2
    conn.observe(wall - 1, 180, 100, OLD, wall + 1, taken=clock.now)
    assert conn.state == PathState.DIRECT


def test_a_new_handshake_is_proof_and_a_reading_from_before_the_change_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    conn, wall = direct(clock)
    before = clock.now - 0.1
    conn.reverify(wall + 1, clock.now, controlling=True)
    conn.observe(wall - 1, 500, 100, OLD, wall + 1, taken=before)  # more rx, but read before the change
    assert conn.verify_since
    clock.now += 1
    conn.observe(wall + 2, 500, 100, OLD, wall + 3, taken=clock.now)
    assert not conn.verify_since and conn.state == PathState.DIRECT


def test_only_a_direct_path_is_reverified(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    conn, wall = direct(clock)
    conn.proxied = True  # the fallback watches proxied paths (PROXY_SILENCE)
    conn.reverify(wall + 1, clock.now, controlling=True)
    assert not conn.verify_since
    idle = PeerConnection("p2", KEY, "n2", "100.64.0.2")
    idle.reverify(wall, clock.now, controlling=True)
    assert not idle.verify_since
