"""Peer latency from WireGuard handshakes (agent/latency.py): packet pairing by index, both roles,
attribution to a peer, and what status, metrics and the inventory show. The BPF filter and the
kernel timestamps are exercised on real WireGuard in tests/integration/test_netcheck.py."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from agent.cli import format_status
from agent.latency import HandshakeLatency, HandshakeTimer, Sample, attribute, bpf_program
from agent.metrics import AgentCollector
from agent.peers import PeerConnection

WG = 51820
US, PEER = "198.18.1.2", "198.19.0.12"


def _packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    return ip + udp


def initiation(sender: bytes) -> bytes:
    return b"\x01\0\0\0" + sender + os.urandom(140)


def response(sender: bytes, receiver: bytes) -> bytes:
    return b"\x02\0\0\0" + sender + receiver + os.urandom(80)


def transport(receiver: bytes, counter: int, size: int = 32) -> bytes:
    return b"\x04\0\0\0" + receiver + struct.pack("<Q", counter) + os.urandom(size - 16)


def test_initiator_round_trip() -> None:
    timer = HandshakeTimer(lambda: WG)
    mine, theirs = b"AAAA", b"BBBB"
    assert timer.packet(_packet(US, WG, PEER, 40000, initiation(mine)), True, 100.0) is None
    # A response to some other initiation, and one arriving on another port, do not match.
    assert timer.packet(_packet(PEER, 40000, US, WG, response(theirs, b"ZZZZ")), False, 100.01) is None
    assert timer.packet(_packet(PEER, 40000, US, 9999, response(theirs, mine)), False, 100.01) is None
    sample = timer.packet(_packet(PEER, 40000, US, WG, response(theirs, mine)), False, 100.0125)
    assert sample == Sample(f"{PEER}:40000", 12.5, "initiator", 100.0125)
    # Matched once only (a duplicate response is not a second sample).
    assert timer.packet(_packet(PEER, 40000, US, WG, response(theirs, mine)), False, 100.02) is None


def test_responder_round_trip_uses_the_first_packet_of_the_new_session() -> None:
    timer = HandshakeTimer(lambda: WG)
    mine = b"CCCC"
    # The peer's initiation comes in (ignored), we answer from the WireGuard port.
    assert timer.packet(_packet(PEER, 40000, US, WG, initiation(b"DDDD")), False, 200.0) is None
    assert timer.packet(_packet(US, WG, PEER, 40000, response(mine, b"DDDD")), True, 200.001) is None
    # A later data packet (counter 1) is not the answer; counter 0 on our index is.
    assert timer.packet(_packet(PEER, 40000, US, WG, transport(mine, 1)), False, 200.003) is None
    sample = timer.packet(_packet(PEER, 40000, US, WG, transport(mine, 0, 64)), False, 200.004)
    assert sample is not None and sample.role == "responder" and abs(sample.rtt_ms - 3.0) < 1e-6


def test_other_traffic_is_ignored() -> None:
    timer = HandshakeTimer(lambda: WG)
    # Not from our WireGuard port, wrong sizes, or STUN (first byte 0) from the SNAT'd probe socket.
    assert timer.packet(_packet(US, 5555, PEER, 40000, initiation(b"EEEE")), True, 1.0) is None
    assert timer.packet(_packet(PEER, 40000, US, WG, response(b"x" * 4, b"EEEE")), False, 1.001) is None
    assert timer.packet(_packet(US, WG, PEER, 40000, initiation(b"FFFF")[:100]), True, 1.0) is None
    assert timer.packet(_packet(PEER, 40000, US, WG, response(b"GGGG", b"FFFF")), False, 1.001) is None
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    assert timer.packet(_packet(US, WG, PEER, 3478, stun), True, 1.0) is None
    assert timer.packet(b"\x60" + b"\0" * 60, False, 1.0) is None  # IPv6
    # An answer after the pending entry's lifetime is not a round trip.
    timer.packet(_packet(US, WG, PEER, 40000, initiation(b"HHHH")), True, 10.0)
    assert timer.packet(_packet(PEER, 40000, US, WG, response(b"IIII", b"HHHH")), False, 25.0) is None


def test_bpf_program_jumps_stay_inside_the_program() -> None:
    prog = bpf_program()
    assert prog[-2] == (0x06, 0, 0, 128) and prog[-1] == (0x06, 0, 0, 0)
    for i, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP
            assert 0 <= i + 1 + jt < len(prog) and 0 <= i + 1 + jf < len(prog)


def _conn(name: str, endpoint: str | None, wg_endpoint: str | None = None) -> PeerConnection:
    conn = PeerConnection(f"id-{name}", f"key-{name}", name, "100.64.0.9")
    conn.endpoint, conn.wg_endpoint = endpoint, wg_endpoint
    return conn


def test_samples_go_to_the_peer_whose_endpoint_matches() -> None:
    a, b = _conn("a", f"{PEER}:40000"), _conn("b", "127.0.0.1:41000", wg_endpoint="127.0.0.1:41000")
    roamed = _conn("c", "198.19.0.50:51820", wg_endpoint="198.19.0.51:1234")
    assert attribute(Sample("127.0.0.1:41000", 1.0, "initiator", 1.0), [a, b, roamed]) is b
    assert attribute(Sample("198.19.0.51:1234", 1.0, "initiator", 1.0), [a, b, roamed]) is roamed
    assert attribute(Sample("198.19.0.99:1", 1.0, "initiator", 1.0), [a, b, roamed]) is None
    latency = HandshakeLatency(lambda: WG, lambda: [a, b])
    latency._record(Sample(f"{PEER}:40000", 7.25, "responder", 50.0), retries=0)
    latency._record(Sample(f"{PEER}:40000", 9.0, "initiator", 40.0), retries=0)  # older: not taken
    latency._record(Sample("198.19.0.99:1", 1.0, "initiator", 60.0), retries=0)
    assert (a.latency_ms, a.latency_at) == (7.25, 50.0)
    assert b.latency_ms is None
    assert latency.status() == {
        "method": "wireguard-handshake",
        "active": False,
        "error": None,
        "samples": 2,
        "unattributed": 1,
    }


def _status(peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "me",
        "mesh_ip": "100.64.0.1",
        "interface": "wt0",
        "backend": "userspace",
        "management": {"connected": True, "url": "http://c", "last_error": None},
        "signal": {"connected": True, "last_error": None},
        "map_serial": 3,
        "firewall": {"state": "enforcing", "rules": 7, "elements": 2},
        "nat": {"reflexive": {"address": None}, "stun_servers": []},
        "routing": {"routes": [], "failovers": 0, "forwarding": False},
        "latency": {"method": "wireguard-handshake", "active": True, "error": None, "samples": 1, "unattributed": 0},
        "peers": peers,
    }


def test_status_and_metrics_show_latency() -> None:
    conn = _conn("db", f"{PEER}:40000")
    conn.latency_ms, conn.latency_at = 12.345, time.time() - 30
    other = _conn("web", None)
    peers = [dict(conn.status()), dict(other.status())]
    text = format_status(_status(peers), detail=True)
    assert "latency:        12.3 ms (WireGuard handshake round trip, 30s ago)" in text
    assert "latency:        - (no handshake measured yet)" in text
    broken = _status(peers)
    broken["latency"] = {**broken["latency"], "active": False, "error": "cannot read WireGuard handshakes (EPERM)"}
    assert "Latency:     NOT MEASURED: cannot read WireGuard handshakes (EPERM)" in format_status(broken, detail=False)
    families = {m.name: m for m in AgentCollector(lambda: _status(peers)).collect()}  # type: ignore[arg-type,return-value]
    gauge = families["starling_agent_peer_latency_seconds"]
    assert [(s.labels, s.value) for s in gauge.samples] == [({"peer": "db"}, 0.012345)]


def test_inventory_hostvar_names_the_peers_with_a_latency() -> None:
    from tests.ansible import collection_loader

    collection_loader.install()
    from ansible_collections.starling.mesh.plugins.inventory import coordinator as plugin

    peer = {
        "id": "1",
        "name": "web-1",
        "connections": [
            {"peer_id": "2", "path": "direct", "latency_ms": 0.42},
            {"peer_id": "3", "path": "relayed", "latency_ms": 31.5},
            {"peer_id": "4", "path": "connecting", "latency_ms": None},
        ],
    }
    hv = plugin.host_vars(peer, None, {"2": "db-1"})
    assert hv["starling_latency_ms"] == {"db-1": 0.42, "3": 31.5}  # a peer outside the listing: by id
    assert plugin.host_vars({"id": "9", "name": "x"})["starling_latency_ms"] == {}
