"""One remote peer (`PeerLink`): its map entry, its WireGuard peer, its path and the tasks acting for it.

The path is a `PeerConnection` (direct candidates, the state machine, and the ICE/relay state in
`conn.nat` that `agent.nat.fallback` drives). A link talks to the rest of the agent only through
narrow ports: the WireGuard device (`agent.wg.port.WireGuardPort`), offers over signal (`Offers`),
the networks we are on (`LocalNets`), the NAT fallback (`PathControl`) and the clock (`Clock`). The
daemon creates, updates and closes links as the map changes (agent.daemon: the reconciler).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from agent.nat.fallback import KINDS as NAT_KINDS
from agent.peers import Candidate, PathState, PeerConnection
from agent.wg.backend import PeerConfig, PeerStats
from agent.wg.port import WireGuardPort
from starling_proto.netmap import PeerEntry

log = logging.getLogger("starling.agent")
FOLLOW_DELAY = 0.3  # s the controlled side of a pair waits before initiating (see `use_candidates`)
OLD_KEY_GRACE = 5.0  # s a neighbour's old key stays (without allowed IPs) after it rotated


class Offers(Protocol):
    """Sends our candidates to a peer over signal ("offer" or "answer"); False when signal is down."""

    async def offer(self, conn: PeerConnection, kind: str) -> bool: ...


class LocalNets(Protocol):
    async def local_nets(self) -> list[ipaddress.IPv4Network]: ...


class PathControl(Protocol):
    """The NAT fallback (agent.nat.fallback.Fallback) as one peer's link sees it."""

    def controlling(self, conn: PeerConnection) -> bool: ...

    async def on_message(self, conn: PeerConnection, kind: str, body: Any) -> None: ...

    async def tick(self, conn: PeerConnection, mono: float) -> None: ...

    async def path_lost(self, conn: PeerConnection) -> None: ...

    async def forget(self, conn: PeerConnection) -> None: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class PeerLink:
    """Everything about one remote peer, from the moment it enters our map until it leaves."""

    def __init__(
        self,
        entry: PeerEntry,
        *,
        keepalive: int,
        wg: WireGuardPort,
        offers: Offers,
        nets: LocalNets,
        nat: PathControl,
        clock: Clock | None = None,
    ) -> None:
        self.entry = entry
        self.keepalive = keepalive
        self.wg, self.offers, self.nets, self.nat = wg, offers, nets, nat
        self.clock = clock or SystemClock()
        self.conn = PeerConnection(entry.id, entry.public_key, entry.name, entry.mesh_ip)
        self.conn.set_state(PathState.CONNECTING)
        self.conn.path_changes = 0
        self.routed: tuple[str, ...] = ()  # route prefixes this peer is the active routing peer for (ours)
        self.route_keepalive = 0  # > 0: we route for this peer: keepalive that often, so it sees us up
        self._retiring: set[str] = set()  # the peer's old keys, removed after OLD_KEY_GRACE
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    # ----- WireGuard ----------------------------------------------------------------------------
    @property
    def allowed_ips(self) -> tuple[str, ...]:
        """The peer's own addresses, plus the route prefixes it carries for us now."""
        return self.entry.allowed_ips + self.routed

    def config(self, endpoint: str | None) -> PeerConfig:
        # No keepalive before an endpoint is known: wireguard-go would try a handshake at once, fail
        # ("no known endpoint") and then wait its 5 s rekey timeout even after the endpoint arrives.
        # Setting keepalive together with the first endpoint starts the handshake immediately.
        intervals = [k for k in (self.keepalive, self.route_keepalive) if k > 0]
        keepalive = min(intervals) if intervals and endpoint else 0
        return PeerConfig(self.entry.public_key, self.allowed_ips, endpoint, keepalive)

    async def set_routing(self, routed: tuple[str, ...], route_keepalive: int) -> None:
        """Routes moved: the prefixes this peer carries for us, and whether we keep it informed that we
        are up (we are its routing peer). Applied to WireGuard only when something changed."""
        if (routed, route_keepalive) == (self.routed, self.route_keepalive):
            return
        self.routed, self.route_keepalive = routed, route_keepalive
        if not self.closed:
            await self.wg.set_peer(self.config(self.conn.endpoint))

    async def point(self, endpoint: str, *, fresh: bool) -> None:
        """Point WireGuard at `endpoint`; `fresh` re-creates the peer so the handshake starts now
        (WireGuard sends at most one initiation per 5 s to a peer)."""
        if self.closed:
            return
        self.conn.endpoint, self.conn.endpoint_set_at = endpoint, self.clock.monotonic()
        if fresh:
            await self.wg.remove_peer(self.entry.public_key)
        await self.wg.set_peer(self.config(endpoint))

    async def nudge(self, endpoint: str | None = None) -> None:
        """Make WireGuard send one keepalive to the peer now (it sends one when keepalive goes 0 -> n),
        to `endpoint` (default: the connection's). The endpoint is read once: both updates must
        carry the same one, whatever changes `conn.endpoint` while the first is being applied."""
        endpoint = endpoint or self.conn.endpoint
        if self.closed or not endpoint:
            return
        await self.wg.set_peer(PeerConfig(self.entry.public_key, self.allowed_ips, endpoint, 0))
        await self.wg.set_peer(self.config(endpoint))

    # ----- life cycle (the reconciler) ----------------------------------------------------------
    async def start(self, existing: PeerStats | None, pending: list[Candidate] | None) -> None:
        """The peer entered our map. `existing`: WireGuard already has it (the agent restarted: keep
        the tunnel as it is); `pending`: candidates it sent before our map had it."""
        if existing is not None and existing.endpoint:
            self.conn.endpoint = existing.endpoint  # adopted tunnel: keep it as it is
        else:
            await self.wg.set_peer(self.config(None))
        if pending:
            await self.use_candidates(pending)
        await self.offers.offer(self.conn, "offer")

    async def update(self, entry: PeerEntry) -> None:
        """The peer's entry changed but not its key (name, allowed IPs)."""
        old, self.entry = self.entry, entry
        self.conn.name = entry.name
        if old.allowed_ips != entry.allowed_ips:
            await self.wg.set_peer(self.config(self.conn.endpoint))

    async def rekey(self, entry: PeerEntry, pending: list[Candidate] | None) -> None:
        """The peer rotated its key: swap the key in WireGuard in one update, keeping endpoint, path
        and relay state. The keepalive that comes with the endpoint starts the handshake at once,
        which releases the packets the peer queued while we still knew its old key."""
        old, self.entry = self.entry, entry
        self.conn.public_key, self.conn.name = entry.public_key, entry.name
        self.conn.hold_until = self.clock.monotonic() + OLD_KEY_GRACE
        await self.wg.swap_key(old.public_key, self.config(self.conn.endpoint))
        self._retiring.discard(entry.public_key)  # a rollback to a key we were retiring
        self._retiring.add(old.public_key)
        self._spawn(self._retire(old.public_key))
        log.info("peer %s rotated its key: %s... -> %s...", entry.name, old.public_key[:8], entry.public_key[:8])
        if pending:
            await self.use_candidates(pending)

    async def _retire(self, key: str) -> None:
        await self.clock.sleep(OLD_KEY_GRACE)
        if key in self._retiring and key != self.entry.public_key:
            self._retiring.discard(key)
            await self.wg.remove_peer(key)

    async def close(self) -> None:
        """The peer left our map: stop acting for it, close its ICE/relay state, remove it from WireGuard."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.nat.forget(self.conn)
        for key in {self.entry.public_key, *self._retiring}:
            await self.wg.remove_peer(key)
        self._retiring.clear()

    # ----- signal -------------------------------------------------------------------------------
    async def receive(self, kind: str, body: Any, candidates: list[Candidate]) -> None:
        """A signal message from the peer: ICE messages go to the fallback, candidates to the path."""
        self.conn.offline_until = 0.0
        if kind in NAT_KINDS:
            await self.nat.on_message(self.conn, kind, body)
            return
        if kind == "offer":
            await self.offers.offer(self.conn, "answer")
        await self.use_candidates(candidates)

    def peer_offline(self) -> None:
        """Signal says the peer is not connected: it offers when it comes back; stop pestering it."""
        self.conn.peer_offline(self.clock.monotonic())

    async def use_candidates(self, candidates: list[Candidate]) -> None:
        conn = self.conn
        endpoint = conn.remote_candidates(candidates, await self.nets.local_nets())
        if endpoint is None or self.closed:
            return
        log.debug("%s: WireGuard endpoint -> %s (%s)", conn.name, endpoint, conn.state.value)
        if conn.state in (PathState.DIRECT, PathState.RELAYED):
            # The peer moved (roaming, new public mapping): send to its new address now, which also
            # opens our NAT for it; an idle tunnel would otherwise wait for the next keepalive.
            # The endpoint goes explicitly: a watchdog pass may meanwhile have read WireGuard's
            # endpoint from before this change (the peer's old address, which then got the keepalive:
            # the peer's pings died at our NAT's filter while both ends said "direct").
            await self.nudge(endpoint)
            # The old handshake says nothing about the new address: prove it, or fall back.
            conn.reverify(self.clock.time(), self.clock.monotonic(), self.nat.controlling(conn))
            return
        if self.nat.controlling(conn):
            # A peer that never completed a handshake is re-created: traffic into the tunnel before it
            # had an endpoint (our pings to its mesh IP, an application) made WireGuard try once and fail
            # ("no known endpoint"), after which it would not initiate again for 5 s.
            stats = (await self.wg.peers()).get(conn.public_key)
            await self.point(endpoint, fresh=stats is None or not stats.last_handshake)
            return
        # The controlled side follows FOLLOW_DELAY later. Two handshake initiations that cross each
        # other leave both WireGuard ends waiting (each drops the response to its own initiation),
        # which cost up to ~15 s of silence after a policy flap before WireGuard's own retry.
        self._spawn(self._follow(endpoint))

    async def _follow(self, endpoint: str) -> None:
        await self.clock.sleep(FOLLOW_DELAY)
        conn = self.conn
        if self.closed or conn.endpoint != endpoint or conn.proxied:
            return
        stats = (await self.wg.peers()).get(conn.public_key)
        answered = stats is not None and stats.last_handshake > max(conn.stale_before, self.clock.time() - 10)
        # Not answered yet (e.g. our NAT dropped the initiation): initiate now, on a fresh peer so
        # that WireGuard's 5 s initiation rate limit does not delay it.
        await self.point(endpoint, fresh=not answered)

    async def offer_now(self) -> bool:
        """Our candidates changed (or signal came back): offer at once, backoff reset."""
        self.conn.next_offer_at, self.conn.offer_backoff = 0.0, 1.0
        return await self.offers.offer(self.conn, "offer")

    # ----- the watchdog's pass ------------------------------------------------------------------
    async def underlay_changed(self) -> None:
        """We lost an underlay address. wireguard-go remembers the source address it last used per
        peer ("sticky sockets") and keeps trying the one that is gone; setting the endpoint again
        forgets it, and the keepalive that follows reopens our NAT for the peer."""
        await self.nudge()
        # Until the peer sends to our new address, its NAT drops what we send: the old handshake
        # proves nothing now. Prove the path again, or fall back.
        self.conn.reverify(self.clock.time(), self.clock.monotonic(), self.nat.controlling(self.conn))

    async def watch(self, st: PeerStats, now: float, mono: float) -> None:
        """One watchdog pass (WireGuard's stats read at `now`/`mono`): path state, fallback, re-offers."""
        conn = self.conn
        was, verifying = conn.state, conn.verify_since
        endpoint = conn.observe(st.last_handshake, st.rx_bytes, st.tx_bytes, st.endpoint, now, taken=mono)
        if verifying and not conn.verify_since:
            if conn.state == PathState.DIRECT:
                log.info("%s: path via %s confirmed after the change", conn.name, conn.endpoint)
            elif conn.state == PathState.LOST:
                log.warning("%s: %s: path lost, trying the candidates and ICE", conn.name, conn.last_error)
        if endpoint is not None:
            await self.wg.set_peer(self.config(endpoint))
        elif conn.kick_due(self.clock.monotonic()) and conn.endpoint:
            # No proof yet: re-create the peer, which sends a handshake initiation at once (WireGuard
            # itself would retry only after 5 s, and never while its old session looks valid).
            log.info("%s: no handshake since the path changed: forcing one to %s", conn.name, conn.endpoint)
            await self.point(conn.endpoint, fresh=True)
        if conn.proxied and conn.state == PathState.LOST and was != PathState.LOST:
            await self.nat.path_lost(conn)
        await self.nat.tick(conn, mono)
        if conn.offer_due(mono) and not await self.offers.offer(conn, "offer"):
            conn.next_offer_at = mono + 0.5
            conn.offer_backoff = max(1.0, conn.offer_backoff / 2)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
