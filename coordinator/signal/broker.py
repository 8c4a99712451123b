"""The broker: which peer key is connected where, routing of boxes between them, per-peer buckets.

A `Connection` owns one accepted WebSocket's outbound side: a bounded queue drained by a writer task,
so a slow recipient never stalls another peer's read loop (it is closed with 1013 when its queue is
full). A peer's own read loop waits for `drained` instead, so a client that does not read its replies
(pongs, errors) only slows itself down.
The broker keeps one connection per key: a new one replaces the old (closed with 4409 "replaced").
Nothing is persisted; everything here lives in memory for the life of the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from coordinator.signal.metrics import SignalMetrics
from coordinator.signal.ratelimit import TokenBucket
from starling_proto import signal as protocol

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
CloseSocket = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class Connection:
    """The outbound side of one peer's WebSocket."""

    def __init__(self, peer: str, name: str, send_text: SendText, close_socket: CloseSocket, queue_limit: int) -> None:
        self.peer = peer
        self.name = name
        self._send_text = send_text
        self._close_socket = close_socket
        self._queue: asyncio.Queue[str | _Close] = asyncio.Queue()
        self._queue_limit = queue_limit
        self.closing: _Close | None = None
        self.closing_requested = asyncio.Event()
        self.drained = asyncio.Event()  # set while the backlog is under half the queue limit
        self.drained.set()

    def __repr__(self) -> str:
        return f"<Connection {self.name or '?'} {self.peer[:8]}…>"

    def push(self, text: str) -> bool:
        """Queue a frame; False if the connection is closing (or was just closed for being too slow)."""
        if self.closing is not None:
            return False
        if self._queue.qsize() >= self._queue_limit:
            log.warning("%r: send queue full, closing", self)
            self.close(protocol.CLOSE_TRY_AGAIN, "send queue full (client too slow)")
            return False
        self._queue.put_nowait(text)
        if self._queue.qsize() >= self._queue_limit // 2:
            self.drained.clear()
        return True

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close with `code`/`reason` (idempotent: the first close wins)."""
        if self.closing is None:
            self.closing = _Close(code, reason)
            self._queue.put_nowait(self.closing)
            self.closing_requested.set()

    async def write_loop(self) -> None:
        """Drain the queue onto the socket until a close is sent or the socket fails."""
        while True:
            item = await self._queue.get()
            if self._queue.qsize() < self._queue_limit // 2:
                self.drained.set()
            if isinstance(item, _Close):
                await self._close_socket(item.code, item.reason)
                return
            await self._send_text(item)


class Broker:
    def __init__(self, metrics: SignalMetrics, rate: float, burst: int) -> None:
        self.metrics = metrics
        self.rate = rate
        self.burst = burst
        self.connections: dict[str, Connection] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._last_sweep = time.monotonic()

    def register(self, conn: Connection) -> None:
        """Make `conn` the connection of its key; an older one is closed with 4409 "replaced"."""
        old = self.connections.get(conn.peer)
        self.connections[conn.peer] = conn
        self.metrics.connected_peers.set(len(self.connections))
        if old is not None:
            log.info("%r replaced by a new connection for the same key", old)
            old.close(protocol.CLOSE_REPLACED, "replaced")
        self._sweep_buckets()

    def unregister(self, conn: Connection) -> None:
        if self.connections.get(conn.peer) is conn:
            del self.connections[conn.peer]
            self.metrics.connected_peers.set(len(self.connections))

    def bucket(self, peer: str) -> TokenBucket:
        """The peer's bucket; it outlives a connection so reconnecting does not refill it."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.rate, self.burst)
        return bucket

    def _sweep_buckets(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 10.0:
            return
        self._last_sweep = now
        for peer in [p for p, b in self._buckets.items() if p not in self.connections and b.full]:
            del self._buckets[peer]

    def route(self, sender: Connection, frame: protocol.SendFrame) -> None:
        """Forward a box to its recipient, or tell the sender that the recipient is offline."""
        target = self.connections.get(frame.to)
        if target is not None and target.push(protocol.message(sender.peer, frame.id, frame.box)):
            self.metrics.forwarded.inc()
            return
        self.metrics.dropped.labels("offline").inc()
        log.debug("%r -> %s: recipient offline", sender, frame.to)
        sender.push(protocol.offline(frame.to, frame.id))

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections.values()):
            conn.close(code, reason)
