"""Agent logic without the network: UAPI, map application, the per-peer state machine, config/state
files, and the kernel backend's calls into pyroute2's WireGuard API."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfigError, AgentState, load_config
from agent.keys import FileKeySource, KeyError_, generate_private_key, public_key_of
from agent.netmap import MapGap, NetworkMap
from agent.peers import Candidate, PathState, PeerConnection, parse_candidates
from agent.wg.backend import PeerConfig, WireGuardError
from agent.wg.kernel import KernelBackend
from agent.wg.uapi import key_to_hex, parse_get, peer_lines
from starling_proto.netmap import parse_map_message

KEY = base64.b64encode(bytes(range(32))).decode()


def test_uapi_lines_and_parse() -> None:
    lines = peer_lines(PeerConfig(KEY, ("100.64.0.2/32",), "198.18.1.2:51820", 25))
    assert lines == [
        f"public_key={bytes(range(32)).hex()}",
        "endpoint=198.18.1.2:51820",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.2/32",
    ]
    reply = (
        f"private_key={'11' * 32}\nlisten_port=51820\npublic_key={bytes(range(32)).hex()}\n"
        "endpoint=198.18.1.2:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
        "rx_bytes=10\ntx_bytes=20\npersistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nerrno=0\n\n"
    )
    iface, peers = parse_get(reply)
    assert iface["listen_port"] == "51820"
    stats = peers[KEY]
    assert (stats.endpoint, stats.rx_bytes, stats.tx_bytes, stats.allowed_ips) == (
        "198.18.1.2:51820",
        10,
        20,
        ["100.64.0.2/32"],
    )
    assert stats.last_handshake == pytest.approx(1700000000.5)
    with pytest.raises(WireGuardError):
        key_to_hex("short")
    with pytest.raises(WireGuardError):
        peer_lines(PeerConfig(KEY, ("100.64.0.2/32\nprivate_key=00",)))


def wire_key(i: int, salt: int = 0) -> str:
    return base64.b64encode(bytes([i, salt] * 16)).decode()


def entry(i: int, key: str | None = None) -> dict[str, Any]:
    return {
        "id": f"p{i}",
        "name": f"n{i}",
        "public_key": key or wire_key(i),
        "mesh_ip": f"100.64.0.{i}",
        "allowed_ips": [f"100.64.0.{i}/32"],
        "dns_name": f"n{i}.mesh",
    }


def full(serial: int, peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "map",
        "serial": serial,
        "peer": {**entry(1), "mesh_prefix": "100.64.0.0/16"},
        "peers": peers,
        "firewall": {"rules": [], "sets": {}},
        "dns": {},
        "signal": {"url": ""},
        "relays": [],
    }


def test_network_map_applies_full_and_delta_and_detects_gaps() -> None:
    m = NetworkMap()
    change = m.apply(parse_map_message(full(5, [entry(2), entry(3)])))
    assert set(change.added) == {"p2", "p3"} and change.full
    k3new = wire_key(3, 1)
    change = m.apply(
        parse_map_message(
            {
                "type": "delta",
                "serial": 6,
                "base_serial": 5,
                "peers_upsert": [entry(4), entry(3, k3new)],
                "peers_remove": ["p2"],
            }
        )
    )
    assert set(change.added) == {"p4"} and set(change.removed) == {"p2"}
    assert change.changed["p3"][1].public_key == k3new
    assert m.serial == 6
    nothing = m.apply(parse_map_message({"type": "delta", "serial": 7, "base_serial": 6}))
    assert not nothing
    with pytest.raises(MapGap):
        m.apply(parse_map_message({"type": "delta", "serial": 9, "base_serial": 8}))
    again = m.apply(parse_map_message(full(10, [entry(3, k3new), entry(4)])))
    assert not again.added and not again.removed and not again.changed  # reconnect: nothing to touch


def test_candidates_are_validated() -> None:
    raw = [
        {"address": "198.18.1.2:51820"},
        {"address": "100.64.0.9:51820"},
        {"address": "127.0.0.1:1"},
        {"address": "nonsense"},
        {"address": "198.18.1.3:0"},
        "x",
        {"address": "198.18.2.2:51820", "kind": "bad"},
    ]
    assert [c.address for c in parse_candidates(raw)] == ["198.18.1.2:51820", "198.18.2.2:51820"]
    assert parse_candidates("not a list") == []


def test_state_machine_prefers_same_subnet_rotates_and_detects_loss() -> None:
    conn = PeerConnection("p2", KEY, "n2", "100.64.0.2")
    nets = [ipaddress.IPv4Network("198.18.5.0/24")]
    first = conn.remote_candidates([Candidate("198.18.9.9:51820"), Candidate("198.18.5.7:51820")], nets)
    assert first == "198.18.5.7:51820" and conn.state == PathState.CONNECTING
    now = time.time()
    assert conn.observe(0, 0, 0, None, now) is None  # give the first candidate time
    conn.endpoint_set_at -= 10
    assert conn.observe(0, 0, 0, None, now) == "198.18.9.9:51820"  # then rotate
    assert conn.observe(now - 1, 100, 100, "198.18.9.9:51820", now) is None
    assert conn.state == PathState.DIRECT
    changes = conn.path_changes
    # Same candidates again while direct: nothing to do (no tunnel disturbance).
    assert conn.remote_candidates([Candidate("198.18.9.9:51820"), Candidate("198.18.5.7:51820")], nets) is None
    conn.observe(now - 500, 100, 100, None, now)  # handshake went stale
    assert conn.state == PathState.LOST and conn.path_changes == changes + 1
    assert conn.offer_due(time.monotonic()) is True and conn.offer_due(time.monotonic()) is False


def test_config_and_state_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("interface: this-name-is-far-too-long\n")
    with pytest.raises(AgentConfigError, match="interface"):
        load_config(cfg)
    cfg.write_text("bogus: 1\n")
    with pytest.raises(AgentConfigError, match="unknown keys bogus"):
        load_config(cfg)
    cfg.write_text(": [\n")
    with pytest.raises(AgentConfigError, match="cannot be read"):
        load_config(cfg)
    state = tmp_path / "state.json"
    AgentState("http://x", "id", "n", "100.64.0.1", "spc_secret").save(state)
    assert os.stat(state).st_mode & 0o777 == 0o600
    assert AgentState.load(state) == AgentState("http://x", "id", "n", "100.64.0.1", "spc_secret")
    state.write_text("{not json")
    with pytest.raises(AgentConfigError, match="corrupt"):
        AgentState.load(state)


def test_file_key_source(tmp_path: Path) -> None:
    src = FileKeySource(tmp_path / "private.key")
    key = src.load()
    assert src.load() == key and os.stat(src.path).st_mode & 0o777 == 0o600
    assert len(base64.b64decode(public_key_of(key))) == 32
    os.chmod(src.path, 0o644)
    with pytest.raises(KeyError_, match="readable by others"):
        src.load()
    src.path.write_text("garbage")
    os.chmod(src.path, 0o600)
    with pytest.raises(KeyError_, match="corrupt"):
        src.load()
    raw = base64.b64decode(generate_private_key())
    assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64  # clamped like `wg genkey`


class FakeWireGuard:
    """Records calls with the signature of pyroute2.WireGuard.set()."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def set(
        self, interface: str, listen_port: Any = None, fwmark: Any = None, private_key: Any = None, peer: Any = None
    ) -> None:
        args = {
            k: v
            for k, v in {"listen_port": listen_port, "private_key": private_key, "peer": peer}.items()
            if v is not None
        }
        self.calls.append((interface, json.loads(json.dumps(args))))


def test_kernel_backend_speaks_pyroute2_wireguard_api() -> None:
    fake = FakeWireGuard()
    backend = KernelBackend("wt0", wg=fake)
    backend.set_peer(PeerConfig(KEY, ("100.64.0.2/32",), "198.18.1.2:51820", 25))
    backend.remove_peer(KEY)
    backend.set_private_key(KEY)
    assert fake.calls == [
        (
            "wt0",
            {
                "peer": {
                    "public_key": KEY,
                    "allowed_ips": ["100.64.0.2/32"],
                    "persistent_keepalive": 25,
                    "replace_allowed_ips": True,
                    "endpoint_addr": "198.18.1.2",
                    "endpoint_port": 51820,
                }
            },
        ),
        ("wt0", {"peer": {"public_key": KEY, "remove": True}}),
        ("wt0", {"private_key": KEY}),
    ]


def test_json_log_lines(tmp_path: Path) -> None:
    import logging

    from agent.cli import JsonLogFormatter

    record = logging.LogRecord("starling.agent", logging.INFO, __file__, 1, "peer %s up", ("b",), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "peer b up" and line["level"] == "info" and line["logger"] == "starling.agent"
