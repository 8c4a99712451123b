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
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from coordinator.engine.views import SentState
from coordinator.maps import Rendered
from coordinator.metrics import Metrics

log = logging.getLogger(__name__)
COALESCE_SECONDS = 0.01


class MapSource(Protocol):
    """Where the hub gets what to send (coordinator.maps.MapService)."""

    def is_member(self, peer_id: str) -> bool: ...

    def render(self, peer_id: str, sent: SentState, *, full: bool) -> Rendered | None: ...

    def renewal_in(self) -> float | None: ...


Presence = Callable[[str, bool], None]  # mark a peer connected / disconnected (runs in a worker thread)


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
    def __init__(self, maps: MapSource, presence: Presence, metrics: Metrics, heartbeat: float) -> None:
        self.maps = maps
        self.presence = presence
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connected: dict[str, Subscription] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def connected_peers(self) -> int:
        return len(self.connected)

    def connected_ids(self) -> set[str]:
        return set(self.connected)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self.connected

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
        metrics = self.metrics
        metrics.stream_clients.inc()
        await asyncio.to_thread(self.presence, peer_id, True)
        try:
            first = self._render(sub, full=True)
            if first is None:
                return
            metrics.stream_messages.labels("map").inc()
            yield first
            while True:
                timeout = self.heartbeat
                renewal = self.maps.renewal_in()
                if renewal is not None:
                    timeout = max(0.05, min(timeout, renewal + 0.05))
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
                    if not self.maps.is_member(peer_id):
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
            self.presence(peer_id, False)
        except Exception:
            log.exception("could not mark peer %s disconnected", peer_id)

    def _render(self, sub: Subscription, *, full: bool) -> str | None:
        rendered = self.maps.render(sub.peer_id, sub.sent, full=full)
        return None if rendered is None else sse(rendered.kind, rendered.text, rendered.serial)
