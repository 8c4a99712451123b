"""Unit tests for NAT traversal logic: candidate ranking, the path state machine with a proxy,
STUN/ICE input validation, the relay proxy's framing and demultiplexing, and the STUN client
against a local responder (loopback only)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
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
        self.tls: ssl.SSLContext | None = None
        self.calls: list[tuple[str, str]] = []
        self.fresh: list[bool] = []  # point_wireguard's `fresh` per call

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
        self.fresh.append(fresh)

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
        self.pair = type("Pair", (), {"relayed": True, "local_type": "relay", "describe": lambda self: "relay pair"})()
        self.last_heard = time.monotonic()
        self.port, self.to_peer_bytes, self.from_peer_bytes, self.closed = 40000, 0, 0, False
        self.broken, self.transport = False, "udp"

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


# ----- TURN over TCP and TLS: stream framing, transports, the relay picker ----------------------------------


def _stun_message(method: Any = None, cls: Any = None, **attrs: Any) -> bytes:
    msg = stun.Message(message_method=method or stun.Method.BINDING, message_class=cls or stun.Class.REQUEST)
    for name, value in attrs.items():
        msg.attributes[name] = value
    msg.add_fingerprint()
    return bytes(msg)


def test_channel_data_is_padded_to_four_bytes_on_streams_only() -> None:
    from agent.nat.stream import channel_frame, padded

    header = struct.pack("!HH", 0x4001, 5)
    assert channel_frame(0x4001, b"abcde", stream=True) == header + b"abcde\x00\x00\x00"
    assert channel_frame(0x4001, b"abcde", stream=False) == header + b"abcde"  # UDP: no padding
    assert channel_frame(0x4001, b"abcd", stream=True) == struct.pack("!HH", 0x4001, 4) + b"abcd"
    assert channel_frame(0x4FFF, b"", stream=True) == struct.pack("!HH", 0x4FFF, 0)
    assert [padded(n) for n in (0, 1, 2, 3, 4, 5, 148, 1420)] == [0, 4, 4, 4, 4, 8, 148, 1420]


def _stream_fixture() -> tuple[bytes, list[bytes]]:
    """A TURN byte stream (ChannelData of every padding length, STUN in between) and its messages."""
    from agent.nat.stream import channel_frame

    stream, expected = b"", []
    # USERNAME of odd length: the STUN message pads its attribute inside (counted in its length field).
    binding = _stun_message(USERNAME="odd-length-name")
    for i, size in enumerate((1, 2, 3, 4, 5, 0, 148, 1420, 7)):
        payload = bytes([0x04]) + bytes((i + k) % 251 for k in range(max(size - 1, 0))) if size else b""
        frame = channel_frame(0x4000 + i, payload, stream=True)
        stream += frame
        expected.append(struct.pack("!HH", 0x4000 + i, len(payload)) + payload)  # delivered without padding
        if i % 3 == 1:
            stream += binding
            expected.append(binding)
    return stream, expected


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1000, 0])
def test_stream_framer_cuts_messages_at_any_read_boundary(chunk: int) -> None:
    from agent.nat.stream import ChannelStream

    stream, expected = _stream_fixture()
    got: list[bytes] = []
    framer = ChannelStream(got.append)
    size = chunk or len(stream)  # 0: everything in one read
    for start in range(0, len(stream), size):
        framer.feed(stream[start : start + size])
    assert got == expected
    assert framer.messages == len(expected) and not framer.buffer  # nothing left over, nothing lost


def test_stream_framer_holds_a_partial_message_until_it_is_complete() -> None:
    from agent.nat.stream import ChannelStream, channel_frame

    got: list[bytes] = []
    framer = ChannelStream(got.append)
    frame = channel_frame(0x4002, b"\x04" * 9, stream=True)  # 4 + 9 + 3 padding
    framer.feed(frame[:3])  # not even a header
    framer.feed(frame[3:13])  # header and payload, the padding not yet
    assert got == []  # the message ends where its padding ends
    framer.feed(frame[13:15])
    framer.feed(frame[15:] + frame[:2])  # the rest of the padding, then the start of the next frame
    assert got == [struct.pack("!HH", 0x4002, 9) + b"\x04" * 9]  # delivered without the padding
    framer.feed(frame[2:])
    assert len(got) == 2 and not framer.buffer


@pytest.mark.parametrize(
    ("garbage", "why"),
    [
        (b"\x80\x00\x00\x04abcd", "neither STUN nor ChannelData"),  # first bits 10
        (b"\xc0\x01\x00\x00", "neither STUN nor ChannelData"),  # first bits 11
        (b"\x50\x00\x00\x01x", "reserved channel"),  # 0x5000-0x7FFF are not channel numbers
        (b"\x00\x01\x00\x05" + bytes(16), "not a multiple of 4"),  # STUN lengths are always aligned
    ],
)
def test_stream_framer_refuses_a_stream_that_lost_its_framing(garbage: bytes, why: str) -> None:
    from agent.nat.stream import ChannelStream, FramingError, channel_frame

    got: list[bytes] = []
    framer = ChannelStream(got.append)
    good = channel_frame(0x4001, b"\x04ok", stream=True)
    with pytest.raises(FramingError, match=why):
        framer.feed(good + garbage)
    assert got == [struct.pack("!HH", 0x4001, 3) + b"\x04ok"]  # what came before is delivered
    with pytest.raises(FramingError):  # sticky: nothing after a framing loss is trusted
        framer.feed(good)
    assert len(got) == 1


def test_framer_on_aioice_tcp_client_takes_over_its_buffer_and_demultiplexes() -> None:
    """The framer replaces aioice's TurnStreamMixin on a real TurnClientTcpProtocol: bytes aioice had
    buffered are kept, ChannelData goes to the receiver as payloads, STUN responses to their transaction."""
    from aioice.turn import TurnClientTcpProtocol

    from agent.nat.ice import install_framer
    from agent.nat.stream import channel_frame

    class Transport:
        closed = False

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("198.19.0.1", 3478) if name == "peername" else default

        def close(self) -> None:
            self.closed = True

    received: list[tuple[bytes, Any]] = []
    responses: list[bytes] = []
    inner = TurnClientTcpProtocol(("198.19.0.1", 3478), "u", "p", 600, 500)
    inner.connection_made(Transport())  # type: ignore[arg-type]
    inner.receiver = type("R", (), {"datagram_received": lambda self, d, a: received.append((d, a))})()
    inner.channel_to_peer[0x4001] = ("198.19.0.9", 50000)
    first = channel_frame(0x4001, b"\x04first", stream=True)
    inner.data_received(first[:5])  # aioice's own framer holds half a message
    framer = install_framer(inner)
    assert install_framer(inner) is framer  # installing twice changes nothing

    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    response = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE, transaction_id=request.transaction_id
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = ("198.19.0.50", 4000)
    inner.transactions[request.transaction_id] = type(  # type: ignore[assignment]
        "T", (), {"response_received": lambda self, m, a: responses.append(m.transaction_id)}
    )()
    rest = first[5:] + bytes(response) + channel_frame(0x4001, b"\x04second!", stream=True)
    for i in range(0, len(rest), 6):
        inner.data_received(rest[i : i + 6])
    assert received == [(b"\x04first", ("198.19.0.9", 50000)), (b"\x04second!", ("198.19.0.9", 50000))]
    assert responses == [request.transaction_id]
    inner.data_received(b"\xff\xff\xff\xff")  # framing lost: the connection (and the allocation) is closed
    assert inner.transport.closed  # type: ignore[attr-defined]


def test_turn_urls_name_transports_in_preference_order() -> None:
    from agent.nat.transport import TurnEndpoint, parse_turn_url, turn_endpoints, udp_stun_server

    assert parse_turn_url("turn:198.19.0.1:3478?transport=udp") == TurnEndpoint("udp", "198.19.0.1", 3478)
    assert parse_turn_url("turn:198.19.0.1") == TurnEndpoint("udp", "198.19.0.1", 3478)
    assert parse_turn_url("turn:198.19.0.1:3478?transport=tcp") == TurnEndpoint("tcp", "198.19.0.1", 3478)
    assert parse_turn_url("turns:relay.example.org:443?transport=tcp") == TurnEndpoint("tls", "relay.example.org", 443)
    assert parse_turn_url("turns:198.19.0.1") == TurnEndpoint("tls", "198.19.0.1", 5349)
    assert parse_turn_url("turns:198.19.0.1:443?transport=udp") is None  # DTLS: not supported
    assert parse_turn_url("stun:198.19.0.1:3478") is None
    urls = [
        "turns:198.19.0.1:443?transport=tcp",
        "stun:198.19.0.2:3478",
        "turn:198.19.0.1:3478?transport=tcp",
        "turn:198.19.0.1:3478?transport=udp",
        "turn:198.19.0.1:port",  # malformed: skipped
    ]
    assert [e.label() for e in turn_endpoints(urls)] == [
        "198.19.0.1:3478 (udp)",
        "198.19.0.1:3478 (tcp)",
        "198.19.0.1:443 (tls)",
    ]
    assert udp_stun_server(urls) == ("198.19.0.2", 3478)  # never a TCP or TLS port
    assert udp_stun_server(urls[:1] + urls[2:3]) is None


def _old_agent_servers(urls: tuple[str, ...]) -> tuple[Any, Any]:
    """agent/nat/fallback.py `_servers` of agents before TURN over TCP/TLS (verbatim logic): the
    STUN server and TURN server such an agent takes from the map."""
    stun_server = turn = None
    for url in urls:
        if "transport=tcp" in url:
            continue
        server = parse_server(url)
        stun_server = stun_server or server
        if url.startswith("turn:") and turn is None:
            turn = server
    return stun_server, turn


def test_tcp_and_tls_relay_urls_do_not_mislead_old_agents() -> None:
    """The map may list TCP and TLS endpoints, even first: an old agent still takes the UDP ones only
    (the coordinator makes every `turns:` URL say transport=tcp, which old agents skip)."""
    from coordinator.turn import relay_credentials

    configured = ["turns:198.19.0.1:443", "turn:198.19.0.1:3478?transport=tcp", "turn:198.19.0.1:3478?transport=udp"]
    (cred,) = relay_credentials("secret", "peer1", configured, 600, now=1_000_000)
    assert cred.urls == (
        "turns:198.19.0.1:443?transport=tcp",
        "turn:198.19.0.1:3478?transport=tcp",
        "turn:198.19.0.1:3478?transport=udp",
    )
    assert _old_agent_servers(cred.urls) == (("198.19.0.1", 3478), ("198.19.0.1", 3478))
    # Without the coordinator's rewrite, an old agent would have sent UDP STUN to the TLS port:
    assert _old_agent_servers(tuple(configured))[0] == ("198.19.0.1", 443)
    # The map's wire format is unchanged (a list of URL strings), so old agents parse it as before.
    assert RelayCredential.from_wire(cred.to_wire()) == cred


class _StreamStun:
    """A STUN-over-TCP (optionally TLS) responder on loopback that counts its connections."""

    def __init__(self, tls: ssl.SSLContext | None = None, close_at_once: bool = False) -> None:
        self.tls, self.close_at_once = tls, close_at_once
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            header = await reader.readexactly(20)
            await reader.readexactly(header[2] << 8 | header[3])
            if self.close_at_once:
                return  # read the request, answer nothing, hang up
            reply = stun.Message(
                message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE, transaction_id=header[8:20]
            )
            reply.attributes["XOR-MAPPED-ADDRESS"] = ("198.19.0.77", 61000)
            writer.write(bytes(reply))
            await writer.drain()
            await asyncio.sleep(0.05)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_relay_picker_prefers_udp_and_never_opens_tcp_when_udp_answers() -> None:
    from agent.nat.transport import RelayPicker, TurnEndpoint

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(lambda: _Responder("ok"), local_addr=("127.0.0.1", 0))
        tcp = _StreamStun()
        tcp_port = await tcp.start()
        try:
            endpoints = [
                TurnEndpoint("udp", "127.0.0.1", udp.get_extra_info("sockname")[1]),
                TurnEndpoint("tcp", "127.0.0.1", tcp_port),
            ]
            picker = RelayPicker()
            pick = await picker.pick(endpoints)
            assert pick.endpoint == endpoints[0] and pick.udp_ok
            await asyncio.sleep(0.4)  # beyond the TCP probe's stagger
            assert tcp.connections == 0
            assert await picker.pick(endpoints) is pick and picker.rounds == 1  # cached, shared by all peers
        finally:
            udp.close()
            tcp.close()

    asyncio.run(scenario())


def test_relay_picker_falls_back_to_tcp_when_udp_is_blocked_and_says_why() -> None:
    from agent.nat.transport import PATIENCE, UDP_LIMIT, RelayPicker, TurnEndpoint

    async def scenario() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # "UDP blocked": nothing ever answers
        silent.bind(("127.0.0.1", 0))
        tcp = _StreamStun()
        tcp_port = await tcp.start()
        try:
            udp_ep = TurnEndpoint("udp", "127.0.0.1", silent.getsockname()[1])
            tcp_ep = TurnEndpoint("tcp", "127.0.0.1", tcp_port)
            started = time.monotonic()
            pick = await RelayPicker().pick([udp_ep, tcp_ep])
            took = time.monotonic() - started
            assert pick.endpoint == tcp_ep and not pick.udp_ok and pick.error() is None
            # UDP is passed over PATIENCE after its start once TCP answered: not its own limit, nor a sum.
            assert PATIENCE <= took < min(UDP_LIMIT, PATIENCE + 0.4)
            assert pick.probes[0].error == "no answer within 1 s (a fallback answered)"
            assert pick.probes[1].ok and tcp.connections == 1
        finally:
            silent.close()
            tcp.close()

    asyncio.run(scenario())


def test_relay_picker_names_each_dead_or_refusing_transport(tmp_path: Any) -> None:
    """TLS against an untrusted certificate, a refused TCP port, a server that hangs up, silent UDP:
    no endpoint, and an error that names the relay and every transport tried. With the CA: TLS works."""
    from agent.nat.transport import RelayPicker, TurnEndpoint
    from tests.fixtures.pki import self_signed

    certfile, keyfile = self_signed(tmp_path, "127.0.0.1")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(certfile, keyfile)

    async def scenario() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        closed = socket.socket()  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        hangup, tls = _StreamStun(close_at_once=True), _StreamStun(tls=server_tls)
        hangup_port, tls_port = await hangup.start(), await tls.start()
        try:
            endpoints = [
                TurnEndpoint("udp", "127.0.0.1", silent.getsockname()[1]),
                TurnEndpoint("tcp", "127.0.0.1", closed.getsockname()[1]),
                TurnEndpoint("tcp", "127.0.0.1", hangup_port),
                TurnEndpoint("tls", "127.0.0.1", tls_port),
            ]
            pick = await RelayPicker().pick(endpoints)  # the system CAs do not know the test CA
            assert pick.endpoint is None
            error = pick.error()
            assert error is not None and error.startswith("relay 127.0.0.1 unreachable: udp 127.0.0.1:")
            assert "no answer within 1.5 s" in error
            assert "connection refused" in error
            assert "closed the connection without answering" in error
            assert "TLS certificate not trusted" in error and "ca_file" in error
            trusted = ssl.create_default_context(cafile=str(certfile))
            pick = await RelayPicker(lambda: trusted).pick(endpoints)
            assert pick.endpoint == endpoints[3] and not pick.udp_ok
        finally:
            silent.close()
            closed.close()
            hangup.close()
            tls.close()

    asyncio.run(scenario())


def test_proxy_carries_wireguard_over_a_turn_tcp_stream() -> None:
    """PairProxy with our side on TURN over TCP (aioice's TCP client on a real loopback connection):
    WireGuard's datagrams leave as padded ChannelData on the stream; the relay's stream (messages split
    across writes, STUN in between) comes back to WireGuard as datagrams; a closed stream is `broken`."""
    from aioice.turn import TurnClientTcpProtocol, TurnTransport

    import agent.nat.relay as relay_module
    from agent.nat.ice import install_framer
    from agent.nat.stream import ChannelStream, channel_frame

    async def scenario() -> None:
        relay_got: list[bytes] = []
        writers: list[asyncio.StreamWriter] = []
        framer = ChannelStream(relay_got.append)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            while data := await reader.read(65536):
                framer.feed(data)

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        _, inner = await loop.create_connection(
            lambda: TurnClientTcpProtocol(("127.0.0.1", port), "u", "p", 600, 500), "127.0.0.1", port
        )
        peer = ("198.19.0.9", 50000)
        inner.peer_to_channel[peer], inner.channel_to_peer[0x4001] = 0x4001, peer
        install_framer(inner)
        consent: list[bytes] = []

        class Protocol:
            transport = TurnTransport(inner)

            def datagram_received(self, data: bytes, addr: Any) -> None:
                consent.append(data)

        protocol = Protocol()
        inner.receiver = protocol  # type: ignore[assignment]
        pair = SelectedPair(protocol, "relay", ("198.19.0.1", 49200), "srflx", peer, "tcp")  # type: ignore[arg-type]
        wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wg.bind(("127.0.0.1", 0))
        wg.settimeout(2)
        proxy = PairProxy(pair, wg.getsockname()[1])
        proxy_port = await proxy.start()
        try:
            assert proxy.transport == "tcp" and proxy.status()["transport"] == "tcp"
            wg.sendto(b"\x04hello", ("127.0.0.1", proxy_port))  # 6 bytes: 2 bytes of padding on the stream
            wg.sendto(b"\x04" * 1420, ("127.0.0.1", proxy_port))
            for _ in range(100):
                if len(relay_got) == 2:
                    break
                await asyncio.sleep(0.01)
            assert relay_got == [
                struct.pack("!HH", 0x4001, 6) + b"\x04hello",
                struct.pack("!HH", 0x4001, 1420) + b"\x04" * 1420,
            ]
            assert framer.messages == 2 and not framer.buffer  # the padding was there and was skipped
            # Relay -> us, cut at odd places: data, the relay's own answer to a Refresh (raw STUN on the
            # stream, for aioice's transaction), the peer's consent check (STUN inside ChannelData), data.
            refresh = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
            answered: list[bytes] = []
            inner.transactions[refresh.transaction_id] = type(  # type: ignore[assignment]
                "T", (), {"response_received": lambda self, m, a: answered.append(m.transaction_id)}
            )()
            refreshed = stun.Message(
                message_method=stun.Method.REFRESH,
                message_class=stun.Class.RESPONSE,
                transaction_id=refresh.transaction_id,
            )
            refreshed.attributes["LIFETIME"] = 600
            ping = _stun_message()
            stream = b"".join(
                [
                    channel_frame(0x4001, b"\x04one", stream=True),
                    bytes(refreshed),
                    channel_frame(0x4001, ping, stream=True),
                    channel_frame(0x4001, b"\x04two!", stream=True),
                ]
            )
            for i in range(0, len(stream), 5):
                writers[0].write(stream[i : i + 5])
                await writers[0].drain()
                await asyncio.sleep(0.001)
            got = [await loop.run_in_executor(None, wg.recv, 2000) for _ in range(2)]
            assert got == [b"\x04one", b"\x04two!"] and consent == [ping]
            assert answered == [refresh.transaction_id]
            # A stream that cannot take more (relay_module.STREAM_BACKLOG) drops like UDP would.
            backlog = relay_module.STREAM_BACKLOG
            relay_module.STREAM_BACKLOG = -1
            try:
                wg.sendto(b"\x04dropped", ("127.0.0.1", proxy_port))
                for _ in range(100):
                    if proxy.dropped:
                        break
                    await asyncio.sleep(0.01)
                assert proxy.dropped == 1
            finally:
                relay_module.STREAM_BACKLOG = backlog
            assert not proxy.broken
            writers[0].close()  # the relay goes away: the allocation is gone with the connection
            for _ in range(100):
                if proxy.broken:
                    break
                await asyncio.sleep(0.01)
            assert proxy.broken
        finally:
            proxy.close()
            wg.close()
            server.close()

    asyncio.run(scenario())


def test_fallback_hands_ice_the_picked_transport_and_leaves_udp_stun_out_when_udp_is_blocked() -> None:
    from agent.nat.transport import Pick, Probe

    host = _FakeAgent("AAAA")
    host.map = NetworkMap(
        relays=(
            RelayCredential(
                (
                    "turns:198.19.0.1:443?transport=tcp",
                    "turn:198.19.0.1:3478?transport=tcp",
                    "turn:198.19.0.1:3478?transport=udp",
                ),
                "u",
                "p",
            ),
        )
    )
    fb = Fallback(host)
    udp, tcp, tls = (e for e, _ in fb.turn_options())
    assert (udp.transport, tcp.transport, tls.transport) == ("udp", "tcp", "tls")
    default = fb._servers()
    assert default["turn_server"] == ("198.19.0.1", 3478) and default["turn_endpoint"] == udp
    assert default["stun_server"] == ("198.19.0.1", 3478)
    blocked = fb._servers(endpoint=tls, udp_ok=False)
    assert blocked["turn_server"] == ("198.19.0.1", 443) and blocked["turn_endpoint"] == tls
    assert blocked["stun_server"] is None and blocked["turn_username"] == "u"

    # On TURN over TCP: once the picker finds UDP to the relay again, the pair moves (make before break).
    conn = PeerConnection("p1", "BBBB", "peer", "100.64.0.2")
    proxy = _StubProxy()
    proxy.transport = "tcp"
    conn.nat.proxy = proxy  # type: ignore[assignment]
    mono = time.monotonic()
    fb.picker.last, fb.picker._key = Pick(tcp, [Probe(udp, error="no answer"), Probe(tcp, rtt_ms=1.0)]), (udp, tcp, tls)
    assert not fb._udp_relay_back(conn.nat, mono)
    conn.nat.next_transport_check = 0.0
    fb.picker.last = Pick(udp, [Probe(udp, rtt_ms=0.5)])
    assert fb._udp_relay_back(conn.nat, mono)
    assert not fb._udp_relay_back(conn.nat, mono + 1)  # asked again only after KEEP_STREAM
    proxy.transport = "udp"
    conn.nat.next_transport_check = 0.0
    assert not fb._udp_relay_back(conn.nat, mono)  # already on UDP: nothing to upgrade


def test_a_recovered_path_clears_the_last_error() -> None:
    conn = PeerConnection("p1", "key", "peer", "100.64.0.2")
    conn.last_error = "ICE failed: TURN 198.19.0.1:3478 (udp): no answer"
    now = time.time()
    conn.observe(0, 0, 0, None, now)
    assert conn.last_error  # still broken: still shown
    conn.observe(int(now), 10, 10, "198.19.0.12:51820", now)
    assert conn.state == PathState.DIRECT and conn.last_error is None


def test_relay_picker_passes_over_a_hanging_tcp_port_once_tls_answered(tmp_path: Any) -> None:
    """Only TCP 443 leaves: UDP gets no answer, the TCP port hangs (a SYN that is dropped: here a server
    that never answers), TLS answers. TLS is taken PATIENCE after TCP started, not after TCP's limit."""
    from agent.nat.transport import PATIENCE, STAGGER, STREAM_LIMIT, RelayPicker, TurnEndpoint
    from tests.fixtures.pki import self_signed

    certfile, keyfile = self_signed(tmp_path, "127.0.0.1", name="relay")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(certfile, keyfile)
    trusted = ssl.create_default_context(cafile=str(certfile))

    async def scenario() -> None:
        silent_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent_udp.bind(("127.0.0.1", 0))
        hanging = await asyncio.start_server(lambda r, w: asyncio.sleep(10), "127.0.0.1", 0)
        tls = _StreamStun(tls=server_tls)
        tls_port = await tls.start()
        try:
            endpoints = [
                TurnEndpoint("udp", "127.0.0.1", silent_udp.getsockname()[1]),
                TurnEndpoint("tcp", "127.0.0.1", hanging.sockets[0].getsockname()[1]),
                TurnEndpoint("tls", "127.0.0.1", tls_port),
            ]
            started = time.monotonic()
            pick = await RelayPicker(lambda: trusted).pick(endpoints)
            took = time.monotonic() - started
            assert pick.endpoint == endpoints[2], pick.describe()
            assert STAGGER + PATIENCE <= took < STAGGER + STREAM_LIMIT - 0.5
            assert "no answer within 1 s (a fallback answered)" in pick.describe()
        finally:
            silent_udp.close()
            hanging.close()
            tls.close()

    asyncio.run(scenario())


def test_proxy_sends_unpadded_channel_data_on_a_real_turn_udp_socket() -> None:
    """Over UDP (aioice's TurnClientUdpProtocol on a real socket) the proxy sends one datagram per packet,
    ChannelData without padding: the stream path must not take UDP relays (asyncio's UDP transports are
    WriteTransports too)."""
    from aioice.turn import TurnClientUdpProtocol, TurnTransport

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        relay.bind(("127.0.0.1", 0))
        relay.settimeout(2)
        _, inner = await loop.create_datagram_endpoint(
            lambda: TurnClientUdpProtocol(relay.getsockname(), "u", "p", 600, 500), remote_addr=relay.getsockname()
        )
        peer_addr = ("198.19.0.9", 50000)
        inner.peer_to_channel[peer_addr], inner.channel_to_peer[0x4003] = 0x4003, peer_addr

        class Protocol:
            transport = TurnTransport(inner)

            def datagram_received(self, data: bytes, addr: Any) -> None:
                pass

        pair = SelectedPair(Protocol(), "relay", ("198.19.0.1", 49200), "srflx", peer_addr, "udp")  # type: ignore[arg-type]
        wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wg.bind(("127.0.0.1", 0))
        proxy = PairProxy(pair, wg.getsockname()[1])
        port = await proxy.start()
        try:
            wg.sendto(b"\x04hello", ("127.0.0.1", port))
            got = await loop.run_in_executor(None, relay.recv, 2000)
            assert got == struct.pack("!HH", 0x4003, 6) + b"\x04hello"  # no padding over UDP
            assert proxy.transport == "udp" and not proxy.broken
        finally:
            proxy.close()
            inner.transport.close()
            wg.close()
            relay.close()

    asyncio.run(scenario())


def test_a_replaced_proxy_keeps_carrying_the_old_pair_for_a_grace_period() -> None:
    """Make before break on both ends: when a new pair replaces the proxy (a move to a UDP allocation, a
    credential renewal), the old proxy stays open RETIRE_GRACE s for what the peer still sends over the old
    pair, then closes with its session; its bytes stay counted; forgetting the peer closes it at once."""
    from agent.nat.fallback import RETIRE_GRACE

    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

        def sendto(self, data: bytes, addr: Any = None) -> None:
            pass

    class Protocol:
        transport = Transport()

        def datagram_received(self, data: bytes, addr: Any) -> None:
            pass

    class Session:
        closed = False
        credential_expires = 0.0

        async def close(self) -> None:
            self.closed = True

    host = _FakeAgent("AAAA")
    fb = Fallback(host)
    conn = PeerConnection("p1", "BBBB", "peer", "100.64.0.2")
    old, old_session = _StubProxy(), Session()
    old.to_peer_bytes, old.from_peer_bytes = 1000, 2000
    conn.nat.proxy, conn.nat.session = old, old_session  # type: ignore[assignment]
    conn.proxied = conn.relayed = True
    pair = SelectedPair(Protocol(), "srflx", ("198.19.0.12", 40000), "relay", ("198.19.0.1", 49200))  # type: ignore[arg-type]

    async def scenario() -> None:
        new_session = Session()
        await fb._use_pair(conn, conn.nat, pair, new_session)  # type: ignore[arg-type]
        st = conn.nat
        try:
            assert st.proxy is not None and st.proxy is not old and st.session is new_session
            assert not old.closed and not old_session.closed and len(st.retiring) == 1
            assert st.relayed_bytes() == (1000, 2000)  # still counted while it retires
            assert host.calls[-1][0] == "point_wireguard" and host.calls[-1][1] == f"127.0.0.1:{st.proxy.port}"
            mono = time.monotonic()
            await fb.tick(conn, mono + RETIRE_GRACE / 2)
            assert not old.closed
            await fb.tick(conn, mono + RETIRE_GRACE + 0.1)
            await asyncio.sleep(0)  # the session closes in the background
            assert old.closed and old_session.closed and st.retiring == []
            assert st.relayed_bytes() == (1000, 2000)
            # A second replacement, then the peer leaves the map: everything closes at once.
            third = _StubProxy()
            st.retiring.append((third, None, time.monotonic() + 60))  # type: ignore[arg-type]
        finally:
            await fb.forget(conn)
        assert third.closed

    asyncio.run(scenario())


def test_a_network_without_udp_starts_ice_at_once_and_says_so_in_its_ice_parameters() -> None:
    """When the relay answers only over TCP/TLS, direct attempts across networks cannot work: ICE starts
    without waiting DIRECT_TIMEOUT, and the ICE parameters say `relay_only` (older agents ignore it; the
    controlling side then gives direct pairs only a short head start)."""
    from agent.nat.transport import Pick, Probe

    params = IceParams("abcd", "p" * 22, ["c1"], relay_only=True)
    assert params.to_wire()["relay_only"] is True and IceParams.from_wire(params.to_wire()) == params
    old = {"ufrag": "abcd", "pwd": "p" * 22, "candidates": []}  # what an older agent sends
    assert IceParams.from_wire(old).relay_only is False and "relay_only" not in IceParams.from_wire(old).to_wire()
    assert IceParams.from_wire({**old, "relay_only": "yes"}).relay_only is False  # only a real true counts

    host = _FakeAgent("AAAA")
    host.map = NetworkMap(
        relays=(
            RelayCredential(("turn:198.19.0.1:3478?transport=udp", "turn:198.19.0.1:3478?transport=tcp"), "u", "p"),
        )
    )
    fb = Fallback(host)
    conn = PeerConnection("p1", "BBBB", "peer", "100.64.0.2")
    conn.remote_candidates([Candidate("198.19.0.12:51820", "srflx")], LAN)
    just_now = conn.first_endpoint_at + 0.01
    assert not fb.udp_blocked() and not fb.due(conn, just_now)  # nothing known: direct gets its time
    udp, tcp = (e for e, _ in fb.turn_options())
    fb.picker.last, fb.picker._key = Pick(udp, [Probe(udp, rtt_ms=1.0)]), (udp, tcp)
    assert not fb.udp_blocked() and not fb.due(conn, just_now)  # UDP works: direct gets its time
    fb.picker.last = Pick(tcp, [Probe(udp, error="no answer"), Probe(tcp, rtt_ms=1.0)], udp_ok=False)
    assert fb.udp_blocked() and fb.due(conn, just_now)
    servers = fb._servers(endpoint=tcp, udp_ok=False)
    assert servers["stun_server"] is None and servers["turn_endpoint"] == tcp


@pytest.mark.parametrize("handshake_came", [True, False])
def test_on_a_new_pair_only_the_controlling_side_initiates_at_once(handshake_came: bool) -> None:
    """Crossing WireGuard initiations stall both ends for a 5 s retry: on a new proxied pair the
    controlling side re-creates its peer (initiates) at once, the controlled side only moves its endpoint
    and initiates PROXY_FOLLOW later, unless the controlling side's handshake came through by then."""
    from agent.nat.fallback import PROXY_FOLLOW

    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    class Protocol:
        transport = Transport()

        def datagram_received(self, data: bytes, addr: Any) -> None:
            pass

    class Session:
        credential_expires = 0.0

        async def close(self) -> None:
            pass

    pair = SelectedPair(Protocol(), "srflx", ("198.19.0.12", 40000), "relay", ("198.19.0.1", 49200))  # type: ignore[arg-type]

    async def scenario() -> tuple[list[bool], list[bool]]:
        results = []
        for me, peer in (("AAAA", "BBBB"), ("CCCC", "BBBB")):  # controlling, then controlled
            host = _FakeAgent(me)
            fb = Fallback(host)
            conn = PeerConnection("p1", peer, "peer", "100.64.0.2")
            await fb._use_pair(conn, conn.nat, pair, Session())  # type: ignore[arg-type]
            if handshake_came:
                conn.last_handshake = time.time()  # the watchdog saw the controlling side's handshake
            await asyncio.sleep(PROXY_FOLLOW + 0.2)
            await fb.forget(conn)
            results.append(host.fresh)
        return results[0], results[1]

    controlling, controlled = asyncio.run(scenario())
    assert controlling == [True]
    assert controlled == ([False] if handshake_came else [False, True])
