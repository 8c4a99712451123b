"""STUN binding requests (RFC 8489) over asyncio UDP, with retransmission.

Message encoding comes from aioice's `stun` module; this module owns only the transaction: send a
binding request from a given local socket, retransmit with a doubling RTO, return the
XOR-MAPPED-ADDRESS of the answer, and classify failures so `starling status` can say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any


def _stun() -> Any:
    """aioice's STUN codec, imported on first use (importing aioice costs ~0.1 s at agent start)."""
    from aioice import stun

    return stun


class StunError(Exception):
    """No usable answer from a STUN server (timeout, error response, garbage)."""


def parse_server(url: str, default_port: int = 3478) -> tuple[str, int]:
    """`turn:198.19.0.1:3478?transport=udp` / `stun:host:port` / `host:port` -> (host, port)."""
    rest = url.split(":", 1)[1] if url.split(":", 1)[0] in ("stun", "turn", "stuns", "turns") else url
    rest = rest.split("?", 1)[0].lstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError as exc:
        raise ValueError(f"bad STUN/TURN server URL {url!r}") from exc


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

    async def binding(self, server: tuple[str, int], *, limit: float = 2.0, rto: float = 0.25) -> tuple[str, int]:
        if self.transport is None:
            loop = asyncio.get_running_loop()
            self.transport, self.protocol = await loop.create_datagram_endpoint(_Replies, sock=self.sock)
        assert self.protocol is not None
        stun = _stun()
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        request.add_fingerprint()
        payload = bytes(request)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.protocol.waiting[request.transaction_id] = future
        try:
            async with asyncio.timeout(limit):
                wait = rto
                while True:
                    self.transport.sendto(payload, server)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            answer = _match(await asyncio.shield(future), request.transaction_id)
                            if answer is not None:
                                return answer
                            raise StunError("STUN answer without a mapped address")
                    wait = min(wait * 2, 1.0)
        except TimeoutError:
            raise StunError(f"no STUN answer from {server[0]}:{server[1]} within {limit:g} s") from None
        finally:
            self.protocol.waiting.pop(request.transaction_id, None)

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


def _match(data: bytes, transaction_id: bytes) -> tuple[str, int] | None:
    stun = _stun()
    try:
        message = stun.parse_message(data)
    except ValueError:
        return None
    if message.transaction_id != transaction_id:
        return None
    if message.message_class == stun.Class.ERROR:
        code = message.attributes.get("ERROR-CODE", (0, "error"))
        raise StunError(f"STUN error {code[0]} {code[1]}")
    mapped = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get("MAPPED-ADDRESS")
    if not mapped:
        raise StunError("STUN answer without a mapped address")
    return str(mapped[0]), int(mapped[1])
