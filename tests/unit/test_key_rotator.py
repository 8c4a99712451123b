"""KeyRotator against a recording RotationHost: the order of a rotation (prepare, switch, commit,
verify), the way back when the commit fails, and refusals that change nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent.client import CoordinatorError
from agent.keys import generate_private_key, public_key_of
from agent.netmap import NetworkMap
from agent.rekey import KeyRotator, RekeyError
from agent.wg.backend import PeerStats
from starling_proto.netmap import SelfEntry

NEIGHBOUR = "N" * 43 + "="


class Source:
    name = "test-source"

    def __init__(self, key: str) -> None:
        self.key, self.version = key, 2

    def load(self) -> str:
        return self.key

    def reload(self) -> str:
        return self.key

    def find(self, public_key: str) -> str | None:
        return None


class Backend:
    def __init__(self, host: Host) -> None:
        self.host = host

    def set_private_key(self, private: str) -> None:
        self.host.log.append(("switch", public_key_of(private)[:8]))
        self.host.wg_key = private


class Api:
    def __init__(self, host: Host, refuse: str | None = None) -> None:
        self.host, self.refuse = host, refuse

    async def change_key(self, current: str, new: str, phase: str, version: int | None, source: str) -> None:
        if phase == self.refuse:
            raise CoordinatorError(f"{phase} refused")
        self.host.log.append((phase, public_key_of(new)[:8]))
        if phase == "commit":  # the neighbour handshakes with the new key right away
            self.host.handshake = time.time() + 0.01


class Host:
    """A RotationHost that records the order of what the rotator does."""

    def __init__(self, private: str, new: str, refuse: str | None = None) -> None:
        self.private_key, self.public_key = private, public_key_of(private)
        self.wg_key = private
        self.keys = Source(new)
        self.backend = Backend(self)
        self.api = Api(self, refuse)
        self.map = NetworkMap(me=SelfEntry("me", "p0", self.public_key, "100.64.0.1", "me.mesh"))
        self.log: list[tuple[str, str]] = []
        self.events: list[str] = []
        self.handshake = time.time() - 5  # a live tunnel to the neighbour before the rotation

    def adopt_key(self, private_key: str, public_key: str) -> None:
        self.private_key, self.public_key = private_key, public_key
        self.log.append(("adopt", public_key[:8]))

    def renew_signal_identity(self) -> None:
        self.log.append(("signal", self.public_key[:8]))

    def wireguard_peers(self) -> dict[str, PeerStats]:
        return {NEIGHBOUR: PeerStats(NEIGHBOUR, last_handshake=self.handshake)}

    def peer_name(self, public_key: str) -> str | None:
        return "neighbour" if public_key == NEIGHBOUR else None

    async def event(self, kind: str, message: str) -> None:
        self.events.append(kind)


def rotate(host: Host, **kw: Any) -> dict[str, Any]:
    return asyncio.run(KeyRotator(host).reload(**kw))


def test_a_rotation_prepares_switches_commits_and_verifies() -> None:
    old, new = generate_private_key(), generate_private_key()
    host = Host(old, new)
    result = rotate(host, verify_timeout=2)
    n = public_key_of(new)[:8]
    assert host.log == [("prepare", n), ("switch", n), ("adopt", n), ("commit", n), ("signal", n)]
    assert result["changed"] and list(result["handshakes"]) == ["neighbour"] and result["missing"] == []
    assert host.map.me is not None and host.map.me.public_key == public_key_of(new)
    assert host.events == ["key.verified"]


def test_a_failed_commit_puts_wireguard_back_on_the_old_key() -> None:
    old, new = generate_private_key(), generate_private_key()
    host = Host(old, new, refuse="commit")
    with pytest.raises(RekeyError) as exc:
        rotate(host, verify_timeout=1)
    assert exc.value.stage == "commit"
    assert host.wg_key == old and host.private_key == old and host.public_key == public_key_of(old)
    assert host.map.me is not None and host.map.me.public_key == public_key_of(old)
    assert host.events == ["key.failed"]


@pytest.mark.parametrize("refuse", ["prepare"])
def test_a_refused_prepare_changes_nothing(refuse: str) -> None:
    old, new = generate_private_key(), generate_private_key()
    host = Host(old, new, refuse=refuse)
    with pytest.raises(RekeyError):
        rotate(host, verify_timeout=1)
    assert host.log == [] and host.wg_key == old and host.private_key == old


def test_an_unexpected_key_from_the_source_changes_nothing() -> None:
    old, new = generate_private_key(), generate_private_key()
    host = Host(old, new)
    with pytest.raises(RekeyError) as exc:
        rotate(host, expect_public_key=public_key_of(generate_private_key()), verify_timeout=1)
    assert exc.value.stage == "source" and host.log == [] and host.private_key == old


def test_a_neighbour_that_does_not_handshake_again_is_reported() -> None:
    old, new = generate_private_key(), generate_private_key()
    host = Host(old, new)
    host.api = Api(host)
    host.handshake = time.time() - 5

    async def no_handshake(current: str, new_key: str, phase: str, version: int | None, source: str) -> None:
        host.log.append((phase, public_key_of(new_key)[:8]))

    host.api.change_key = no_handshake  # type: ignore[method-assign]
    with pytest.raises(RekeyError) as exc:
        rotate(host, verify_timeout=0.3)
    assert exc.value.stage == "verify" and exc.value.switched and exc.value.detail["missing"] == ["neighbour"]
    assert host.private_key == new  # switched and committed: the key stays, the report says who is missing
