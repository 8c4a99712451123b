"""Live updates for open dashboards: one shared poller, fanned out over Server-Sent Events.

Every `interval` seconds (1 s by default), while a dashboard is open, ONE task per process reads a
cheap version of the peers table (graph revision, peer count, online count, newest `last_seen` and
newest report time: a single aggregate query). Only when it changed does it fetch the rows that may
have changed -- those whose `last_seen` or report time moved since the previous poll (minus a
2 s margin for transactions that commit late), plus peers the in-memory graph shows as new or
renamed -- compare them with the rows it holds, format just the changed ones and push them, as one
pre-serialized message, to every open `/dashboard/events` stream. Removed peers come from the graph.
The cost is therefore independent of how many dashboards are open; each open dashboard costs one
idle coroutine and a queue. The work runs in a worker thread, off the event loop.

Why a poll and not the hub's notifications: `StreamHub.notify` fires for graph (map) changes only,
while the dashboard mostly shows things that never touch the graph: streams opening and closing
(`peers.mark_connected`) and agent state reports (`peers.report_state`) -- both update `last_seen`,
which the version query watches. It also works across replicas sharing one database.

A page passes its render time as `since`; a new stream first replays every change the poller saw
after that time, so nothing falls between the page render and the stream opening. The poller
stops `idle_grace` seconds after the last dashboard closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from coordinator.dashboard import data
from coordinator.service.core import Coordinator

log = logging.getLogger(__name__)
QUEUE_MAX = 64
RESYNC = "event: resync\ndata: {}\n\n"
BIG_CHANGE = 200  # above this many changed peers, a message leaves out the connection details


def sse(event: str, payload: dict[str, Any], ident: int | None = None) -> str:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass
class Poll:
    """What one poll found (computed in a worker thread from a frozen copy of the feed's state)."""

    version: data.Version
    changed: dict[str, tuple[data.RawRow, dict[str, Any]]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class LiveFeed:
    def __init__(self, interval: float = 1.0, idle_grace: float = 30.0) -> None:
        self.interval = interval
        self.idle_grace = idle_grace
        self.coord: Coordinator | None = None
        self.subscribers: set[asyncio.Queue[str]] = set()
        self.rows: dict[str, data.RawRow] = {}  # as last fetched: what the next poll compares with
        self.entries: dict[str, tuple[dict[str, Any], float, float]] = {}  # id -> (entry, changed_at, added_at)
        self.removed: deque[tuple[str, float]] = deque(maxlen=10_000)
        self.version: data.Version | None = None
        self.seq = 0
        self.polls = 0
        self.changes = 0
        self.last_touch = 0.0
        self.task: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None

    # ----- lifecycle ----------------------------------------------------------------------------
    async def ensure_started(self, coord: Coordinator) -> None:
        """Start the poller (taking the baseline first) unless it runs; keeps it alive for a while."""
        self.last_touch = time.monotonic()
        if self.task is not None and not self.task.done() and self.coord is coord:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.task is not None and not self.task.done() and self.coord is coord:
                return
            if self.task is not None:
                self.task.cancel()
            baseline = await asyncio.to_thread(self._poll, coord, None, {})
            self.coord = coord
            self.version = baseline.version
            self.rows = {pid: row for pid, (row, _) in baseline.changed.items()}
            self.entries = {pid: (entry, 0.0, 0.0) for pid, (_, entry) in baseline.changed.items()}
            self.removed.clear()
            self.task = asyncio.create_task(self._run(coord), name="dashboard-live-feed")
            log.debug("dashboard live feed started with %d peers", len(self.rows))

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----- subscribers --------------------------------------------------------------------------
    def subscribe(self, since: float | None) -> tuple[asyncio.Queue[str], str | None]:
        """A queue of ready SSE messages, and the replay of changes seen after `since` (if any)."""
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_MAX)
        self.subscribers.add(queue)
        self.last_touch = time.monotonic()
        replay = None
        if since is not None:
            changed = [e for e, changed_at, _ in self.entries.values() if changed_at >= since]
            added = [pid for pid, (_, _, added_at) in self.entries.items() if added_at >= since]
            removed = [pid for pid, at in self.removed if at >= since]
            if changed or removed:
                replay = self._message(changed, added, removed, time.time())
        return queue, replay

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self.subscribers.discard(queue)
        self.last_touch = time.monotonic()

    # ----- the poller ---------------------------------------------------------------------------
    async def _run(self, coord: Coordinator) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.subscribers and time.monotonic() - self.last_touch > self.idle_grace:
                self.version = None
                self.rows, self.entries = {}, {}
                self.task = None
                return
            try:
                await self.poll_once(coord)
            except Exception:  # keep polling: the next round retries
                log.exception("dashboard live feed: poll failed")

    async def poll_once(self, coord: Coordinator) -> None:
        found = await asyncio.to_thread(self._poll, coord, self.version, dict(self.rows))
        self.polls += 1
        self._apply(found)

    @staticmethod
    def _poll(coord: Coordinator, old: data.Version | None, known: dict[str, data.RawRow]) -> Poll:
        """Runs in a worker thread; `known` is a private copy of the rows the feed holds."""
        version = data.version(coord)
        found = Poll(version)
        if version == old:
            return found
        names = data.peer_names(coord)
        mark = old.watermark() if old is not None else None
        if old is None or mark is None:
            rows = data.live_rows(coord)
        else:
            # peers that appeared or were renamed since the last poll, by the in-memory graph
            fresh = [pid for pid, name in names.items() if pid not in known or known[pid][0] != name]
            rows = data.live_rows(coord, mark - data.SNAPSHOT_MARGIN, fresh)
        for pid, row in rows.items():
            if known.get(pid) != row:
                found.changed[pid] = (row, data.live_entry(pid, row, names))
                if pid not in known and old is not None:
                    found.added.append(pid)
        if old is not None:
            found.removed = [pid for pid in known if pid not in names]
        return found

    def _apply(self, found: Poll) -> None:
        self.version = found.version
        if not (found.changed or found.removed):
            return
        self.changes += 1
        now = time.time()
        changed: list[dict[str, Any]] = []
        for pid, (row, entry) in found.changed.items():
            self.rows[pid] = row
            added_at = now if pid in found.added else self.entries.get(pid, ({}, 0.0, 0.0))[2]
            self.entries[pid] = (entry, now, added_at)
            changed.append(entry)
        for pid in found.removed:
            self.rows.pop(pid, None)
            self.entries.pop(pid, None)
            self.removed.append((pid, now))
        message = self._message(changed, found.added, found.removed, now)
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # a stalled client: tell it to reload instead of buffering
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
                queue.put_nowait(RESYNC)

    def _message(self, changed: list[dict[str, Any]], added: list[str], removed: list[str], now: float) -> str:
        self.seq += 1
        if len(changed) > BIG_CHANGE:  # e.g. a restart reconnecting every agent: status and paths only
            changed = [{**e, "connections": None} for e in changed]
        online = sum(1 for e, _, _ in self.entries.values() if e["connected"])
        payload = {
            "seq": self.seq,
            "time": now,
            "peers": changed,
            "added": added,
            "removed": removed,
            "total": len(self.entries),
            "online": online,
        }
        return sse("peers", payload, self.seq)
