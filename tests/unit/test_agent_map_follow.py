"""The agent's map stream handling with a scripted coordinator and a recording WireGuard: a map of an unknown
version or a malformed message is refused with a clear status and changes nothing the agent holds or has
configured; the reconciler keeps one link and one WireGuard peer per map peer."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, AgentState
from agent.daemon import Agent
from agent.keys import FileKeySource
from agent.wg.backend import PeerConfig, PeerStats, WireGuardBackend

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


class RecordingBackend(WireGuardBackend):
    """WireGuard stand-in that records what the agent configures (no interface, no kernel)."""

    kind = "recording"

    def __init__(self) -> None:
        super().__init__("stfollow0")
        self.configured: dict[str, PeerConfig] = {}

    def up(self, private_key: str, listen_port: int) -> None:
        pass

    def set_private_key(self, private_key: str) -> None:
        pass

    def set_peer(self, peer: PeerConfig) -> None:
        self.configured[peer.public_key] = peer

    def remove_peer(self, public_key: str) -> None:
        self.configured.pop(public_key, None)

    def peers(self) -> dict[str, PeerStats]:
        return {k: PeerStats(k, c.endpoint, list(c.allowed_ips)) for k, c in self.configured.items()}

    def listen_port(self) -> int:
        return 51820

    def down(self) -> None:
        pass


class ScriptedApi:
    """The coordinator's map stream: yields the scripted events, then stays open."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events
        self.drained = asyncio.Event()  # set: the agent asked for the event after the last (all handled)

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        for event in self.events:
            yield event
        self.drained.set()
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


def golden_map() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GOLDEN / "map_full_v1.json").read_text())
    doc["relays"] = []  # no STUN server: the agent would try to learn its public address
    return doc


def make_agent(tmp_path: Path, events: list[tuple[str, Any]]) -> tuple[Agent, RecordingBackend]:
    config = AgentConfig(state_dir=tmp_path, disable_firewall=True, interface="stfollow0")
    state = AgentState("http://198.18.0.1:1", "p1", "peer1", "100.64.0.2", "cred")
    backend = RecordingBackend()
    agent = Agent(config, state, FileKeySource(tmp_path / "key"), backend)
    agent.api = ScriptedApi(events)  # type: ignore[assignment]
    agent._address = ("100.64.0.2", 16)  # the interface address is "set": no netlink in a unit test
    agent.device_ready.set()  # what run() does once the guard and WireGuard are up
    return agent, backend


async def follow_until(agent: Agent, done: Any, limit: float = 5.0) -> None:
    task = asyncio.create_task(agent._follow_map())
    try:
        async with asyncio.timeout(limit):
            while not done():  # noqa: ASYNC110  # the agent's status has no event to wait on
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_map_of_an_unknown_version_is_refused_and_the_held_map_stays(tmp_path: Path) -> None:
    first = golden_map()
    newer = copy.deepcopy(first)
    newer.update(version=2, serial=first["serial"] + 1, peers=[])
    agent, backend = make_agent(tmp_path, [("map", first), ("map", newer)])
    await follow_until(agent, lambda: agent.management.last_error is not None)
    status = agent.management.as_dict()
    assert not status["connected"]
    assert "map version 2 is not supported by this agent" in status["last_error"]
    assert "upgrade the agent" in status["last_error"]
    assert agent.map.serial == first["serial"] and set(agent.map.peers) == {p["id"] for p in first["peers"]}
    assert set(backend.configured) == {p["public_key"] for p in first["peers"]}  # tunnels untouched


async def test_a_malformed_delta_changes_nothing_and_says_which_field(tmp_path: Path) -> None:
    first = golden_map()
    bad = {
        "type": "delta",
        "version": 1,
        "serial": first["serial"] + 1,
        "base_serial": first["serial"],
        "peers_remove": [first["peers"][0]["id"]],
        "peers_upsert": [{**first["peers"][0], "id": "px", "mesh_ip": "198.18.0.9"}],
    }
    agent, backend = make_agent(tmp_path, [("map", first), ("delta", bad)])
    await follow_until(agent, lambda: agent.management.last_error is not None)
    assert "bad map message: peers_upsert[0].mesh_ip" in str(agent.management.last_error)
    assert agent.map.serial == first["serial"] and set(agent.map.peers) == {p["id"] for p in first["peers"]}
    assert set(backend.configured) == {p["public_key"] for p in first["peers"]}
    saved = json.loads((tmp_path / "map.json").read_text())
    assert saved["serial"] == first["serial"] and saved["version"] == 1  # the cache holds the last good map


# ----- the reconciler: links and WireGuard follow the map ------------------------------------------
async def test_links_follow_the_map_added_rotated_removed_and_stale_peers(tmp_path: Path) -> None:
    first = golden_map()
    third = {"id": "p9", "name": "peer9", "mesh_ip": "100.64.0.9", "allowed_ips": ["100.64.0.9/32"]}
    first["peers"].append({**first["peers"][1], **third, "public_key": "CQAHCQkABwkJAAcJCQAHCQkABwkJAAcJCQAHCQkABwk="})
    peers = first["peers"]
    rotated = {**peers[0], "public_key": "AAEHCQABBwkAAQcJAAEHCQABBwkAAQcJAAEHCQABBwk="}
    renamed = {**peers[1], "name": "renamed", "allowed_ips": ["100.64.0.3/32", "198.19.7.0/24"]}
    delta = {
        "type": "delta",
        "version": 1,
        "serial": first["serial"] + 1,
        "base_serial": first["serial"],
        "peers_upsert": [rotated, renamed],
        "peers_remove": [peers[2]["id"]],
    }
    agent, backend = make_agent(tmp_path, [("map", first)])
    backend.configured["STALE" + "A" * 38 + "="] = PeerConfig("STALE" + "A" * 38 + "=", ())  # not in any map
    api = agent.api
    assert isinstance(api, ScriptedApi)
    # Handled to the end (reconciled), not only parsed: the serial is set before the links are made.
    await follow_until(agent, lambda: agent.map.serial == first["serial"] and api.drained.is_set())
    assert set(agent.links) == {p["id"] for p in peers}
    assert set(backend.configured) == {p["public_key"] for p in peers}  # the stale peer went with the full map
    links = dict(agent.links)
    api = ScriptedApi([("delta", delta)])
    agent.api = api  # type: ignore[assignment]
    await follow_until(agent, lambda: agent.map.serial == delta["serial"] and api.drained.is_set())
    # The rotated peer keeps its link (path, relay state); its new key carries the allowed IPs and
    # its old key stays without them for OLD_KEY_GRACE (packets queued for it still leave).
    p0 = agent.links[peers[0]["id"]]
    assert p0 is links[peers[0]["id"]] and p0.conn.public_key == rotated["public_key"]
    assert backend.configured[rotated["public_key"]].allowed_ips == tuple(peers[0]["allowed_ips"])
    assert backend.configured[peers[0]["public_key"]].allowed_ips == ()
    assert agent.link_for_key(rotated["public_key"]) is p0 and agent.link_for_key(peers[0]["public_key"]) is None
    p1 = agent.links[peers[1]["id"]]
    assert p1.conn.name == "renamed" and backend.configured[peers[1]["public_key"]].allowed_ips == (
        "100.64.0.3/32",
        "198.19.7.0/24",
    )
    assert peers[2]["id"] not in agent.links and peers[2]["public_key"] not in backend.configured
    assert links[peers[2]["id"]].closed
    assert agent.peer_name(rotated["public_key"]) == peers[0]["name"] and agent.peer_name("nobody") is None
