"""Unit tests for NAT traversal logic: candidate ranking, the path state machine with a proxy,
STUN/ICE input validation, the relay proxy's framing and demultiplexing, and the STUN client
against a local responder (loopback only)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from typing import Any

import pytest
from aioice import stun

from agent.nat.fallback import DIRECT_TIMEOUT, Fallback
from agent.nat.ice import IceParams, SelectedPair, usable_remote
from agent.nat.reflexive import snat_table
from agent.nat.relay import PairProxy, is_stun
from agent.nat.stun import StunError, binding, parse_server
from agent.netmap import NetworkMap
from agent.peers import Candidate, PathState, PeerConnection, rank
from starling_proto.netmap import RelayCredential

LAN = [ipaddress.IPv4Network("198.18.5.0/24")]


def test_rank_puts_reflexive_before_foreign_host_candidates() -> None:
    cands = [
        Candidate("198.18.7.2:51820", "host"),
        Candidate("198.19.0.9:40000", "relay"),
        Candidate("198.19.0.12:51820", "srflx"),
        Candidate("198.18.5.9:51820", "host"),
    ]
    assert [c.address for c in rank(cands, LAN)] == [
        "198.18.5.9:51820",  # same subnet: straight across the LAN
        "198.19.0.12:51820",  # the public mapping
        "198.18.7.2:51820",  # someone else's private LAN: rarely reachable
        "198.19.0.9:40000",
    ]


def test_proxied_path_is_relayed_and_ignores_new_direct_candidates() -> None:
    conn = PeerConnection("p1", "key", "peer", "100.64.0.2")
    conn.remote_candidates([Candidate("198.19.0.12:51820", "srflx")], LAN)
    conn.proxied = conn.relayed = True
    conn.endpoint = "127.0.0.1:40000"
    now = time.time()
    assert conn.observe(int(now), 100, 100, "127.0.0.1:40000", now) is None
    assert conn.state == PathState.RELAYED
    # New candidates while on the proxy are kept for the re-probe, WireGuard is not repointed.
    assert conn.remote_candidates([Candidate("198.19.0.13:51820", "srflx")], LAN) is None
    assert conn.best_direct() == "198.19.0.13:51820"


def test_handshakes_of_a_lost_path_do_not_count() -> None:
    conn = PeerConnection("p1", "key", "peer", "100.64.0.2")
    now = time.time()
    conn.observe(int(now) - 5, 1, 1, "198.19.0.12:51820", now)
    assert conn.state == PathState.DIRECT
    conn.stale_before = int(now) - 5
    conn.set_state(PathState.CONNECTING)
    conn.observe(int(now) - 5, 1, 1, "198.19.0.12:51820", now)
    assert conn.state != PathState.DIRECT
    conn.observe(int(now), 2, 2, "198.19.0.12:51820", now)
    assert conn.state == PathState.DIRECT


class _RecordingSignal:
    """A SignalLink that records what the fallback sends."""

    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    async def send(self, to_pub: str, kind: str, body: dict[str, Any], *, msg_id: str | None = None) -> bool:
        self.sent.append((to_pub, kind, body))
        return True


class _FakeAgent:
    """A FallbackHost (agent.nat.fallback) that records how the fallback moves paths."""

    def __init__(self, public_key: str, signal: _RecordingSignal | None = None) -> None:
        self.public_key = public_key
        self.port = 51820
        self.signal = signal
        self.map = NetworkMap(relays=(RelayCredential(("turn:198.19.0.1:3478?transport=udp",), "u", "p"),))
        self.calls: list[tuple[str, str]] = []

    async def fresh_candidates(self) -> list[Candidate]:
        return []

    def ice_address_ok(self, address: str) -> bool:
        return True

    async def refresh_reflexive(self) -> None:
        self.calls.append(("refresh_reflexive", ""))

    async def send_offer(self, conn: PeerConnection) -> None:
        self.calls.append(("send_offer", conn.name))

    async def point_wireguard(self, conn: PeerConnection, endpoint: str, *, fresh: bool) -> None:
        self.calls.append(("point_wireguard", endpoint))

    async def nudge(self, conn: PeerConnection, endpoint: str | None = None) -> None:
        self.calls.append(("nudge", endpoint or ""))


def test_fallback_speaks_through_the_hosts_signal_link_only_when_connected() -> None:
    conn = PeerConnection("p1", "BBBB", "peer", "100.64.0.2")
    down = _RecordingSignal(connected=False)
    assert asyncio.run(Fallback(_FakeAgent("AAAA", down))._send(conn, "ice-request", {})) is False
    assert asyncio.run(Fallback(_FakeAgent("AAAA", None))._send(conn, "ice-request", {})) is False
    up = _RecordingSignal(connected=True)
    assert asyncio.run(Fallback(_FakeAgent("AAAA", up))._send(conn, "ice-request", {"x": 1})) is True
    assert down.sent == [] and up.sent == [("BBBB", "ice-request", {"x": 1})]


def test_a_lost_direct_path_is_not_the_fallbacks_business() -> None:
    host = _FakeAgent("AAAA")
    fb = Fallback(host)
    conn = PeerConnection("p1", "BBBB", "peer", "100.64.0.2")
    conn.remote_candidates([Candidate("198.19.0.12:51820", "srflx")], LAN)
    asyncio.run(fb.path_lost(conn))  # no proxy: nothing to drop, WireGuard untouched
    assert host.calls == [] and conn.state == PathState.CONNECTING


def test_fallback_starts_only_after_direct_candidates_had_their_time() -> None:
    fb = Fallback(_FakeAgent("AAAA"))
    conn = PeerConnection("p1", "BBBB", "peer", "100.64.0.2")
    mono = time.monotonic()
    assert not fb.due(conn, mono)  # no candidates yet
    conn.remote_candidates([Candidate("198.19.0.12:51820", "srflx")], LAN)
    assert not fb.due(conn, conn.first_endpoint_at + DIRECT_TIMEOUT / 2)
    assert fb.due(conn, conn.first_endpoint_at + DIRECT_TIMEOUT + 0.1)
    assert fb.controlling(conn)  # the smaller public key drives ICE
    conn.set_state(PathState.DIRECT)
    assert not fb.due(conn, conn.first_endpoint_at + 60)
    servers = fb._servers()
    assert servers["turn_server"] == ("198.19.0.1", 3478) and servers["stun_server"] == ("198.19.0.1", 3478)
    assert fb._servers(with_turn=False)["turn_server"] is None


@pytest.mark.parametrize(
    "body",
    [
        None,
        "x",
        {"ufrag": "ab", "pwd": "x" * 22, "candidates": []},
        {"ufrag": "abcd", "pwd": "short", "candidates": []},
        {"ufrag": "abcd", "pwd": "x" * 22, "candidates": "nope"},
        {"ufrag": "abcd", "pwd": "x" * 22, "candidates": ["c"] * 33},
        {"ufrag": "abcd", "pwd": "x" * 22, "candidates": [1]},
    ],
)
def test_ice_parameters_are_validated(body: Any) -> None:
    with pytest.raises(ValueError):
        IceParams.from_wire(body)


def test_ice_remote_candidates_filter() -> None:
    from aioice import Candidate as IceCandidate

    def cand(host: str) -> IceCandidate:
        return IceCandidate("1", 1, "udp", 1, host, 5000, "host")

    assert usable_remote(cand("198.19.0.5"))
    assert not usable_remote(cand("100.64.0.7"))  # the overlay
    assert not usable_remote(cand("127.0.0.1"))
    assert not usable_remote(cand("peer.local"))  # mDNS names
    assert not usable_remote(cand("fe80::1"))


def test_parse_server_urls() -> None:
    assert parse_server("turn:198.19.0.1:3478?transport=udp") == ("198.19.0.1", 3478)
    assert parse_server("stun:198.19.0.1") == ("198.19.0.1", 3478)
    assert parse_server("198.19.0.1:5349") == ("198.19.0.1", 5349)
    with pytest.raises(ValueError, match="bad STUN"):
        parse_server("turn:198.19.0.1:port")


def test_stun_detection_never_takes_wireguard_packets() -> None:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    assert is_stun(bytes(request))
    for wg_type in (1, 2, 3, 4):
        packet = bytes([wg_type, 0, 0, 0]) + b"\x21\x12\xa4\x42" + bytes(140)
        assert not is_stun(packet)
    assert not is_stun(b"\x00\x01")


def test_snat_rule_rewrites_only_the_probe_port() -> None:
    batch = snat_table(40000, 51820)
    rule = batch[-1]["add"]["rule"]
    assert rule["table"] == "starling-stun" and rule["chain"] == "postrouting"
    assert rule["expr"][0]["match"]["right"] == 40000
    assert rule["expr"][1] == {"snat": {"port": 51820}}
    # Atomic re-create: add (no-op if present), delete, add again, then chain and rule.
    assert [next(iter(c)) for c in batch] == ["add", "delete", "add", "add", "add"]


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse_message(data)
        if self.mode == "garbage":
            self.transport.sendto(b"not stun at all", addr)  # type: ignore[union-attr]
            return
        cls = stun.Class.ERROR if self.mode == "error" else stun.Class.RESPONSE
        reply = stun.Message(
            message_method=stun.Method.BINDING, message_class=cls, transaction_id=request.transaction_id
        )
        if self.mode == "error":
            reply.attributes["ERROR-CODE"] = (400, "Bad Request")
        else:
            reply.attributes["XOR-MAPPED-ADDRESS"] = ("198.19.0.77", 61000)
        self.transport.sendto(bytes(reply), addr)  # type: ignore[union-attr]


async def _ask(mode: str, limit: float = 1.0) -> tuple[str, int]:
    loop = asyncio.get_running_loop()
    server, _ = await loop.create_datagram_endpoint(lambda: _Responder(mode), local_addr=("127.0.0.1", 0))
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return await binding(sock, server.get_extra_info("sockname"), limit=limit)
    finally:
        server.close()


def test_stun_binding_answers_errors_and_silence() -> None:
    assert asyncio.run(_ask("ok")) == ("198.19.0.77", 61000)
    with pytest.raises(StunError, match="STUN error 400"):
        asyncio.run(_ask("error"))
    with pytest.raises(StunError, match="no STUN answer"):
        asyncio.run(_ask("garbage", limit=0.6))


class _FakeTurnSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_proxy_frames_channel_data_and_demultiplexes_stun() -> None:
    async def scenario() -> None:
        turn_socket = _FakeTurnSocket()
        inner = type("Inner", (), {"peer_to_channel": {("198.19.0.1", 50000): 0x4001}, "transport": turn_socket})()
        consent: list[bytes] = []

        class Protocol:
            transport = type("T", (), {"_TurnTransport__inner_protocol": inner, "get_extra_info": lambda *a: None})()

            def datagram_received(self, data: bytes, addr: Any) -> None:
                consent.append(data)

        pair = SelectedPair(Protocol(), "relay", ("198.19.0.1", 50001), "relay", ("198.19.0.1", 50000))  # type: ignore[arg-type]
        wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wg.bind(("127.0.0.1", 0))
        wg.settimeout(2)
        proxy = PairProxy(pair, wg.getsockname()[1])
        port = await proxy.start()
        try:
            wg.sendto(b"\x04wireguard-data", ("127.0.0.1", port))
            for _ in range(100):
                if turn_socket.sent:
                    break
                await asyncio.sleep(0.01)
            assert turn_socket.sent == [struct.pack("!HH", 0x4001, 15) + b"\x04wireguard-data"]
            # Peer -> us: data goes to WireGuard, STUN (consent) stays with aioice.
            pair.protocol.datagram_received(b"\x04from-peer", ("198.19.0.1", 50000))
            ping = bytes(stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST))
            pair.protocol.datagram_received(ping, ("198.19.0.1", 50000))
            data = await asyncio.get_running_loop().run_in_executor(None, wg.recv, 100)
            assert data == b"\x04from-peer" and consent == [ping]
            # Only our WireGuard port may use the proxy.
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.sendto(b"\x04intruder", ("127.0.0.1", port))
            other.close()
            await asyncio.sleep(0.05)
            assert proxy.dropped == 1 and proxy.status()["to_peer_packets"] == 1
        finally:
            proxy.close()
            wg.close()

    asyncio.run(scenario())


def test_unreachable_stun_server_gives_a_clear_status() -> None:
    """No STUN answer: the probe reports which server and why, keeps no address, raises nothing."""
    from agent.firewall.model import FirewallError
    from agent.nat.reflexive import ReflexiveProbe

    class NoNft:
        def apply(self, commands: list[dict[str, Any]]) -> None:
            raise FirewallError("nft: not in this unit test")

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    probe = ReflexiveProbe(51820, nft=NoNft())  # type: ignore[arg-type]

    async def run() -> str | None:
        try:
            return await probe.learn([("127.0.0.1", port)], limit=0.5)
        finally:
            probe.close()

    try:
        assert asyncio.run(run()) is None
    finally:
        silent.close()
    status = probe.status()
    assert status["address"] is None and not status["mapped_to_wireguard_port"]
    assert status["error"] == f"127.0.0.1:{port}: no STUN answer from 127.0.0.1:{port} within 0.5 s"


class _StubProxy:
    """Just enough of a PairProxy for the fallback's bookkeeping (no sockets)."""

    def __init__(self) -> None:
        self.pair = type("Pair", (), {"relayed": True, "describe": lambda self: "relay pair"})()
        self.last_heard = time.monotonic()
        self.port, self.to_peer_bytes, self.from_peer_bytes, self.closed = 40000, 0, 0, False

    def close(self) -> None:
        self.closed = True


