"""A PeerLink (one remote peer) driven through fake ports: what it configures in WireGuard, when it
offers, how it hands NAT messages to the fallback, swaps a rotated key and cleans up when closed."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

from agent.link import FOLLOW_DELAY, OLD_KEY_GRACE, PeerLink
from agent.peers import Candidate, PathState, PeerConnection
from agent.wg.backend import PeerConfig, PeerStats
from starling_proto.netmap import PeerEntry

KEY_A = "A" * 43 + "="  # ours would be smaller: see FakeNat.controlling
KEY_B = "B" * 43 + "="
KEY_C = "C" * 43 + "="
LAN = ipaddress.IPv4Network("198.18.5.0/24")


class FakeWireGuard:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stats: dict[str, PeerStats] = {}

    async def set_peer(self, peer: PeerConfig) -> bool:
        self.calls.append(("set", peer))
        return True

    async def remove_peer(self, public_key: str) -> bool:
        self.calls.append(("remove", public_key))
        return True

    async def swap_key(self, old_public_key: str, peer: PeerConfig) -> bool:
        self.calls.append(("swap", (old_public_key, peer)))
        return True

    async def peers(self) -> dict[str, PeerStats]:
        return self.stats


class FakeOffers:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[tuple[str, str]] = []

    async def offer(self, conn: PeerConnection, kind: str) -> bool:
        if self.up:
            self.sent.append((conn.name, kind))
        return self.up


class FakeNets:
    async def local_nets(self) -> list[ipaddress.IPv4Network]:
        return [LAN]


class FakeNat:
    def __init__(self, controlling: bool) -> None:
        self.is_controlling = controlling
        self.calls: list[tuple[str, str]] = []

    def controlling(self, conn: PeerConnection) -> bool:
        return self.is_controlling

    async def on_message(self, conn: PeerConnection, kind: str, body: Any) -> None:
        self.calls.append(("message", kind))

    async def tick(self, conn: PeerConnection, mono: float) -> None:
        self.calls.append(("tick", conn.name))

    async def path_lost(self, conn: PeerConnection) -> None:
        self.calls.append(("path_lost", conn.name))

    async def forget(self, conn: PeerConnection) -> None:
        self.calls.append(("forget", conn.name))


class FakeClock:
    """Wall and monotonic time under the test's control; sleeps are recorded and return at once."""

    def __init__(self) -> None:
        self.wall, self.mono = time.time(), 1000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)


def entry(key: str = KEY_B, ips: tuple[str, ...] = ("100.64.0.2/32",), name: str = "peer-b") -> PeerEntry:
    return PeerEntry("pb", name, key, "100.64.0.2", ips)


def make(
    controlling: bool = True, offers_up: bool = True
) -> tuple[PeerLink, FakeWireGuard, FakeOffers, FakeNat, FakeClock]:
    wg, offers, nat, clock = FakeWireGuard(), FakeOffers(offers_up), FakeNat(controlling), FakeClock()
    link = PeerLink(entry(), keepalive=25, wg=wg, offers=offers, nets=FakeNets(), nat=nat, clock=clock)
    return link, wg, offers, nat, clock


async def settle(link: PeerLink) -> None:
    while link._tasks:  # noqa: ASYNC110 - the link's own tasks (follow, retire) run on fake sleeps
        await asyncio.sleep(0)


async def test_a_new_peer_is_configured_without_endpoint_and_offered_to() -> None:
    link, wg, offers, _, _ = make()
    await link.start(None, None)
    assert wg.calls == [("set", PeerConfig(KEY_B, ("100.64.0.2/32",), None, 0))]  # no keepalive yet
    assert offers.sent == [("peer-b", "offer")] and link.conn.state == PathState.CONNECTING


async def test_an_existing_tunnel_is_adopted_as_it_is() -> None:
    link, wg, _, _, _ = make()
    await link.start(PeerStats(KEY_B, endpoint="198.18.5.7:51820"), None)
    assert wg.calls == [] and link.conn.endpoint == "198.18.5.7:51820"


async def test_the_controlling_side_points_wireguard_at_once() -> None:
    link, wg, _, _, _ = make(controlling=True)
    await link.start(None, [Candidate("198.18.9.9:51820", "srflx"), Candidate("198.18.5.7:51820")])
    # Same-subnet host candidate first, with keepalive (which starts the handshake now).
    assert wg.calls[-1] == ("set", PeerConfig(KEY_B, ("100.64.0.2/32",), "198.18.5.7:51820", 25))


