"""The lean proxy between WireGuard and an ICE pair that WireGuard cannot use by itself.

WireGuard's endpoint for the peer becomes `127.0.0.1:<proxy port>`; the proxy moves each datagram
with one `sendto` each way and no task, coroutine or queue per packet:

- WireGuard -> peer: when our side of the pair is a TURN relay, the datagram is framed as TURN
  ChannelData and written straight onto the TURN server socket (the channel was bound by the ICE
  checks; aioice refreshes it with the consent checks, which keeps permissions alive too). When
  our side is a plain socket (the peer is the relayed one), it is sent from the ICE socket to the
  peer's relayed address.
- peer -> WireGuard: the ICE socket's protocol gets the payload (aioice already stripped the TURN
  framing); STUN (consent checks) still goes to aioice, everything else is sent to WireGuard.
- TURN over TCP or TLS (our relay reached over a stream because UDP to it is blocked): the same
  ChannelData, padded to a multiple of four bytes (RFC 8656 §12.5), written to the stream; the
  stream is cut back into messages by `agent.nat.stream.ChannelStream` (installed on aioice's TURN
  client when the session gathered). A stream never drops, it queues: when more than
  `STREAM_BACKLOG` bytes wait to be written, further datagrams are dropped as UDP would drop them
  (WireGuard's inner TCP slows down instead of the queue growing), and counted in `dropped`.

Socket buffers are enlarged on both ends. Counters feed `starling status` and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import Any, cast

from aioice.ice import StunProtocol
from aioice.turn import TurnClientTcpProtocol

from agent.nat.ice import SelectedPair
from agent.nat.stream import channel_frame
from agent.status import ProxyStatus

log = logging.getLogger("starling.agent.relay")
BUFFER = 4 * 1024 * 1024
STREAM_BACKLOG = 256 * 1024  # bytes waiting in a TURN-over-TCP/TLS stream before datagrams are dropped
STUN_COOKIE = b"\x21\x12\xa4\x42"


def is_stun(data: bytes) -> bool:
    """STUN: top two bits zero, a length field that matches the datagram, the magic cookie.

    A WireGuard message starts with its type byte and three zero bytes, so its "length" would be 0,
    and no WireGuard message is as short as 20 bytes: the two can never be confused.
    """
    return (
        len(data) >= 20 and data[0] < 0x40 and data[4:8] == STUN_COOKIE and (data[2] << 8 | data[3]) == len(data) - 20
    )


def _turn_inner(protocol: StunProtocol) -> Any:
    """The TURN client protocol behind a relayed ICE candidate (aioice keeps it name-mangled)."""
    inner = getattr(protocol.transport, "_TurnTransport__inner_protocol", None)
    if inner is None or not hasattr(inner, "peer_to_channel"):
        raise RuntimeError("this aioice version hides its TURN client differently; pin aioice to a tested release")
    return inner


def _grow_buffers(sock: socket.socket | None) -> None:
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER)


class _WireGuardSide(asyncio.DatagramProtocol):
    def __init__(self, proxy: PairProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy.from_wireguard(data, addr)


class PairProxy:
    """Moves WireGuard datagrams over one selected ICE pair."""

    def __init__(self, pair: SelectedPair, wg_port: int) -> None:
        self.pair = pair
        self.wg_addr = ("127.0.0.1", wg_port)
        self.remote = pair.remote_address
        self.local: asyncio.DatagramTransport | None = None
        self.port = 0
        self.to_peer_packets = self.to_peer_bytes = 0
        self.from_peer_packets = self.from_peer_bytes = 0
        self.dropped = 0
        self.last_heard = time.monotonic()  # any datagram from the peer: data or ICE consent checks
        self._inner: Any = None
        self._turn_socket: asyncio.DatagramTransport | None = None
        self._turn_stream: asyncio.WriteTransport | None = None  # TURN over TCP/TLS
        self._original_receive: Any = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _WireGuardSide(self), local_addr=("127.0.0.1", 0))
        self.local = transport
        _grow_buffers(self.local.get_extra_info("socket"))
        self.port = self.local.get_extra_info("sockname")[1]
        protocol = self.pair.protocol
        if self.pair.local_type == "relay":
            self._inner = _turn_inner(protocol)
            if isinstance(self._inner, TurnClientTcpProtocol):  # (asyncio's UDP transports are WriteTransports too)
                self._turn_stream = self._inner.transport  # TCP or TLS: the kernel sizes its buffers
            else:
                self._turn_socket = self._inner.transport
                _grow_buffers(self._turn_socket.get_extra_info("socket") if self._turn_socket else None)
        else:
            _grow_buffers(protocol.transport.get_extra_info("socket"))
        # Take the peer->us direction: payloads that are not STUN go to WireGuard.
        self._original_receive = protocol.datagram_received
        protocol.datagram_received = self._from_peer  # type: ignore[method-assign]
        log.info("proxy 127.0.0.1:%d <-> %s", self.port, self.pair.describe())
        return self.port

    # ----- the two hot paths ------------------------------------------------------------------
    def from_wireguard(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[1] != self.wg_addr[1]:
            self.dropped += 1  # only our WireGuard may use the proxy
            return
        inner = self._inner
        if inner is not None:
            channel = inner.peer_to_channel.get(self.remote)
            if channel is not None and self._turn_socket is not None:
                self._turn_socket.sendto(struct.pack("!HH", channel, len(data)) + data)
            elif channel is not None and self._turn_stream is not None:
                stream = self._turn_stream
                if stream.is_closing() or stream.get_write_buffer_size() > STREAM_BACKLOG:
                    self.dropped += 1
                    return
                stream.write(channel_frame(channel, data, stream=True))
            else:
                self.pair.protocol.transport.sendto(data, self.remote)  # binds the channel (rare)
        else:
            self.pair.protocol.transport.sendto(data, self.remote)
        self.to_peer_packets += 1
        self.to_peer_bytes += len(data)

    def _from_peer(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        payload = cast(bytes, data)
        self.last_heard = time.monotonic()
        if is_stun(payload):
            self._original_receive(data, addr)
            return
        if self.local is not None:
            self.local.sendto(payload, self.wg_addr)
            self.from_peer_packets += 1
            self.from_peer_bytes += len(payload)

    # ----- lifecycle --------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """How our side reaches the relay ("udp", "tcp", "tls"), or "udp" when our side is no relay."""
        return self.pair.turn_transport or "udp"

    @property
    def broken(self) -> bool:
        """Our TURN-over-TCP/TLS stream closed (relay gone, connection reset, framing lost): the
        allocation went with it, there is no point waiting for silence."""
        return self._turn_stream is not None and self._turn_stream.is_closing()

    def close(self) -> None:
        if self._original_receive is not None:
            self.pair.protocol.datagram_received = self._original_receive  # type: ignore[method-assign]
        if self.local is not None:
            self.local.close()
            self.local = None

    def status(self) -> ProxyStatus:
        return {
            "listen": f"127.0.0.1:{self.port}",
            "pair": self.pair.describe(),
            "transport": self.transport,
            "to_peer_bytes": self.to_peer_bytes,
            "from_peer_bytes": self.from_peer_bytes,
            "to_peer_packets": self.to_peer_packets,
            "from_peer_packets": self.from_peer_packets,
            "dropped": self.dropped,
        }
