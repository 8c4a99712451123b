"""The agent daemon: follows the coordinator's map stream, keeps one WireGuard peer per map peer,
exchanges candidates through signal, watches handshakes, reports state, serves the control socket.

The daemon is a reconciler: the typed map (agent.netmap) is the desired state; it keeps one
`agent.link.PeerLink` per map peer (which owns that peer's WireGuard peer and path), the firewall, and
our address in step with it. Our candidates and public mapping are `agent.endpoints.LocalEndpoints`,
signal is `agent.signalling.Signalling`, key rotation `agent.rekey.KeyRotator`, NAT fallback and relay
`agent.nat`. They meet at Protocol ports; the daemon wires them and implements the host interfaces
the fallback and key rotation need.

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
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

from agent import __version__, netlink
from agent.backoff import Backoff
from agent.client import CoordinatorError, PeerApi, enroll
from agent.config import AgentConfig, AgentState, write_private
from agent.control import ControlServer
from agent.endpoints import LocalEndpoints
from agent.firewall import Firewall, FirewallError, FirewallMapError
from agent.keys import KeySource, public_key_of
from agent.latency import HandshakeLatency
from agent.link import PeerLink
from agent.nat.fallback import Fallback, SignalLink
from agent.netmap import MapChange, MapGap, NetworkMap
from agent.peers import Candidate, PeerConnection
from agent.rekey import KeyRotator
from agent.routing.driver import RouteDriver
from agent.routing.kernel import KernelRoutes
from agent.signalling import Signalling
from agent.status import AgentStatus, Explanation, PathReport, RouteExplanation, RoutingStatus, ServiceStatus
from agent.wg import WireGuardBackend
from agent.wg.backend import PeerStats
from agent.wg.port import ThreadedWireGuard
from starling_proto.netmap import FullMap, MapMessage, UnsupportedMapVersion, parse_map_message
from starling_proto.wire import is_mesh_ipv4

log = logging.getLogger("starling.agent")


class Agent:
    """One agent process: wires the parts and reconciles them with the coordinator's map."""

    def __init__(self, config: AgentConfig, state: AgentState, keys: KeySource, backend: WireGuardBackend) -> None:
        self.config = config
        self.state = state
        self.keys = keys
        self.backend = backend
        self.wg = ThreadedWireGuard(backend)
        self.private_key = ""
        self.public_key = ""
        self.map = NetworkMap()
        self.links: dict[str, PeerLink] = {}  # by peer id
        self._by_key: dict[str, PeerLink] = {}  # by the peer's current public key
        self.management = ServiceStatus()
        self.signal_status = ServiceStatus()
        self.tls = config.tls_context()
        self.api = PeerApi(state.management_url, state.credential, verify=self.tls)
        self._last_relogin = -1e9
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.remove_on_exit = False
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
        self.endpoints = LocalEndpoints(backend.interface, config.port, lambda: self.map.relays)
        self._offered_hosts: list[str] | None = None
        self.signalling = Signalling(
            url=lambda: self.config.signal_url or self.map.signal.url,
            token=self.api.signal_token,
            private_key=lambda: self.private_key,
            candidates=self.endpoints,
            links=self,
            status=self.signal_status,
            tls=self.tls,
        )
        self.fallback = Fallback(self)
        routes = KernelRoutes(backend.interface, state_file=config.state_dir / "routing.json")
        self.routing = RouteDriver(routes, backend.interface)
        self.map_redial = asyncio.Event()  # set: drop the map stream now and reconnect (roaming)
        self.map_backoff = Backoff()  # the one reconnect policy (agent.backoff, docs/agent.md)
        self.device_ready = asyncio.Event()  # set: guard and WireGuard up, cached map applied (run())
        self.rotation = KeyRotator(self)
        # Per-peer latency: WireGuard handshake round trips on the data path (agent/latency.py).
        self.latency = HandshakeLatency(lambda: self.endpoints.port, lambda: [lk.conn for lk in self.links.values()])

    @property
    def map_cache(self) -> Path:
        return self.config.state_dir / "map.json"

    @property
    def port(self) -> int:
        return self.endpoints.port

    # ----- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(_loop_exception)
        self.private_key = self.keys.load()
        self.public_key = public_key_of(self.private_key)
        # The map stream and signal are dialled at once, while the guard and WireGuard come up; the
        # first map is applied only once both are in place (`device_ready`, set below).
        self._tasks = [
            asyncio.create_task(self._follow_map(), name="map"),
            asyncio.create_task(self.signalling.run(), name="signal"),
        ]
        # Handshake timing (peer latency) listens before WireGuard's first handshakes go out.
        self._tasks.append(asyncio.create_task(self.latency.run(), name="latency"))
        control = ControlServer(self.config.control_socket, self)
        try:
            await self._device_up()
            cached = self._load_cached_map()
            if cached is not None:
                await self._apply(cached, initial=True)
            self.device_ready.set()
            await control.start()
        except BaseException:
            await self._stop_tasks()
            await self.signalling.close()
            await self.api.close()
            raise
        if self.config.metrics_listen:
            from agent.metrics import serve_metrics

            serve_metrics(self.config.metrics_listen, self.status)
        self._tasks += [
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._reporter(), name="reporter"),
            asyncio.create_task(self.endpoints.keep_mapping(self.signalling.reoffer_all), name="nat"),
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
            await self._stop_tasks()
            await control.stop()
            await self.signalling.close()
            await self.api.close()
            await self.fallback.close(link.conn for link in self.links.values())
            self.endpoints.close()
            await self.endpoints.remove()
            await self.routing.remove()  # the host's routing as it was (an exit node must not outlive us)
            if self.remove_on_exit:
                with contextlib.suppress(FirewallError):
                    await asyncio.to_thread(self.firewall.remove)
                await asyncio.to_thread(self.backend.down)
                log.info("interface %s removed", self.backend.interface)
            else:
                self.backend.close()
            self.firewall.close()

    async def _device_up(self) -> None:
        """The firewall guard and the WireGuard device, side by side (each waits on its own process: nft,
        wireguard-go). Fail closed all the same: no peer is configured before both are done, and a device
        we adopt (restart) keeps the previous run's ruleset until the guard replaces it."""

        async def guard() -> None:
            try:
                await asyncio.to_thread(self.firewall.install_guard)
            except FirewallError as exc:
                log.error("firewall guard: %s (retrying)", exc)
                self.firewall_pending = True

        await asyncio.gather(guard(), asyncio.to_thread(self.backend.up, self.private_key, self.config.port))
        self.endpoints.set_port(await asyncio.to_thread(self.backend.listen_port) or self.config.port)

    async def _stop_tasks(self) -> None:
        """Cancel the agent's tasks and wait for each to end (none is left pending)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

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
        backoff = self.map_backoff
        while True:
            try:
                async for event, data in _until(self.api.stream(), self.map_redial):
                    if event in ("map", "delta"):
                        if not self.management.connected:
                            self.management.set(True)
                            backoff.reset()
                        message = parse_map_message(data)  # WireFormatError: nothing changed
                        await self.device_ready.wait()  # only at start-up: the map came before the device
                        await self._apply(message)
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
                    await self.api.reconnect()  # pooled connections from the old address are dead
                    backoff.reset()
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
                    backoff.reset()
                    continue
            except (ValueError, KeyError, TypeError) as exc:
                self.management.set(False, f"bad map message: {exc}")
                log.error("bad map message from the coordinator: %s", exc)
            delay = backoff.next()
            log.debug("coordinator: next map stream attempt in %.2fs", delay)
            await asyncio.sleep(delay)

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
        self.signalling.url_known.set()  # signal may dial now (the map may carry its URL), while we configure
        prefix = ipaddress.IPv4Network(me.mesh_prefix or f"{me.mesh_ip}/32", strict=False)
        address = (me.mesh_ip, prefix.prefixlen)
        endpoints = self.endpoints
        # Our address, the firewall and (before the first offers, so that they carry it; bounded: 1 s) our
        # public mapping, side by side: none needs another, and peers are configured only once all are done.
        steps: list[Awaitable[object]] = []
        if address != self._address:
            steps.append(self._set_address(address))
        if change.firewall or change.forward or self.firewall_pending:
            steps.append(self._apply_firewall())
        if change.added and endpoints.reflexive.address is None and endpoints.reflexive.last_error is None:
            steps.append(endpoints.refresh_reflexive(limit=1.0))
        for result in await asyncio.gather(*steps, return_exceptions=True):  # all end before we go on
            if isinstance(result, BaseException):
                raise result
        await self._reconcile(change)
        if change.routes or change.forward or change.added or change.removed or change.firewall:
            await self._route()
        if endpoints.reflexive.address is None and endpoints.stun_servers():
            endpoints.wakeup.set()
        if not initial:
            await asyncio.to_thread(self._save_map)

    async def _set_address(self, address: tuple[str, int]) -> None:
        await asyncio.to_thread(netlink.ensure_address, self.backend.interface, *address)
        self._address = address

    async def _reconcile(self, change: MapChange) -> None:
        """Links follow the map: removed peers are closed, changed ones updated (a new key is swapped in
        place), new ones started; on a full map, WireGuard peers the map does not hold are removed."""
        for pid, entry in change.removed.items():
            link = self.links.pop(pid, None)
            if link is not None:
                self._by_key.pop(link.entry.public_key, None)
                await link.close()
            else:
                await self.wg.remove_peer(entry.public_key)
            log.info("peer %s removed", entry.name)
        for pid, (old, new) in change.changed.items():
            link = self.links.get(pid)
            if link is None:
                change.added[pid] = new
            elif old.public_key != new.public_key:
                self._by_key.pop(link.entry.public_key, None)
                self._by_key[new.public_key] = link
                await link.rekey(new, self.signalling.pending_for(new.public_key))
            else:
                await link.update(new)
        existing: dict[str, PeerStats] | None = None
        for pid, entry in change.added.items():
            if existing is None:
                existing = await self.wg.peers()
            link = PeerLink(
                entry,
                keepalive=self.config.keepalive,
                wg=self.wg,
                offers=self.signalling,
                nets=self.endpoints,
                nat=self.fallback,
            )
            self.links[pid] = link
            self._by_key[entry.public_key] = link
            await link.start(existing.get(entry.public_key), self.signalling.pending_for(entry.public_key))
        if change.full:
            wanted = {e.public_key for e in self.map.peers.values()}
            for key in set(await self.wg.peers()) - wanted:
                await self.wg.remove_peer(key)

    async def _route(self) -> None:
        """Routes, exit node and forwarding in line with the map and the tunnels (agent.routing.driver)."""
        await self.routing.follow(
            self.map,
            self.links,
            exit_setting=self.config.exit_node,
            control_urls=(self.state.management_url, self.config.signal_url or self.map.signal.url),
            mono=time.monotonic(),
        )

    async def set_exit_node(self, wanted: str) -> RoutingStatus:
        """`starling up --exit-node`: use this exit node (name or id; "none": none; "": the coordinator's)."""
        self.config.exit_node = wanted
        await self._route()
        return self.routing.status(self._names())

    def _names(self) -> dict[str, str]:
        return {pid: entry.name for pid, entry in self.map.peers.items()}

    # The LinkDirectory that signalling routes through.
    def link_for_key(self, public_key: str) -> PeerLink | None:
        return self._by_key.get(public_key)

    def all_links(self) -> list[PeerLink]:
        return list(self.links.values())

    async def _apply_firewall(self) -> None:
        section = self.map.firewall()
        try:
            if self.firewall_pending:
                await asyncio.to_thread(self.firewall.install_guard)
            await asyncio.to_thread(self.firewall.apply, section, self.map.forward)
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

    # ----- the fallback's host (agent.nat.fallback.FallbackHost) ----------------------------------
    @property
    def signal(self) -> SignalLink | None:
        return self.signalling.client

    async def fresh_candidates(self) -> list[Candidate]:
        return await self.endpoints.fresh_candidates()

    def ice_address_ok(self, address: str) -> bool:
        return self.endpoints.ice_address_ok(address)

    async def refresh_reflexive(self) -> None:
        await self.endpoints.refresh_reflexive()

    async def send_offer(self, conn: PeerConnection) -> None:
        await self.signalling.offer(conn, "offer")

    async def point_wireguard(self, conn: PeerConnection, endpoint: str, *, fresh: bool) -> None:
        link = self.links.get(conn.peer_id)
        if link is not None:
            await link.point(endpoint, fresh=fresh)

    async def nudge(self, conn: PeerConnection, endpoint: str | None = None) -> None:
        link = self.links.get(conn.peer_id)
        if link is not None:
            await link.nudge(endpoint)

    # ----- key rotation's host (agent.rekey.RotationHost) -----------------------------------------
    async def reload_key(self, expect_public_key: str | None = None, verify_timeout: float = 30.0) -> dict[str, Any]:
        """`starling key reload` (the control socket): see agent.rekey."""
        return await self.rotation.reload(expect_public_key, verify_timeout)

    def adopt_key(self, private_key: str, public_key: str) -> None:
        self.private_key, self.public_key = private_key, public_key

    def renew_signal_identity(self) -> None:
        self.signalling.renew_identity()

    def wireguard_peers(self) -> dict[str, PeerStats]:
        return self.wg.peers_now()

    def peer_name(self, public_key: str) -> str | None:
        link = self._by_key.get(public_key)
        return link.entry.name if link else None

    # ----- watchdog and reports ---------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now, mono = time.time(), time.monotonic()  # before the reading: see PeerConnection.observe
            stats = await self.wg.peers()
            # Read afresh after any link/address event (not the 2 s offer cache): roaming is noticed
            # within one pass.
            current = await self.endpoints.current_candidates()
            hosts = sorted(c.address for c in current if c.kind == "host")
            if self._offered_hosts is not None and hosts != self._offered_hosts:
                self.endpoints.wakeup.set()  # new underlay address: learn the new public mapping too
                # Connections made from an address we no longer have are dead, though TCP has not
                # noticed: dial the coordinator and signal again right away.
                if set(self._offered_hosts) - set(hosts):
                    self.map_redial.set()
                    self.signalling.redial("underlay addresses changed")
                    for link in list(self.links.values()):
                        await link.underlay_changed()
                self._offered_hosts = hosts
                await self.signalling.reoffer_all("underlay addresses changed")
            self._offered_hosts = hosts
            if self.firewall_pending and self.map.loaded:
                await self._apply_firewall()
            elif self.firewall.mode == "enforce":
                try:
                    await asyncio.to_thread(self.firewall.check_drift)
                except FirewallError as exc:
                    log.error("firewall repair failed: %s", exc)
                    self.firewall_pending = True
            for link in list(self.links.values()):
                st = stats.get(link.conn.public_key)
                if st is None or link.closed:
                    continue
                try:
                    await link.watch(st, now, mono)
                except Exception:
                    # One peer's trouble must not stop the watchdog for all the others.
                    log.exception("watchdog: peer %s", link.conn.name)
            self.routing.observe(self.links.values(), mono)
            await self._route()

    async def _reporter(self) -> None:
        last: list[PathReport] | None = None
        last_sent = 0.0
        while True:
            await asyncio.sleep(self.config.report_interval)
            report: list[PathReport] = [
                {
                    "peer_id": c.peer_id,
                    "path": c.state.value,
                    "endpoint": c.endpoint,
                    "latency_ms": c.latency_ms,
                    "rx_bytes": c.rx_bytes,
                    "tx_bytes": c.tx_bytes,
                    "last_handshake": _iso(c.last_handshake),
                }
                for c in (link.conn for link in self.links.values())
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
    def status(self) -> AgentStatus:
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
            "nat": {
                "reflexive": self.endpoints.reflexive.status(),
                "stun_servers": [f"{h}:{p}" for h, p in self.endpoints.stun_servers()],
            },
            "routing": self.routing.status(self._names()),
            "latency": self.latency.status(),
            "uptime": time.time() - self.started,
            "peers": sorted((link.conn.status() for link in self.links.values()), key=lambda p: p["name"]),
        }

    def explain(self, name: str) -> Explanation | RouteExplanation | None:
        """Why a peer is on its path: NAT facts, candidates, the attempts and their results; for an
        address outside the mesh, the route, routing peer and policies it goes through."""
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            pass
        else:
            if not is_mesh_ipv4(name):
                return self.routing.explain(name, self.map, self._names())
        conn = next(
            (
                link.conn
                for link in self.links.values()
                if name in (link.conn.name, link.conn.peer_id, link.conn.public_key)
            ),
            None,
        )
        if conn is None:
            return None
        return {
            "peer": conn.status(),
            "our_candidates": [c.to_wire() for c in self.endpoints.cached],  # cache: no netlink on the loop
            "reflexive": self.endpoints.reflexive.status(),
            "controlling": self.fallback.controlling(conn),
            "history": list(conn.nat.history),
            "turn_renewals": conn.nat.renewals,
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
    # a dropped relay, an outage): not worth a traceback in the agent's log, but the transaction must end.
    handle = context.get("handle")
    if "Transaction.__retry" in repr(handle):
        ended = _end_transaction(handle)
        log.debug("late STUN retransmission on a closed ICE socket%s", " (transaction ended)" if ended else "")
        return
    loop.default_exception_handler(context)


def _end_transaction(handle: object) -> bool:
    """The retransmission timer of an aioice STUN transaction raised (its socket is closed): the timer
    is not re-armed and nothing answers, so the transaction's future would stay pending for ever, and
    with it the task awaiting it (an ICE check, a TURN refresh or allocation), until the garbage
    collector destroys that task ("Task was destroyed but it is pending"). End it as aioice ends a
    transaction nobody answers: TransactionTimeout, which its callers handle."""
    transaction = getattr(getattr(handle, "_callback", None), "__self__", None)
    future = getattr(transaction, "_Transaction__future", None)
    if not isinstance(future, asyncio.Future) or future.done():
        return False
    from aioice.stun import TransactionTimeout

    future.set_exception(TransactionTimeout())
    return True


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
