"""StreamHub: one live map stream per connected peer (Server-Sent Events).

On connect a peer gets its full map; afterwards the hub wakes its stream whenever the peer's map
may have changed and the stream sends the delta against what it delivered last (bursts coalesce:
one wake-up covers every change since). The stream also wakes to renew TURN credentials before
they expire and to send keep-alives. Writes happen in worker threads: `notify` is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from coordinator.engine.views import SentState
from coordinator.turn import credential_window

if TYPE_CHECKING:
    from coordinator.service.core import Coordinator

log = logging.getLogger(__name__)
COALESCE_SECONDS = 0.01


class Subscription:
    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.wake = asyncio.Event()
        self.replaced = False
        self.sent = SentState()


def sse(event: str, data: str, ident: int | None = None) -> str:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


class StreamHub:
    def __init__(self, coord: Coordinator) -> None:
        self.c = coord
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connected: dict[str, Subscription] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def connected_peers(self) -> int:
        return len(self.connected)

    # ----- wake-ups (any thread) ----------------------------------------------------------------
    def notify(self, peer_ids: set[str]) -> None:
        if not peer_ids or self.loop is None or self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._wake, peer_ids)

    def notify_all(self) -> None:
        self.notify(set(self.connected))

    def _wake(self, peer_ids: set[str]) -> None:
        connected = self.connected
        if len(peer_ids) > len(connected):
            targets = [sub for pid, sub in connected.items() if pid in peer_ids]
        else:
            targets = [sub for pid in peer_ids if (sub := connected.get(pid)) is not None]
        for sub in targets:
            sub.wake.set()

    # ----- one stream ---------------------------------------------------------------------------
    async def stream(self, peer_id: str) -> AsyncIterator[str]:
        sub = Subscription(peer_id)
        old = self.connected.get(peer_id)
        if old is not None:
            old.replaced = True
            old.wake.set()
        self.connected[peer_id] = sub
        metrics = self.c.metrics
        metrics.stream_clients.inc()
        await asyncio.to_thread(self.c.peers.mark_connected, peer_id, True)
        try:
            first = self._render(sub, full=True)
            if first is None:
                return
            metrics.stream_messages.labels("map").inc()
            yield first
            heartbeat = self.c.config.stream_heartbeat
            while True:
                timeout = heartbeat
                settings = self.c.graph.settings
                if settings is not None and settings.turn_servers:
                    _, renew_at = credential_window(settings.credential_ttl)
                    timeout = max(0.05, min(timeout, renew_at - time.time() + 0.05))
                woke = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await sub.wake.wait()
                    woke = True
                if woke:
                    await asyncio.sleep(COALESCE_SECONDS)
                sub.wake.clear()
                if sub.replaced:
                    yield sse("closed", '{"reason":"replaced by a newer stream"}')
                    return
                message = self._render(sub, full=False)
                if message is None:
                    if peer_id not in self.c.graph.peers:
                        yield sse("deleted", '{"reason":"peer was removed from the mesh"}')
                        return
                    if not woke:
                        yield ": keep-alive\n\n"
                    continue
                metrics.stream_messages.labels("delta").inc()
                yield message
        finally:
            metrics.stream_clients.dec()
            if self.connected.get(peer_id) is sub:
                del self.connected[peer_id]
                # Not awaited: a client that goes away ends this generator by cancellation, and an awaited
                # to_thread would be cancelled before its job starts, leaving the peer marked connected.
                asyncio.get_running_loop().run_in_executor(None, self._mark_disconnected, peer_id)

    def _mark_disconnected(self, peer_id: str) -> None:
        if peer_id in self.connected:  # a newer stream of the same peer took over meanwhile
            return
        try:
            self.c.peers.mark_connected(peer_id, False)
        except Exception:
            log.exception("could not mark peer %s disconnected", peer_id)

    def _render(self, sub: Subscription, *, full: bool) -> str | None:
        c = self.c
        with c.lock:
            node = c.graph.peers.get(sub.peer_id)
            if node is None:
                return None
            relays = c.relays_for(node.name)
            if full:
                return sse("map", c.renderer.full(sub.peer_id, relays, sub.sent), c.graph.maps[sub.peer_id].serial)
            text = c.renderer.delta(sub.peer_id, relays, sub.sent)
            if text is None:
                return None
            kind = "map" if text.startswith('{"type":"map"') else "delta"
            return sse(kind, text, sub.sent.serial)