def test_the_side_still_on_the_proxy_follows_a_peer_that_went_direct() -> None:
    """The other side's switch won the race: once WireGuard hears the peer directly (its endpoint
    roamed off 127.0.0.1 and more bytes arrived), this side drops its proxy too."""
    host = _FakeAgent("BBBB")  # the controlled side: it never probes by itself
    fb = Fallback(host)
    conn = PeerConnection("p1", "AAAA", "peer", "100.64.0.2")
    proxy = _StubProxy()
    conn.nat.proxy = proxy  # type: ignore[assignment]
    conn.proxied = conn.relayed = True
    conn.set_state(PathState.RELAYED)

    async def passes() -> None:
        conn.rx_bytes, conn.wg_endpoint = 1000, "127.0.0.1:40000"
        await fb.tick(conn, time.monotonic())
        conn.rx_bytes = 1500  # more through the proxy: nothing to follow
        await fb.tick(conn, time.monotonic())
        assert conn.proxied and not proxy.closed
        conn.wg_endpoint = "198.19.0.12:51820"  # roamed, but nothing new received since: not yet
        await fb.tick(conn, time.monotonic())
        assert conn.proxied and not proxy.closed
        conn.rx_bytes = 1800  # the peer's packets now arrive directly
        await fb.tick(conn, time.monotonic())

    asyncio.run(passes())
    assert proxy.closed and not conn.proxied and conn.nat.proxy is None
    assert conn.state == PathState.DIRECT
    assert ("nudge", "") in host.calls  # so the peer hears us directly as well
