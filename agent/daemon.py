"""The agent daemon: follows the coordinator's map stream, keeps one WireGuard peer per map peer,
exchanges candidates through signal, watches handshakes, reports state, serves the control socket.

The data plane never depends on the control plane: losing the coordinator or signal stops updates,
not traffic. The last map is cached on disk so a restarted daemon configures tunnels even while
the coordinator is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent import __version__, netlink
from agent.client import CoordinatorError, PeerApi
from agent.config import AgentConfig, AgentState, write_private
from agent.control import ControlServer
from agent.firewall import Firewall, FirewallError, FirewallMapError
from agent.keys import KeySource, decode_key, public_key_of
from agent.nat.fallback import KINDS as NAT_KINDS
from agent.nat.fallback import Fallback
from agent.nat.reflexive import ReflexiveProbe
from agent.nat.stun import parse_server
from agent.netmap import MapChange, MapGap, NetworkMap
from agent.peers import Candidate, PathState, PeerConnection, parse_candidates
from agent.wg import PeerConfig, WireGuardBackend, WireGuardError

log = logging.getLogger("starling.agent")
MESH = ipaddress.IPv4Network("100.64.0.0/10")
VIRTUAL_PREFIXES = ("docker", "br-", "virbr", "cni", "flannel", "cali", "kube", "podman", "veth", "tailscale", "wt")
RECONNECT_CAP = 4.0  # seconds: the control plane is picked up again within ~5 s of its return
FOLLOW_DELAY = 0.3  # s the controlled side of a pair waits before initiating (see _use_candidates)
NAT_REFRESH = 25.0  # seconds between STUN refreshes of the WireGuard port's public mapping


def backoff_delays(start: float = 0.2, cap: float = RECONNECT_CAP) -> Any:
    delay = start
    while True:
        yield random.uniform(0, delay)  # noqa: S311 - full jitter
        delay = min(delay * 2, cap)


class ServiceStatus:
    def __init__(self) -> None:
        self.connected = False
        self.last_error: str | None = None
        self.since = time.time()

    def set(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            self.since = time.time()
        self.connected, self.last_error = connected, error

    def as_dict(self) -> dict[str, Any]:
        return {"connected": self.connected, "last_error": self.last_error, "since": self.since}


class Agent:
    def __init__(self, config: AgentConfig, state: AgentState, keys: KeySource, backend: WireGuardBackend) -> None:
        self.config = config
        self.state = state
        self.keys = keys
        self.backend = backend
        self.private_key = ""
        self.public_key = ""
        self.map = NetworkMap()
        self.conns: dict[str, PeerConnection] = {}
        self.by_key: dict[str, str] = {}
        self.pending: dict[str, tuple[float, list[Candidate]]] = {}
        self.management = ServiceStatus()
        self.signal_status = ServiceStatus()
        self.api = PeerApi(state.management_url, state.credential)
        self.signal: Any = None
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.remove_on_exit = False
        self.port = config.port
        self._tasks: list[asyncio.Task[Any]] = []
        self._address: tuple[str, int] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.firewall = Firewall(
            backend.interface,
            mode="disabled" if config.disable_firewall else "enforce",
            on_drift=self._on_drift,
        )
        self.firewall_pending = False
        self._rejected_serial = -1
        self.map_ready = asyncio.Event()
        self._candidates: tuple[float, list[Candidate]] = (0.0, [])
        self._offered_hosts: list[str] | None = None
        self.reflexive = ReflexiveProbe(config.port)
        self.nat_wakeup = asyncio.Event()
        self.fallback = Fallback(self)
        self._reoffer_pending = False  # our candidates changed while signal was down
        self.map_redial = asyncio.Event()  # set: drop the map stream now and reconnect (roaming)
        self._followers: set[asyncio.Task[None]] = set()

    @property
    def map_cache(self) -> Path:
        return self.config.state_dir / "map.json"

    # ----- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(_loop_exception)
        self.private_key = self.keys.load()
        self.public_key = public_key_of(self.private_key)
        # Fail closed: the guard (drop everything on the mesh interface) is in place before any peer.
        try:
            await asyncio.to_thread(self.firewall.install_guard)
        except FirewallError as exc:
            log.error("firewall guard: %s (retrying)", exc)
            self.firewall_pending = True
        await asyncio.to_thread(self.backend.up, self.private_key, self.config.port)
        self.port = await asyncio.to_thread(self.backend.listen_port) or self.config.port
        self.reflexive.wg_port = self.port
        cached = self._load_cached_map()
        if cached is not None:
            await self._apply(cached, initial=True)
        control = ControlServer(self.config.control_socket, self)
        await control.start()
        if self.config.metrics_listen:
            from agent.metrics import serve_metrics

            serve_metrics(self.config.metrics_listen, self.status)
        self._tasks = [
            asyncio.create_task(self._follow_map(), name="map"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._reporter(), name="reporter"),
            asyncio.create_task(self._signal(), name="signal"),
            asyncio.create_task(self._nat(), name="nat"),
        ]
        log.info(
            "agent up: %s %s on %s (%s backend)",
            self.state.name,
            self.state.mesh_ip,
            self.backend.interface,
            self.backend.kind,
        )
        try:
            await self.stop_event.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await control.stop()
            if self.signal is not None:
                with contextlib.suppress(Exception):
                    await self.signal.close()
            await self.api.close()
            await self.fallback.close()
            self.reflexive.close()
            await asyncio.to_thread(self.reflexive.remove)
            if self.remove_on_exit:
                with contextlib.suppress(FirewallError):
                    await asyncio.to_thread(self.firewall.remove)
                await asyncio.to_thread(self.backend.down)
                log.info("interface %s removed", self.backend.interface)
            else:
                self.backend.close()
            self.firewall.close()

    def request_stop(self, remove: bool = False) -> None:
        self.remove_on_exit = self.remove_on_exit or remove
        self.stop_event.set()

    # ----- map --------------------------------------------------------------------------------
    def _load_cached_map(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.map_cache.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("type") == "map" else None

    def _save_map(self, msg: dict[str, Any]) -> None:
        full = {
            "type": "map",
            "serial": self.map.serial,
            "peer": self.map.me,
            "peers": list(self.map.peers.values()),
            "firewall": {"rules": self.map.rules, "sets": self.map.sets},
            "dns": self.map.dns,
            "signal": self.map.signal,
            "relays": self.map.relays,
        }
        write_private(self.map_cache, json.dumps(full))

    async def _follow_map(self) -> None:
        delays = backoff_delays()
        while True:
            try:
                async for event, data in _until(self.api.stream(), self.map_redial):
                    if event in ("map", "delta"):
                        if not self.management.connected:
                            self.management.set(True)
                            delays = backoff_delays()
                        await self._apply(data)
                    elif event == "deleted":
                        self.management.set(False, "this peer was removed from the mesh")
                        log.error("the coordinator removed this peer; stopping")
                        self.request_stop(remove=True)
                        return
                    elif event == "closed":
                        raise CoordinatorError("stream replaced by another connection of this peer")
                if self.map_redial.is_set():
                    self.map_redial.clear()
                    self.management.set(False, "the underlay network changed: reconnecting")
                    delays = backoff_delays()
                    continue
                raise CoordinatorError("map stream ended")
            except MapGap as exc:
                log.warning("%s: reconnecting for a full map", exc)
                self.management.set(False, str(exc))
                continue
            except CoordinatorError as exc:
                self.management.set(False, str(exc))
                if exc.status == 401:
                    log.error("coordinator refused our credential: run `starling up` again")
            except (ValueError, KeyError, TypeError) as exc:
                self.management.set(False, f"bad map message: {exc}")
                log.error("bad map message from the coordinator: %s", exc)
            await asyncio.sleep(next(delays))

    async def _apply(self, msg: dict[str, Any], *, initial: bool = False) -> None:
        change = self.map.apply(msg)
        me = self.map.me
        prefix = ipaddress.IPv4Network(me.get("mesh_prefix") or f"{me['mesh_ip']}/32", strict=False)
        address = (me["mesh_ip"], prefix.prefixlen)
        if address != self._address:
            await asyncio.to_thread(netlink.ensure_address, self.backend.interface, *address)
            self._address = address
        if change.firewall or self.firewall_pending:
            await self._apply_firewall()
        if (
            change.added
            and self.reflexive.address is None
            and self.reflexive.last_error is None
            and self.stun_servers()
        ):
            # Learn our public mapping before the first offers, so they carry it (bounded: 1 s).
            await self.reflexive.learn(self.stun_servers(), limit=1.0)
            self._candidates = (0.0, [])
        await self._reconcile(change, full=change.full)
        if self.reflexive.address is None and self.stun_servers():
            self.nat_wakeup.set()
        self.map_ready.set()
        if not initial:
            await asyncio.to_thread(self._save_map, msg)

    async def _reconcile(self, change: MapChange, *, full: bool) -> None:
        for pid, entry in change.removed.items():
            await self.fallback.forget(pid)
            conn = self.conns.pop(pid, None)
            self.by_key.pop(entry["public_key"], None)
            await self._wg(self.backend.remove_peer, entry["public_key"])
            log.info("peer %s removed", entry.get("name"))
            del conn
        for pid, (old, new) in change.changed.items():
            if old["public_key"] != new["public_key"]:
                await self._wg(self.backend.remove_peer, old["public_key"])
                await self.fallback.forget(pid)
                self.by_key.pop(old["public_key"], None)
                self.conns.pop(pid, None)
                change.added[pid] = new
            elif old["allowed_ips"] != new["allowed_ips"]:
                conn = self.conns[pid]
                await self._wg(self.backend.set_peer, self._peer_config(new, conn.endpoint))
            if pid in self.conns:
                self.conns[pid].name = new["name"]
        for pid, entry in change.added.items():
            conn = PeerConnection(pid, entry["public_key"], entry["name"], entry["mesh_ip"])
            conn.set_state(PathState.CONNECTING)
            conn.path_changes = 0
            self.conns[pid] = conn
            self.by_key[entry["public_key"]] = pid
            existing = await asyncio.to_thread(self._wg_peers_safe)
            current = existing.get(entry["public_key"])
            if current is not None and current.endpoint:
                conn.endpoint = current.endpoint  # adopted tunnel: keep it as it is
            else:
                await self._wg(self.backend.set_peer, self._peer_config(entry, None))
            pending = self.pending.pop(entry["public_key"], None)
            if pending is not None:
                await self._use_candidates(conn, pending[1])
            await self._offer(conn, "offer")
        if full:
            wanted = {e["public_key"] for e in self.map.peers.values()}
            for key in set(await asyncio.to_thread(self._wg_peers_safe)) - wanted:
                await self._wg(self.backend.remove_peer, key)

    async def _apply_firewall(self) -> None:
        section = {"default_action": "drop", "rules": self.map.rules, "sets": self.map.sets}
        try:
            if self.firewall_pending:
                await asyncio.to_thread(self.firewall.install_guard)
            await asyncio.to_thread(self.firewall.apply, section)
            self.firewall_pending = False
        except FirewallMapError as exc:
            # The map itself is invalid: rejected whole, the previous ruleset (or the guard) stays.
            # Retrying the same map cannot help; the next map update tries again. Report once per serial.
            self.firewall_pending = False
            log.error("firewall rules of map %s rejected (previous rules stay): %s", self.map.serial, exc)
            if self._rejected_serial != self.map.serial:
                self._rejected_serial = self.map.serial
                await self._event("firewall.error", f"map {self.map.serial} rejected: {exc}")
        except FirewallError as exc:
            # Fail closed: the previous ruleset (or the guard) stays; the watchdog retries.
            self.firewall_pending = True
            log.error("firewall not applied (mesh traffic stays restricted): %s", exc)
            await self._event("firewall.error", str(exc))

    def _on_drift(self, description: str) -> None:
        log.warning("firewall drift repaired: %s", description)
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._event("firewall.drift", description), self.loop)

    async def _event(self, kind: str, message: str) -> None:
        try:
            await self.api.report_event(kind, message)
        except CoordinatorError as exc:
            log.debug("event %s not reported: %s", kind, exc)

    def _peer_config(self, entry: dict[str, Any], endpoint: str | None) -> PeerConfig:
        # No keepalive before an endpoint is known: wireguard-go would try a handshake at once, fail
        # ("no known endpoint") and then wait its 5 s rekey timeout even after the endpoint arrives.
        # Setting keepalive together with the first endpoint starts the handshake immediately.
        return PeerConfig(
            entry["public_key"], tuple(entry["allowed_ips"]), endpoint, self.config.keepalive if endpoint else 0
        )

    def _wg_peers_safe(self) -> dict[str, Any]:
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
    def host_candidates(self) -> list[Candidate]:
        """Our host candidates (cached for 2 s: offers to many peers must not each open netlink)."""
        at, cached = self._candidates
        if time.monotonic() - at < 2.0:
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
            for url in relay.get("urls", []) if isinstance(relay, dict) else []:
                if not isinstance(url, str) or "transport=tcp" in url or not url.startswith(("stun:", "turn:")):
                    continue
                with contextlib.suppress(ValueError):
                    server = parse_server(url)
                    if server not in servers:
                        servers.append(server)
        return servers

    async def _nat(self) -> None:
        """Keep the WireGuard port's public mapping known; re-offer to every peer when it changes."""
        while True:
            servers = self.stun_servers()
            if servers:
                before = self.reflexive.address
                await self.reflexive.learn(servers)
                if self.reflexive.address != before:
                    self._candidates = (0.0, [])
                    await self._reoffer_all("public address changed")
            self.nat_wakeup.clear()
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

    async def nudge(self, conn: PeerConnection) -> None:
        """Make WireGuard send one keepalive to the peer now (it sends one when keepalive goes 0 -> n)."""
        entry = self.map.peers.get(conn.peer_id)
        if entry is None or not conn.endpoint:
            return
        quiet = PeerConfig(entry["public_key"], tuple(entry["allowed_ips"]), conn.endpoint, 0)
        await self._wg(self.backend.set_peer, quiet)
        await self._wg(self.backend.set_peer, self._peer_config(entry, conn.endpoint))

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
            await self._wg(self.backend.set_peer, self._peer_config(entry, endpoint))
            await self.nudge(conn)
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
        stats = (await asyncio.to_thread(self._wg_peers_safe)).get(conn.public_key)
        answered = stats is not None and stats.last_handshake > max(conn.stale_before, time.time() - 10)
        # Not answered yet (e.g. our NAT dropped the initiation): initiate now, on a fresh peer so
        # that WireGuard's 5 s initiation rate limit does not delay it.
        await self.point_wireguard(conn, endpoint, fresh=not answered)

    async def _signal(self) -> None:
        """Connect to signal (URL from the map, or the config) and keep connected."""
        from agent.signal_client import SignalClient
        from agent.signal_crypto import SignalCrypto

        while True:
            url = self.config.signal_url or self.map.signal.get("url", "")
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
        self.signal = SignalClient(url, token, crypto, on_message, on_offline)
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

    # ----- watchdog and reports ---------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            stats = await asyncio.to_thread(self._wg_peers_safe)
            now, mono = time.time(), time.monotonic()
            hosts = sorted(c.address for c in await asyncio.to_thread(self.host_candidates) if c.kind == "host")
            if self._offered_hosts is not None and hosts != self._offered_hosts:
                self.nat_wakeup.set()  # new underlay address: learn the new public mapping too
                # Connections made from an address we no longer have are dead, though TCP has not
                # noticed: dial the coordinator and signal again right away.
                if set(self._offered_hosts) - set(hosts):
                    self.map_redial.set()
                    if self.signal is not None:
                        self.signal.redial("underlay addresses changed")
                    # wireguard-go remembers the source address it last used per peer ("sticky
                    # sockets") and keeps trying the one that is gone; setting the endpoint again
                    # forgets it, and the keepalive that follows reopens our NAT for the peer.
                    for conn in list(self.conns.values()):
                        await self.nudge(conn)
                self._offered_hosts = hosts
                await self._reoffer_all("underlay addresses changed")
            self._offered_hosts = hosts
            if self.firewall_pending and self.map.loaded:
                await self._apply_firewall()
            elif self.firewall.mode == "enforce":
                try:
                    await asyncio.to_thread(self.firewall.check_drift)
                except FirewallError as exc:
                    log.error("firewall repair failed: %s", exc)
                    self.firewall_pending = True
            for conn in list(self.conns.values()):
                st = stats.get(conn.public_key)
                if st is None:
                    continue
                try:
                    await self._watch_peer(conn, st, now, mono)
                except Exception:
                    # One peer's trouble must not stop the watchdog for all the others.
                    log.exception("watchdog: peer %s", conn.name)

    async def _watch_peer(self, conn: PeerConnection, st: Any, now: float, mono: float) -> None:
        """One watchdog pass for one peer: path state from WireGuard, fallback, re-offers."""
        was = conn.state
        endpoint = conn.observe(st.last_handshake, st.rx_bytes, st.tx_bytes, st.endpoint, now)
        entry = self.map.peers.get(conn.peer_id)
        if endpoint is not None and entry is not None:
            await self._wg(self.backend.set_peer, self._peer_config(entry, endpoint))
        if conn.proxied and conn.state == PathState.LOST and was != PathState.LOST:
            await self.fallback.path_lost(conn)
        await self.fallback.tick(conn, mono)
        if conn.offer_due(mono) and not await self._offer(conn, "offer"):
            conn.next_offer_at = mono + 0.5
            conn.offer_backoff = max(1.0, conn.offer_backoff / 2)

    async def _reporter(self) -> None:
        last: list[dict[str, Any]] | None = None
        last_sent = 0.0
        while True:
            await asyncio.sleep(self.config.report_interval)
            report = [
                {
                    "peer_id": c.peer_id,
                    "path": c.state.value,
                    "endpoint": c.endpoint,
                    "latency_ms": c.latency_ms,
                    "rx_bytes": c.rx_bytes,
                    "tx_bytes": c.tx_bytes,
                    "last_handshake": _iso(c.last_handshake),
                }
                for c in self.conns.values()
            ]
            if report == last and time.monotonic() - last_sent < 60:
                continue
            try:
                await self.api.report_state(report)
                last, last_sent = report, time.monotonic()
            except CoordinatorError as exc:
                log.debug("state report failed: %s", exc)

    # ----- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "name": self.state.name,
            "peer_id": self.state.peer_id,
            "mesh_ip": self.state.mesh_ip,
            "public_key": self.public_key,
            "interface": self.backend.interface,
            "backend": self.backend.kind,
            "listen_port": self.port,
            "management": {"url": self.state.management_url, **self.management.as_dict()},
            "signal": self.signal_status.as_dict(),
            "map_serial": self.map.serial,
            "firewall": self.firewall.status(),
            "nat": {"reflexive": self.reflexive.status(), "stun_servers": [f"{h}:{p}" for h, p in self.stun_servers()]},
            "uptime": time.time() - self.started,
            "peers": sorted((self._peer_status(c) for c in self.conns.values()), key=lambda p: p["name"]),
        }

    def _peer_status(self, conn: PeerConnection) -> dict[str, Any]:
        sent, received = self.fallback.relayed_bytes(conn.peer_id)
        return {
            **conn.status(),
            "proxy": self.fallback.proxy_status(conn.peer_id),
            "relayed_sent_bytes": sent,
            "relayed_received_bytes": received,
        }

    def explain(self, name: str) -> dict[str, Any] | None:
        """Why a peer is on its path: NAT facts, candidates, the attempts and their results."""
        conn = next((c for c in self.conns.values() if name in (c.name, c.peer_id, c.public_key)), None)
        if conn is None:
            return None
        return {
            "peer": self._peer_status(conn),
            "our_candidates": [c.to_wire() for c in self._candidates[1]],  # cache: no netlink on the loop
            "reflexive": self.reflexive.status(),
            "controlling": self.fallback.controlling(conn),
            "history": self.fallback.explain(conn.peer_id),
        }


async def _until(stream: AsyncIterator[Any], stop: asyncio.Event) -> AsyncIterator[Any]:
    """Items of `stream` until it ends or `stop` is set (a pending read is cancelled, not awaited)."""
    it = stream.__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            waiter = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
                return
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        with contextlib.suppress(Exception):
            await it.aclose()  # type: ignore[attr-defined]


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # aioice retransmits STUN on timers that may fire after their socket closed (a finished probe,
    # a dropped relay): harmless, and not worth a traceback in the agent's log.
    if "Transaction.__retry" in repr(context.get("handle")):
        log.debug("late STUN retransmission on a closed ICE socket ignored")
        return
    loop.default_exception_handler(context)


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
