"""`RouteDriver`: the daemon's part that makes routes happen on this host, from the map and the tunnels.

Each watchdog pass it feeds the tunnels' liveness into `RouteChoice`, then reconciles:

* client side: each peer link's WireGuard allowed IPs get the prefixes that peer is the active routing
  peer for (`PeerLink.set_routing`), and the kernel gets a route per prefix through the mesh interface
  (and, when this peer chose an exit node, the exit routing table and rules) through the `RouteTable`
  port (agent.routing.kernel in production);
* routing-peer side: IP forwarding on while the map says we forward anything, and a short keepalive
  (`ROUTE_KEEPALIVE`) towards every peer our routes serve, so their agents see us up or gone within
  seconds (their failover depends on it). What may be forwarded is the firewall's business
  (`forward` rules in agent.firewall).

Kernel changes run in a worker thread and only when the plan changed (or every `RECHECK` seconds,
which re-evaluates prefixes skipped because the host is directly on them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from agent.netmap import NetworkMap
from agent.peers import PathState, PeerConnection
from agent.routing.choice import EXIT, ROUTE_KEEPALIVE, RouteChoice, RouteState, RoutingDecision
from agent.routing.plan import ExitPlan, RoutingPlan
from agent.routing.port import RouteTable, RoutingError, RoutingReport
from agent.status import RouteExplanation, RoutePolicy, RouteStatus, RoutingStatus
from agent.wg.backend import FWMARK

log = logging.getLogger("starling.agent.routing")
RECHECK = 10.0  # s between kernel re-checks while nothing changed
RESOLVE_TTL = 60.0  # s a resolved control-plane host name is reused


class RoutedLink(Protocol):
    """What the driver needs of a peer link (agent.link.PeerLink)."""

    conn: PeerConnection

    async def set_routing(self, routed: tuple[str, ...], route_keepalive: int) -> None: ...


class RouteDriver:
    def __init__(self, table: RouteTable, interface: str) -> None:
        self.table = table
        self.interface = interface
        self.choice = RouteChoice()
        self.decision = RoutingDecision()
        self.report: RoutingReport | None = None
        self.last_error: str | None = None
        self._plan: RoutingPlan | None = None
        self._planned: tuple[object, ...] | None = None  # what `_plan` was built from (skips rebuilding it)
        self._applied_at = -1e9
        self._lock = asyncio.Lock()
        self._resolved: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._served: tuple[tuple[int, int, int], frozenset[str]] | None = None  # forward_sources per map

    def observe(self, links: Iterable[RoutedLink], mono: float) -> None:
        for link in links:
            conn = link.conn
            self.choice.observe(conn.peer_id, conn.rx_bytes, conn.state in (PathState.DIRECT, PathState.RELAYED), mono)

    async def follow(
        self,
        netmap: NetworkMap,
        links: Mapping[str, RoutedLink],
        *,
        exit_setting: str,
        control_urls: Iterable[str],
        mono: float,
    ) -> None:
        """One pass of the daemon (each map and each watchdog pass): the exit node from this agent's
        setting (else the coordinator's for this peer), its bypass (only while an exit node is used:
        the control plane's `control_urls`, the map's relays and the peers' endpoints), then `reconcile`."""
        if not netmap.loaded:
            return
        exit_node = resolve_exit(exit_setting or (netmap.me.exit_node if netmap.me else ""), netmap)
        bypass: tuple[str, ...] = ()
        if exit_node:
            urls = [*control_urls, *(url for relay in netmap.relays for url in relay.urls)]
            bypass = await self.bypass_for(urls, links.values())
        await self.reconcile(netmap, links, exit_node=exit_node, bypass=bypass, mono=mono)

    async def reconcile(
        self,
        netmap: NetworkMap,
        links: Mapping[str, RoutedLink],
        *,
        exit_node: str | None,
        bypass: tuple[str, ...],
        mono: float,
    ) -> None:
        """Bring allowed IPs, keepalives and the kernel in line with the map and the current choice."""
        async with self._lock:
            self.choice.forget(set(self.choice.health) - set(links))
            self.decision = decision = self.choice.decide(netmap.routes, set(links), exit_node, mono)
            served = self._forward_sources(netmap)
            for pid, link in links.items():
                keepalive = ROUTE_KEEPALIVE if link.conn.mesh_ip in served else 0
                await link.set_routing(decision.allowed.get(pid, ()), keepalive)
            prefixes = decision.prefixes
            # The plan's inputs: a pass that changes none of them builds no plan (building one checks
            # every prefix) and, between re-checks, touches no kernel state.
            planned = (prefixes, bypass if decision.exit_node else None, bool(netmap.forward))
            if planned == self._planned and (mono - self._applied_at < RECHECK or not (prefixes or decision.exit_node)):
                return  # unchanged (re-checked now and then: a skipped prefix may have become usable)
            exit_plan = ExitPlan(bypass=bypass, fwmark=FWMARK) if decision.exit_node else None
            plan = RoutingPlan(
                interface=self.interface, prefixes=prefixes, exit=exit_plan, forwarding=bool(netmap.forward)
            )
            try:
                self.report = await asyncio.to_thread(self.table.apply, plan)
                self.last_error = None
            except RoutingError as exc:
                self.last_error = str(exc)
                log.error("routes not applied: %s", exc)
                return
            if plan != self._plan:
                log.info(
                    "routes: %d prefixes via %s, exit node %s, forwarding %s",
                    len(plan.prefixes),
                    self.interface,
                    decision.exit_node or "none",
                    "on" if plan.forwarding else "off",
                )
            self._plan, self._planned, self._applied_at = plan, planned, mono

    def _forward_sources(self, netmap: NetworkMap) -> frozenset[str]:
        """`forward_sources` of the map, worked out again only when another map message was applied."""
        key = (netmap.serial, id(netmap.rules), id(netmap.sets))
        if self._served is None or self._served[0] != key:
            self._served = (key, frozenset(forward_sources(netmap)))
        return self._served[1]

    async def bypass_for(self, urls: Iterable[str], links: Iterable[RoutedLink]) -> tuple[str, ...]:
        """Underlay addresses that must never enter an exit-node tunnel: the hosts of the control plane
        and relay URLs (names resolved, cached `RESOLVE_TTL`) and every peer's endpoint and candidates."""
        out: set[str] = set()
        for url in urls:
            host = _host_of(url)
            if host:
                out.update(await self._resolve(host))
        for link in links:
            conn = link.conn
            for address in [conn.endpoint or "", conn.wg_endpoint or "", *(c.address for c in conn.candidates)]:
                host = address.rpartition(":")[0].strip("[]")
                if _ipv4(host) and not host.startswith("127."):
                    out.add(host)
        return tuple(sorted(out, key=lambda a: socket.inet_aton(a)))

    async def _resolve(self, host: str) -> tuple[str, ...]:
        if _ipv4(host):
            return (host,)
        cached = self._resolved.get(host)
        if cached is not None and time.monotonic() - cached[0] < RESOLVE_TTL:
            return cached[1]
        try:
            infos = await asyncio.to_thread(socket.getaddrinfo, host, None, socket.AF_INET, socket.SOCK_STREAM)
            found = tuple(sorted({str(info[4][0]) for info in infos}))
        except OSError as exc:
            log.warning("cannot resolve %s for the exit-node bypass: %s", host, exc)
            found = cached[1] if cached else ()
        self._resolved[host] = (time.monotonic(), found)
        return found

    async def remove(self) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self.table.remove)
            except RoutingError as exc:
                log.error("routes not removed: %s", exc)

    def _skipped(self) -> dict[str, str]:
        return self.report.skipped if self.report else {}

    @staticmethod
    def _route_status(s: RouteState, names: Mapping[str, str], skipped: Mapping[str, str]) -> RouteStatus:
        """`skipped`: `_skipped()`, worked out once per status (not once per route)."""
        return {
            "id": s.route_id,
            "name": s.name,
            "prefix": s.prefix,
            "active_router": names.get(s.active, s.active) if s.active else None,
            "reason": skipped.get(s.prefix, s.reason) if s.prefix != EXIT else s.reason,
            "installed": bool(s.active) and s.prefix not in skipped,
            "routers": [{"name": names.get(p, p), "metric": m, "up": up} for p, m, up in s.routers],
        }

    def explain(self, address: str, netmap: NetworkMap, names: Mapping[str, str]) -> RouteExplanation:
        """How traffic to `address` (outside the mesh) leaves this peer: the most specific route that
        covers it (or the exit node's), its active router, and the policies that allow it."""
        ip = ipaddress.IPv4Address(address)
        covering = [
            s for s in self.decision.routes if ip in ipaddress.IPv4Network(s.prefix) and (s.prefix != EXIT or s.active)
        ]
        best = max(covering, key=lambda s: ipaddress.IPv4Network(s.prefix).prefixlen, default=None)
        policies: list[RoutePolicy] = [
            {"policy_id": r.policy_id, "protocol": r.protocol, "ports": [list(p) for p in r.ports]}
            for r in netmap.rules
            if r.direction == "route" and best is not None and r.route_id == best.route_id
        ]
        status = self._route_status(best, names, self._skipped()) if best else None
        if best is None or status is None:
            verdict = f"no route covers {address} in this peer's map (no policy allows one, or none exists)"
        elif status["installed"]:
            verdict = f"{address} goes through {status['active_router']} (route {best.name}, {best.prefix})"
        else:
            verdict = f"route {best.name} ({best.prefix}) is not in use here: {status['reason']}"
        return {
            "address": address,
            "route": status,
            "policies": policies,
            "verdict": verdict,
        }

    def status(self, names: Mapping[str, str]) -> RoutingStatus:
        """Routes as `starling status` shows them; `names`: peer id -> name."""
        skipped = self._skipped()
        routes = [self._route_status(s, names, skipped) for s in self.decision.routes]
        exit_node = self.decision.exit_node
        return {
            "routes": routes,
            "exit_node": names.get(exit_node, exit_node) if exit_node else None,
            "exit_reason": self.decision.exit_reason,
            "forwarding": bool(self._plan and self._plan.forwarding),
            "failovers": self.choice.changes,
            "last_error": self.last_error,
        }


def resolve_exit(wanted: str, netmap: NetworkMap) -> str | None:
    """The exit node's peer id from a name or id (`wanted`: the agent's own setting, else the one the
    coordinator set for this peer); "none" or "": no exit node. An unknown name stays as it is (the
    decision then says it is not offered)."""
    if not wanted or wanted == "none":
        return None
    for pid, entry in netmap.peers.items():
        if wanted in (pid, entry.name):
            return pid
    return wanted


def _host_of(url: str) -> str:
    if "://" not in url:  # stun:/turn: URLs: scheme:host[:port][?transport=...]
        url = "//" + url.partition(":")[2].partition("?")[0]
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def forward_sources(netmap: NetworkMap) -> set[str]:
    """Mesh addresses allowed through any route we forward (from the firewall's forward rules)."""
    out: set[str] = set()
    for rule in netmap.rules:
        if rule.direction == "forward":
            out.update(netmap.sets.get(rule.peer_set, ()))
    return out
