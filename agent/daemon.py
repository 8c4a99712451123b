"""The agent daemon: follows the coordinator's map stream, keeps one WireGuard peer per map peer,
exchanges candidates through signal, watches handshakes, reports state, serves the control socket.

How each peer is reached (candidates, signal, STUN, WireGuard endpoints) is the `PeerLinks` half
in `agent/links.py`; NAT fallback and relay in `agent/nat/`.

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
import platform
import random
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, netlink
from agent.client import CoordinatorError, PeerApi, enroll
from agent.config import AgentConfig, AgentState, write_private
from agent.control import ControlServer
from agent.firewall import Firewall, FirewallError, FirewallMapError
from agent.keys import KeySource, decode_key, public_key_of
from agent.links import PeerLinks
from agent.nat.fallback import Fallback
from agent.nat.reflexive import ReflexiveProbe
from agent.netmap import MapChange, MapGap, NetworkMap
from agent.peers import Candidate, PathState, PeerConnection
from agent.rekey import KeyRotator
from agent.status import ServiceStatus
from agent.wg import WireGuardBackend
from agent.wg.backend import WireGuardError
from starling_proto.netmap import FullMap, MapMessage, PeerEntry, UnsupportedMapVersion, parse_map_message

if TYPE_CHECKING:  # websockets is imported when signal starts
    from agent.signal_client import SignalClient

OLD_KEY_GRACE = 5.0  # s a neighbour's old key stays (without allowed IPs) after it rotated

log = logging.getLogger("starling.agent")
RECONNECT_CAP = 4.0  # seconds: the control plane is picked up again within ~5 s of its return


def backoff_delays(start: float = 0.2, cap: float = RECONNECT_CAP) -> Any:
    delay = start
    while True:
        yield random.uniform(0, delay)  # noqa: S311 - full jitter
        delay = min(delay * 2, cap)


class Agent(PeerLinks):
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
        self.tls = config.tls_context()
        self.api = PeerApi(state.management_url, state.credential, verify=self.tls)
        self._last_relogin = -1e9
        self.signal: SignalClient | None = None
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
        self.rotation = KeyRotator(self)

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
    def _load_cached_map(self) -> FullMap | None:
        try:
            return FullMap.from_wire(json.loads(self.map_cache.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # WireFormatError is a ValueError
            log.warning("cached map %s not used: %s", self.map_cache, exc)
            return None

    def _save_map(self) -> None:
        write_private(self.map_cache, self.map.to_full().to_json())

    async def _follow_map(self) -> None:
        delays = backoff_delays()
        while True:
            try:
                async for event, data in _until(self.api.stream(), self.map_redial):
                    if event in ("map", "delta"):
                        if not self.management.connected:
                            self.management.set(True)
                            delays = backoff_delays()
                        await self._apply(parse_map_message(data))  # WireFormatError: nothing changed
                        if event == "map" and self.map.me and self.map.me.public_key != self.public_key:
                            await self.rotation.present()
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
            except UnsupportedMapVersion as exc:
                # Keep the map we hold (tunnels and firewall stay as they are) until the agent is upgraded.
                self.management.set(False, str(exc))
                log.error("%s", exc)
                await asyncio.sleep(60)
                continue
            except CoordinatorError as exc:
                self.management.set(False, str(exc))
                if exc.status == 401 and await self._relogin():
                    delays = backoff_delays()
                    continue
            except (ValueError, KeyError, TypeError) as exc:
                self.management.set(False, f"bad map message: {exc}")
                log.error("bad map message from the coordinator: %s", exc)
            await asyncio.sleep(next(delays))

    async def _relogin(self) -> bool:
        """The coordinator refused our credential (restored database, credential reset): log in again with a
        sealed request proving our WireGuard key, at most once a minute. True when a new credential is in use."""
        now = time.monotonic()
        if now - self._last_relogin < 60:
            log.error("coordinator refused our credential again: run `starling up` again")
            return False
        self._last_relogin = now
        body = {
            "hostname": self.config.hostname or socket.gethostname(),
            "agent_version": __version__,
            "os": f"{platform.system()} {platform.release()}",
        }
        try:
            result = await asyncio.to_thread(enroll, self.state.management_url, self.private_key, body, 15.0, self.tls)
        except CoordinatorError as exc:
            log.error("coordinator refused our credential and the login with our key: %s", exc)
            return False
        self.state.credential = str(result["credential"])
        await asyncio.to_thread(self.state.save, self.config.state_file)
        self.api.set_credential(self.state.credential)
        log.warning("the coordinator refused our credential: logged in again with our key (new credential)")
        return True

    async def _apply(self, msg: MapMessage, *, initial: bool = False) -> None:
        change = self.map.apply(msg)
        me = self.map.me
        if me is None:
            raise ValueError("the first map message was not a full map")
        prefix = ipaddress.IPv4Network(me.mesh_prefix or f"{me.mesh_ip}/32", strict=False)
        address = (me.mesh_ip, prefix.prefixlen)
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
            await asyncio.to_thread(self._save_map)

    async def _reconcile(self, change: MapChange, *, full: bool) -> None:
        for pid, entry in change.removed.items():
            await self.fallback.forget(pid)
            conn = self.conns.pop(pid, None)
            self.by_key.pop(entry.public_key, None)
            await self._wg(self.backend.remove_peer, entry.public_key)
            log.info("peer %s removed", entry.name)
            del conn
        for pid, (old, new) in change.changed.items():
            if old.public_key != new.public_key:
                if pid in self.conns:
                    await self._peer_rekeyed(self.conns[pid], old, new)
                else:
                    change.added[pid] = new
            elif old.allowed_ips != new.allowed_ips:
                conn = self.conns[pid]
                await self._wg(self.backend.set_peer, self._peer_config(new, conn.endpoint))
            if pid in self.conns:
                self.conns[pid].name = new.name
        for pid, entry in change.added.items():
            conn = PeerConnection(pid, entry.public_key, entry.name, entry.mesh_ip)
            conn.set_state(PathState.CONNECTING)
            conn.path_changes = 0
            self.conns[pid] = conn
            self.by_key[entry.public_key] = pid
            existing = await asyncio.to_thread(self.wireguard_peers)
            current = existing.get(entry.public_key)
            if current is not None and current.endpoint:
                conn.endpoint = current.endpoint  # adopted tunnel: keep it as it is
            else:
                await self._wg(self.backend.set_peer, self._peer_config(entry, None))
            pending = self.pending.pop(entry.public_key, None)
            if pending is not None:
                await self._use_candidates(conn, pending[1])
            await self._offer(conn, "offer")
        if full:
            wanted = {e.public_key for e in self.map.peers.values()}
            for key in set(await asyncio.to_thread(self.wireguard_peers)) - wanted:
                await self._wg(self.backend.remove_peer, key)

    async def _peer_rekeyed(self, conn: PeerConnection, old: PeerEntry, new: PeerEntry) -> None:
        """A neighbour rotated its key: swap the key in WireGuard in one update, keeping endpoint,
        path and relay state. The keepalive that comes with the endpoint starts the handshake at
        once, which releases the packets the neighbour queued while we still knew its old key."""
        self.by_key.pop(old.public_key, None)
        self.by_key[new.public_key] = conn.peer_id
        conn.public_key = new.public_key
        conn.hold_until = time.monotonic() + OLD_KEY_GRACE
        try:
            await asyncio.to_thread(self.backend.swap_key, old.public_key, self._peer_config(new, conn.endpoint))
        except WireGuardError as exc:
            log.error("WireGuard: cannot swap the key of %s: %s", new.name, exc)
        self._retire_key(old.public_key)
        log.info("peer %s rotated its key: %s... -> %s...", new.name, old.public_key[:8], new.public_key[:8])
        pending = self.pending.pop(new.public_key, None)
        if pending is not None:
            await self._use_candidates(conn, pending[1])

    def _retire_key(self, key: str) -> None:
        """Remove a neighbour's old key after OLD_KEY_GRACE, unless it came back meanwhile (rollback)."""

        async def later() -> None:
            await asyncio.sleep(OLD_KEY_GRACE)
            if key not in self.by_key:
                await self._wg(self.backend.remove_peer, key)

        task = asyncio.create_task(later())
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def _apply_firewall(self) -> None:
        section = self.map.firewall()
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
                await self.event("firewall.error", f"map {self.map.serial} rejected: {exc}")
        except FirewallError as exc:
            # Fail closed: the previous ruleset (or the guard) stays; the watchdog retries.
            self.firewall_pending = True
            log.error("firewall not applied (mesh traffic stays restricted): %s", exc)
            await self.event("firewall.error", str(exc))

    def _on_drift(self, description: str) -> None:
        log.warning("firewall drift repaired: %s", description)
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.event("firewall.drift", description), self.loop)

    async def event(self, kind: str, message: str) -> None:
        try:
            await self.api.report_event(kind, message)
        except CoordinatorError as exc:
            log.debug("event %s not reported: %s", kind, exc)

    # ----- key rotation (agent.rekey.KeyRotator's host) -------------------------------------------
    async def reload_key(self, expect_public_key: str | None = None, verify_timeout: float = 30.0) -> dict[str, Any]:
        """`starling key reload` (the control socket): see agent.rekey."""
        return await self.rotation.reload(expect_public_key, verify_timeout)

    def adopt_key(self, private_key: str, public_key: str) -> None:
        self.private_key, self.public_key = private_key, public_key

    def renew_signal_identity(self) -> None:
        if self.signal is None:
            return
        from agent.signal_crypto import SignalCrypto

        self.signal.set_crypto(SignalCrypto(decode_key(self.private_key)))
        self.signal.redial("key rotated")

    def peer_name(self, public_key: str) -> str | None:
        pid = self.by_key.get(public_key)
        entry = self.map.peers.get(pid) if pid else None
        return None if pid is None else (entry.name if entry else public_key[:8])

    # ----- watchdog and reports ---------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now, mono = time.time(), time.monotonic()  # before the reading: see PeerConnection.observe
            stats = await asyncio.to_thread(self.wireguard_peers)
            # Read afresh (not the 2 s offer cache): roaming is noticed within one pass.
            current = await asyncio.to_thread(self.host_candidates, 0.0)
            hosts = sorted(c.address for c in current if c.kind == "host")
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
                        # Until the peer sends to our new address, its NAT drops what we send: the
                        # old handshake proves nothing now. Prove the path again, or fall back.
                        conn.reverify(time.time(), time.monotonic(), self.fallback.controlling(conn))
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
        was, verifying = conn.state, conn.verify_since
        endpoint = conn.observe(st.last_handshake, st.rx_bytes, st.tx_bytes, st.endpoint, now, taken=mono)
        if verifying and not conn.verify_since:
            if conn.state == PathState.DIRECT:
                log.info("%s: path via %s confirmed after the change", conn.name, conn.endpoint)
            elif conn.state == PathState.LOST:
                log.warning("%s: %s: path lost, trying the candidates and ICE", conn.name, conn.last_error)
        entry = self.map.peers.get(conn.peer_id)
        if endpoint is not None and entry is not None:
            await self._wg(self.backend.set_peer, self._peer_config(entry, endpoint))
        elif conn.kick_due(time.monotonic()) and conn.endpoint:
            # No proof yet: re-create the peer, which sends a handshake initiation at once (WireGuard
            # itself would retry only after 5 s, and never while its old session looks valid).
            log.info("%s: no handshake since the path changed: forcing one to %s", conn.name, conn.endpoint)
            await self.point_wireguard(conn, conn.endpoint, fresh=True)
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
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.keys.maintain)  # e.g. renew the Vault token at half its lease
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
            "key": {"source": self.keys.name, "version": self.keys.version},
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
            "turn_renewals": self.fallback.renewals(conn.peer_id),
        }


async def _until(stream: AsyncIterator[Any], stop: asyncio.Event) -> AsyncIterator[Any]:
    """Items of `stream` until it ends or `stop` is set (a pending read is cancelled, not awaited)."""
    it = stream.__aiter__()
    nxt: asyncio.Future[Any] | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            waiter = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                waiter.cancel()
                raise
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
        if nxt is not None and not nxt.done():
            # Cancelled from outside (shutdown): the pending read must not end as an unretrieved error.
            nxt.cancel()
            nxt.add_done_callback(lambda f: f.cancelled() or f.exception())
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
