"""How the agent reaches each peer: its candidates, the signal connection, the public mapping of
its WireGuard port (STUN), and pointing WireGuard at a peer. The ICE fallback and the relay proxy
live in `agent.nat.fallback`; the daemon (`agent.daemon.Agent`) owns the state used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from agent import netlink
from agent.config import AgentConfig
from agent.keys import decode_key
from agent.nat.fallback import KINDS as NAT_KINDS
from agent.nat.fallback import Fallback
from agent.nat.reflexive import ReflexiveProbe
from agent.nat.stun import parse_server
from agent.netmap import NetworkMap
from agent.peers import Candidate, PathState, PeerConnection, parse_candidates
from agent.status import ServiceStatus
from agent.wg import PeerConfig, WireGuardBackend, WireGuardError
from agent.wg.backend import PeerStats
from starling_proto.netmap import PeerEntry

if TYPE_CHECKING:  # websockets is imported when signal starts
    from agent.client import PeerApi
    from agent.signal_client import SignalClient

log = logging.getLogger("starling.agent")
MESH = ipaddress.IPv4Network("100.64.0.0/10")
VIRTUAL_PREFIXES = ("docker", "br-", "virbr", "cni", "flannel", "cali", "kube", "podman", "veth", "tailscale", "wt")
FOLLOW_DELAY = 0.3  # s the controlled side of a pair waits before initiating (see _use_candidates)
NAT_REFRESH = 25.0  # s between STUN refreshes of the WireGuard port's public mapping


class PeerLinks:
    """Mixin of `Agent`: candidates, offers/answers over signal, STUN, WireGuard endpoints."""

    config: AgentConfig
    backend: WireGuardBackend
    map: NetworkMap
    api: PeerApi
    tls: ssl.SSLContext | None
    conns: dict[str, PeerConnection]
    by_key: dict[str, str]
    pending: dict[str, tuple[float, list[Candidate]]]
    signal: SignalClient | None
    signal_status: ServiceStatus
    map_ready: asyncio.Event
    port: int
    private_key: str
    reflexive: ReflexiveProbe
    fallback: Fallback
    nat_wakeup: asyncio.Event
    _candidates: tuple[float, list[Candidate]]
    _followers: set[asyncio.Task[None]]
    _reoffer_pending: bool

    def _peer_config(self, entry: PeerEntry, endpoint: str | None) -> PeerConfig:
        # No keepalive before an endpoint is known: wireguard-go would try a handshake at once, fail
        # ("no known endpoint") and then wait its 5 s rekey timeout even after the endpoint arrives.
        # Setting keepalive together with the first endpoint starts the handshake immediately.
        return PeerConfig(entry.public_key, entry.allowed_ips, endpoint, self.config.keepalive if endpoint else 0)

    def wireguard_peers(self) -> dict[str, PeerStats]:
        """WireGuard's peers now ({} if the device cannot be read)."""
        try:
            return self.backend.peers()
        except WireGuardError:
            return {}

    async def _wg(self, fn: Any, *args: Any) -> None:
        try:
            await asyncio.to_thread(fn, *args)
        except WireGuardError as exc:
            log.error("WireGuard: %s", exc)

    # ----- candidates and signal --------------------------------------------------------------
    def host_candidates(self, max_age: float = 2.0) -> list[Candidate]:
        """Our host candidates (cached for `max_age` s: offers to many peers must not each open netlink)."""
        at, cached = self._candidates
        if time.monotonic() - at < max_age:
            return cached
        addrs = netlink.local_addresses({self.backend.interface}, [MESH])
        cands = [
            Candidate(f"{ip}:{self.port}", "host") for name, ip, _ in addrs if not name.startswith(VIRTUAL_PREFIXES)
        ]
        srflx = self.reflexive.address
        if srflx and srflx not in {c.address for c in cands}:
            cands.append(Candidate(srflx, "srflx"))
        self._candidates = (time.monotonic(), cands)
        return cands

    def stun_servers(self) -> list[tuple[str, int]]:
        """STUN servers: every UDP STUN/TURN URL of the map's relays (coturn answers STUN too)."""
        servers: list[tuple[str, int]] = []
        for relay in self.map.relays:
            for url in relay.urls:
                if "transport=tcp" in url or not url.startswith(("stun:", "turn:")):
                    continue
                with contextlib.suppress(ValueError):
                    server = parse_server(url)
                    if server not in servers:
                        servers.append(server)
        return servers

    async def _nat(self) -> None:
        """Keep the WireGuard port's public mapping known; re-offer to every peer when it changes."""
        while True:
            # Cleared before learning, not after: a wakeup while a probe is under way (roaming: the
            # new address appeared first, the old one went while we asked through it) must not be lost.
            self.nat_wakeup.clear()
            servers = self.stun_servers()
            if servers:
                before = self.reflexive.address
                await self.reflexive.learn(servers)
                if self.reflexive.address != before:
                    self._candidates = (0.0, [])
                    await self._reoffer_all("public address changed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NAT_REFRESH):
                    await self.nat_wakeup.wait()

    def ice_address_ok(self, address: str) -> bool:
        """ICE host candidates: exactly the addresses we offer as host candidates (no mesh, no virtual).
        Runs inside aioice on the event loop: uses the cache that `fresh_candidates()` filled."""
        return address in {c.ip for c in self._candidates[1] if c.kind == "host"}

    async def fresh_candidates(self) -> list[Candidate]:
        return await asyncio.to_thread(self.host_candidates)

    async def refresh_reflexive(self) -> None:
        servers = self.stun_servers()
        if servers:
            await self.reflexive.learn(servers)
            self._candidates = (0.0, [])

    async def send_offer(self, conn: PeerConnection) -> None:
        await self._offer(conn, "offer")

    async def point_wireguard(self, conn: PeerConnection, endpoint: str, *, fresh: bool) -> None:
        """Point the peer's WireGuard endpoint somewhere; `fresh` re-creates the peer so the handshake
        starts now (WireGuard sends at most one initiation per 5 s to a peer)."""
        entry = self.map.peers.get(conn.peer_id)
        if entry is None:
            return
        conn.endpoint, conn.endpoint_set_at = endpoint, time.monotonic()
        if fresh:
            await self._wg(self.backend.remove_peer, conn.public_key)
        await self._wg(self.backend.set_peer, self._peer_config(entry, endpoint))

    async def nudge(self, conn: PeerConnection, endpoint: str | None = None) -> None:
        """Make WireGuard send one keepalive to the peer now (it sends one when keepalive goes 0 -> n),
        to `endpoint` (default: the connection's). The endpoint is read once: both updates must
        carry the same one, whatever changes `conn.endpoint` while the first is being applied."""
        entry = self.map.peers.get(conn.peer_id)
        endpoint = endpoint or conn.endpoint
        if entry is None or not endpoint:
            return
        quiet = PeerConfig(entry.public_key, entry.allowed_ips, endpoint, 0)
        await self._wg(self.backend.set_peer, quiet)
        await self._wg(self.backend.set_peer, self._peer_config(entry, endpoint))

    async def _reoffer_all(self, why: str) -> None:
        """Our candidates changed (roaming, new public mapping): tell every peer at once."""
        if self.conns:
            log.info("%s: offering new candidates to %d peers", why, len(self.conns))
        for conn in list(self.conns.values()):
            conn.next_offer_at, conn.offer_backoff = 0.0, 1.0
            if not await self._offer(conn, "offer"):
                self._reoffer_pending = True  # signal is down (redialling): offer when it is back

    def local_nets(self) -> list[ipaddress.IPv4Network]:
        nets = []
        for _, ip, plen in netlink.local_addresses({self.backend.interface}, [MESH]):
            nets.append(ipaddress.IPv4Network(f"{ip}/{plen}", strict=False))
        return nets

    async def _offer(self, conn: PeerConnection, kind: str) -> bool:
        if self.signal is None or not self.signal.connected:
            return False
        cands = await asyncio.to_thread(self.host_candidates)
        sent = bool(await self.signal.send(conn.public_key, kind, {"candidates": [c.to_wire() for c in cands]}))
        log.debug("%s to %s: %s (%s)", kind, conn.name, [c.address for c in cands], "sent" if sent else "not sent")
        return sent

    async def on_signal_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        candidates = parse_candidates(body.get("candidates") if isinstance(body, dict) else None)
        pid = self.by_key.get(sender)
        log.debug("%s from %s: %s", kind, self.conns[pid].name if pid else sender, [c.address for c in candidates])
        if pid is None:
            # Not in our map (yet): keep the candidates a short while; the map may be a moment behind.
            self.pending[sender] = (time.monotonic(), candidates)
            for key in [k for k, (t, _) in self.pending.items() if time.monotonic() - t > 30]:
                del self.pending[key]
            return
        conn = self.conns[pid]
        conn.offline_until = 0.0
        if kind in NAT_KINDS:
            await self.fallback.on_message(conn, kind, body)
            return
        if kind == "offer":
            await self._offer(conn, "answer")
        await self._use_candidates(conn, candidates)

    async def _use_candidates(self, conn: PeerConnection, candidates: list[Candidate]) -> None:
        endpoint = conn.remote_candidates(candidates, await asyncio.to_thread(self.local_nets))
        entry = self.map.peers.get(conn.peer_id)
        if endpoint is None or entry is None:
            return
        log.debug("%s: WireGuard endpoint -> %s (%s)", conn.name, endpoint, conn.state.value)
        if conn.state in (PathState.DIRECT, PathState.RELAYED):
            # The peer moved (roaming, new public mapping): send to its new address now, which also
            # opens our NAT for it; an idle tunnel would otherwise wait for the next keepalive.
            # The endpoint goes explicitly: a watchdog pass may meanwhile have read WireGuard's
            # endpoint from before this change (the peer's old address, which then got the keepalive:
            # the peer's pings died at our NAT's filter while both ends said "direct").
            await self.nudge(conn, endpoint)
            # The old handshake says nothing about the new address: prove it, or fall back.
            conn.reverify(time.time(), time.monotonic(), self.fallback.controlling(conn))
            return
        if self.fallback.controlling(conn):
            await self._wg(self.backend.set_peer, self._peer_config(entry, endpoint))
            return
        # The controlled side follows FOLLOW_DELAY later. Two handshake initiations that cross each
        # other leave both WireGuard ends waiting (each drops the response to its own initiation),
        # which cost up to ~15 s of silence after a policy flap before WireGuard's own retry.
        task = asyncio.create_task(self._follow(conn, endpoint))
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def _follow(self, conn: PeerConnection, endpoint: str) -> None:
        await asyncio.sleep(FOLLOW_DELAY)
        if self.conns.get(conn.peer_id) is not conn or conn.endpoint != endpoint or conn.proxied:
            return
        stats = (await asyncio.to_thread(self.wireguard_peers)).get(conn.public_key)
        answered = stats is not None and stats.last_handshake > max(conn.stale_before, time.time() - 10)
        # Not answered yet (e.g. our NAT dropped the initiation): initiate now, on a fresh peer so
        # that WireGuard's 5 s initiation rate limit does not delay it.
        await self.point_wireguard(conn, endpoint, fresh=not answered)

    async def _signal(self) -> None:
        """Connect to signal (URL from the map, or the config) and keep connected."""
        from agent.signal_client import SignalClient
        from agent.signal_crypto import SignalCrypto

        while True:
            url = self.config.signal_url or self.map.signal.url
            if url:
                break
            self.signal_status.set(False, "no signal URL (coordinator settings.signal_url or agent signal_url)")
            self.map_ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.map_ready.wait()

        async def token() -> str:
            return await self.api.signal_token()

        async def on_message(sender: str, kind: str, body: dict[str, Any]) -> None:
            await self.on_signal_message(sender, kind, body)

        async def on_offline(target: str, _msg_id: str) -> None:
            # The peer is not on signal: it will offer to us when it comes online; stop pestering it.
            pid = self.by_key.get(target)
            if pid is not None and pid in self.conns:
                self.conns[pid].peer_offline(time.monotonic())

        crypto = SignalCrypto(decode_key(self.private_key))
        self.signal = SignalClient(url, token, crypto, on_message, on_offline, ssl=self.tls)
        runner = asyncio.create_task(self.signal.run())
        try:
            while True:
                connected = bool(self.signal.connected)
                if connected and (self._reoffer_pending or not self.signal_status.connected):
                    everyone, self._reoffer_pending = self._reoffer_pending, False
                    for conn in list(self.conns.values()):  # (re)connected: offer to everyone waiting now
                        if everyone or conn.state not in (PathState.DIRECT, PathState.RELAYED):
                            conn.next_offer_at, conn.offer_backoff = 0.0, 1.0
                            await self._offer(conn, "offer")
                self.signal_status.set(connected, self.signal.last_error)
                await asyncio.sleep(0.05)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