async def test_the_controlled_side_follows_later_on_a_fresh_peer() -> None:
    link, wg, _, _, clock = make(controlling=False)
    await link.use_candidates([Candidate("198.18.5.7:51820")])
    assert wg.calls == []  # not at once: two crossing initiations stall both ends
    await settle(link)
    assert clock.slept == [FOLLOW_DELAY]
    assert wg.calls == [("remove", KEY_B), ("set", PeerConfig(KEY_B, ("100.64.0.2/32",), "198.18.5.7:51820", 25))]


async def test_an_answered_follower_does_not_recreate_the_peer() -> None:
    link, wg, _, _, clock = make(controlling=False)
    wg.stats[KEY_B] = PeerStats(KEY_B, last_handshake=clock.wall - 1)
    await link.use_candidates([Candidate("198.18.5.7:51820")])
    await settle(link)
    assert [c[0] for c in wg.calls] == ["set"]


async def test_signal_messages_go_where_they_belong() -> None:
    link, wg, offers, nat, _ = make()
    link.conn.offline_until = 99.0
    await link.receive("ice-offer", {"ufrag": "x"}, [])
    assert nat.calls == [("message", "ice-offer")] and wg.calls == [] and link.conn.offline_until == 0.0
    await link.receive("offer", {}, [Candidate("198.18.5.7:51820")])
    assert offers.sent == [("peer-b", "answer")] and wg.calls[-1][1].endpoint == "198.18.5.7:51820"


async def test_a_rotated_key_is_swapped_in_place_and_the_old_one_retired() -> None:
    link, wg, _, _, clock = make()
    await link.start(PeerStats(KEY_B, endpoint="198.18.5.7:51820"), None)
    conn = link.conn
    await link.rekey(entry(KEY_C), None)
    assert link.conn is conn and conn.public_key == KEY_C and conn.endpoint == "198.18.5.7:51820"
    assert wg.calls[0] == ("swap", (KEY_B, PeerConfig(KEY_C, ("100.64.0.2/32",), "198.18.5.7:51820", 25)))
    assert conn.hold_until == clock.mono + OLD_KEY_GRACE  # no handshake for a round trip is not a loss
    await settle(link)
    assert clock.slept == [OLD_KEY_GRACE] and wg.calls[-1] == ("remove", KEY_B)


async def test_a_rollback_to_the_old_key_keeps_it() -> None:
    link, wg, _, _, _ = make()
    await link.start(PeerStats(KEY_B, endpoint="198.18.5.7:51820"), None)
    await link.rekey(entry(KEY_C), None)
    await link.rekey(entry(KEY_B), None)  # before the grace ran out
    await settle(link)
    assert ("remove", KEY_B) not in wg.calls and ("remove", KEY_C) in wg.calls


async def test_close_forgets_the_nat_state_removes_every_key_and_stops_acting() -> None:
    link, wg, _, nat, _ = make(controlling=False)
    await link.start(PeerStats(KEY_B, endpoint="198.18.5.7:51820"), None)
    await link.rekey(entry(KEY_C), None)  # the old key is still being retired
    await link.use_candidates([Candidate("198.18.5.8:51820")])  # a follower is waiting
    await link.close()
    assert ("forget", "peer-b") in nat.calls
    removed = {arg for op, arg in wg.calls if op == "remove"}
    assert removed == {KEY_B, KEY_C}
    before = list(wg.calls)
    await link.point("198.18.5.9:51820", fresh=True)
    await link.nudge("198.18.5.9:51820")
    await settle(link)
    assert wg.calls == before


async def test_underlay_change_nudges_and_asks_the_path_for_proof() -> None:
    link, wg, _, _, clock = make()
    await link.start(PeerStats(KEY_B, endpoint="198.18.5.7:51820"), None)
    link.conn.observe(clock.wall - 1, 10, 10, "198.18.5.7:51820", clock.wall)
    assert link.conn.state == PathState.DIRECT
    await link.underlay_changed()
    assert [c[1].keepalive for c in wg.calls] == [0, 25]  # keepalive 0 -> n sends one keepalive now
    assert link.conn.verify_since == clock.wall


async def test_a_watch_pass_notices_a_lost_proxied_path_and_keeps_offering() -> None:
    link, _, _, nat, clock = make(offers_up=False)
    await link.start(PeerStats(KEY_B, endpoint="127.0.0.1:40000"), None)
    link.conn.proxied = True
    link.conn.observe(clock.wall - 1, 10, 10, "127.0.0.1:40000", clock.wall)
    st = PeerStats(KEY_B, endpoint="127.0.0.1:40000", last_handshake=clock.wall - 500)
    await link.watch(st, clock.wall, clock.mono)
    assert ("path_lost", "peer-b") in nat.calls and ("tick", "peer-b") in nat.calls
    # Signal is down: the offer failed and is retried soon, with the backoff halved.
    assert link.conn.next_offer_at == clock.mono + 0.5
