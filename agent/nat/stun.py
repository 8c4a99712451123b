"""STUN binding requests (RFC 8489) over asyncio UDP, with retransmission, and STUN/TURN server URLs.

Message encoding comes from aioice's `stun` module; this module owns only the transaction: send a
binding request from a given local socket, retransmit with a doubling RTO, return the
XOR-MAPPED-ADDRESS of the answer, and classify failures so `starling status` can say why.
`binding_request`/`read_answer` are the one codec of a binding transaction for every transport
(UDP here, TCP and TLS streams in `agent.nat.transport`, `starling netcheck`), and `parse_url` the
one parser of `stun:`/`stuns:`/`turn:`/`turns:` URLs (RFC 7064/7065).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Transport = Literal["udp", "tcp", "tls"]
SCHEMES = ("stun", "stuns", "turn", "turns")


def _stun() -> Any:
    """aioice's STUN codec, imported on first use (importing aioice costs ~0.1 s at agent start)."""
    from aioice import stun

    return stun


class StunError(Exception):
    """No usable answer from a STUN server (timeout, error response, garbage)."""


class StunTimeout(StunError):
    """No answer at all within the time limit."""


# ----- URLs ---------------------------------------------------------------------------------------
class UnsupportedTransport(ValueError):
    """A well-formed URL for a transport Starling does not speak (DTLS, SCTP, ...)."""


@dataclass(frozen=True, slots=True)
class ServerUrl:
    """One STUN/TURN server URL: `turn:h:p?transport=tcp`, `turns:h:p`, `stun:[::1]:3478`, `h:p`."""

    url: str
    scheme: str  # stun | stuns | turn | turns (a bare "host[:port]" is a stun: URL)
    host: str
    port: int
    transport: Transport  # udp | tcp | tls (stuns:, turns:)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def _split(url: str, default_port: int | None = None) -> tuple[str, str, int, dict[str, str]]:
    """(scheme, host, port, query parameters) of `url`; ValueError for a malformed host or port.
    Without `default_port` the port defaults per scheme: 5349 for stuns:/turns:, else 3478."""
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        scheme, rest = "stun", url
    rest, _, query = rest.lstrip("/").partition("?")
    params = dict(p.partition("=")[::2] for p in query.lower().split("&") if p)
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""  # a bare name, or an IPv6 literal without brackets
    default = default_port or (5349 if scheme in ("stuns", "turns") else 3478)
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        raise ValueError(f"bad STUN/TURN server URL {url!r}: bad port {port_text!r}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad STUN/TURN server URL {url!r}: no host or bad port")
    return scheme, host, port, params


def parse_url(url: str) -> ServerUrl:
    """The server and transport a URL names; ValueError if malformed, `UnsupportedTransport` (a
    ValueError) for `?transport=` other than udp/tcp and for DTLS (`stuns:`/`turns:` over UDP)."""
    scheme, host, port, params = _split(url)
    tls = scheme in ("stuns", "turns")
    wanted = params.get("transport", "tcp" if tls else "udp")
    if wanted not in ("udp", "tcp"):
        raise UnsupportedTransport(f"{url!r}: transport={wanted} (udp or tcp)")
    if tls and wanted == "udp":
        raise UnsupportedTransport(f"{url!r}: {scheme}: runs over TCP (DTLS is not supported)")
    return ServerUrl(url, scheme, host, port, "tls" if tls else "tcp" if wanted == "tcp" else "udp")


def parse_server(url: str, default_port: int = 3478) -> tuple[str, int]:
    """`turn:198.19.0.1:3478?transport=udp` / `stun:host:port` / `host:port` -> (host, port)."""
    _scheme, host, port, _params = _split(url, default_port)
    return host, port


# ----- the binding transaction --------------------------------------------------------------------
class Answer(NamedTuple):
    mapped: tuple[str, int] | None  # XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS)
    other: tuple[str, int] | None  # OTHER-ADDRESS (RFC 5780), when the server names one


def binding_request() -> tuple[bytes, bytes]:
    """(the encoded binding request, its transaction id)."""
    stun = _stun()
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    request.add_fingerprint()
    return bytes(request), request.transaction_id


def read_answer(data: bytes, transaction_id: bytes) -> Answer:
    """The addresses in the answer to our request; StunError for an error response, another
    transaction's answer, or no STUN message at all."""
    stun = _stun()
    try:
        message = stun.parse_message(data)
    except ValueError as exc:
        raise StunError(f"not a STUN message ({exc})") from None
    if message.transaction_id != transaction_id:
        raise StunError("answer to another request")
    if message.message_class == stun.Class.ERROR:
        code = message.attributes.get("ERROR-CODE", (0, "error"))
        raise StunError(f"STUN error {code[0]} {code[1]}")
    mapped = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get("MAPPED-ADDRESS")
    other = message.attributes.get("OTHER-ADDRESS")
    return Answer(
        (str(mapped[0]), int(mapped[1])) if mapped else None,
        (str(other[0]), int(other[1])) if other else None,
    )


class _Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 20:
            future = self.waiting.get(data[8:20])  # the transaction id
            if future is not None and not future.done():
                future.set_result(data)


class StunClient:
    """Binding requests from one UDP socket that stays open (and so keeps its port) between calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None
        self.protocol: _Replies | None = None

    async def open(self) -> _Replies:
        """Start receiving on the socket (done by the first transaction; call it first when several
        transactions start at once)."""
        if self.protocol is None:
            loop = asyncio.get_running_loop()
            self.transport, self.protocol = await loop.create_datagram_endpoint(_Replies, sock=self.sock)
        return self.protocol

    async def exchange(
        self, server: tuple[str, int], *, limit: float = 2.0, rto: float | None = 0.25
    ) -> tuple[float, Answer]:
        """One binding transaction: (round trip in ms since the first send, the answer). The request is
        retransmitted after `rto` s, doubling up to 1 s, until `limit`; `rto` None sends it once.
        StunTimeout without an answer, StunError for an unusable one."""
        protocol = await self.open()
        assert self.transport is not None
        payload, transaction_id = binding_request()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        protocol.waiting[transaction_id] = future
        try:
            started = time.perf_counter()
            async with asyncio.timeout(limit):
                wait = rto
                while True:
                    self.transport.sendto(payload, server)
                    if wait is None:
                        data = await future
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            data = await asyncio.shield(future)
                            break
                    wait = min(wait * 2, 1.0)
            rtt = (time.perf_counter() - started) * 1000
        except TimeoutError:
            raise StunTimeout(f"no STUN answer from {server[0]}:{server[1]} within {limit:g} s") from None
        finally:
            protocol.waiting.pop(transaction_id, None)
        return rtt, read_answer(data, transaction_id)

    async def binding(self, server: tuple[str, int], *, limit: float = 2.0, rto: float = 0.25) -> tuple[str, int]:
        """Our mapped address as `server` sees it."""
        _rtt, answer = await self.exchange(server, limit=limit, rto=rto)
        if answer.mapped is None:
            raise StunError("STUN answer without a mapped address")
        return answer.mapped

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        else:
            self.sock.close()
        self.transport = self.protocol = None


async def binding(
    sock: socket.socket, server: tuple[str, int], *, limit: float = 2.0, rto: float = 0.25
) -> tuple[str, int]:
    """One binding request from `sock` (bound, non-blocking UDP), which is closed afterwards."""
    client = StunClient(sock)
    try:
        return await client.binding(server, limit=limit, rto=rto)
    finally:
        client.close()
