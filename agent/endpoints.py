"""Where peers can reach us (`LocalEndpoints`): our host candidates (underlay addresses, cached), the
WireGuard port's public mapping learnt with STUN from the map's relays, and the networks we are on.
The NAT loop keeps the mapping fresh and tells the agent when our candidates changed."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from agent import netlink
from agent.nat.reflexive import ReflexiveProbe
from agent.nat.stun import parse_server
from agent.peers import Candidate
from starling_proto.netmap import RelayCredential

log = logging.getLogger("starling.agent")
MESH = ipaddress.IPv4Network("100.64.0.0/10")
VIRTUAL_PREFIXES = ("docker", "br-", "virbr", "cni", "flannel", "cali", "kube", "podman", "veth", "tailscale", "wt")
NAT_REFRESH = 25.0  # s between STUN refreshes of the WireGuard port's public mapping
ADDRESS_RECHECK = 10.0  # s: addresses are read at least this often, even without a netlink event


class LocalEndpoints:
    """Our candidates and public mapping. `relays` reads the current map's relays (STUN servers)."""

    def __init__(self, interface: str, port: int, relays: Callable[[], tuple[RelayCredential, ...]]) -> None:
        self.interface = interface
        self.port = port  # WireGuard's listen port (set again once the device is up)
        self.relays = relays
        self.reflexive = ReflexiveProbe(port)
        self.wakeup = asyncio.Event()  # set: learn the public mapping now (new underlay address)
        self._cache: tuple[float, list[Candidate]] = (0.0, [])
        self._watch: netlink.AddressWatch | None = None
        self._checked = 0.0  # monotonic time of the last full read for `current_candidates`

    def set_port(self, port: int) -> None:
        self.port = port
        self.reflexive.wg_port = port
        self.forget()

    def forget(self) -> None:
        """Drop the candidate cache (the next read asks netlink again)."""
        self._cache = (0.0, [])

    @property
    def cached(self) -> list[Candidate]:
        """The candidates last read (no netlink: safe on the event loop)."""
        return self._cache[1]

    def host_candidates(self, max_age: float = 2.0) -> list[Candidate]:
        """Our candidates (cached for `max_age` s: offers to many peers must not each open netlink).
        Blocking: call from a thread (or through `fresh_candidates`)."""
        at, cached = self._cache
        if time.monotonic() - at < max_age:
            return cached
        addrs = netlink.local_addresses({self.interface}, [MESH])
        cands = [
            Candidate(f"{ip}:{self.port}", "host") for name, ip, _ in addrs if not name.startswith(VIRTUAL_PREFIXES)
        ]
        srflx = self.reflexive.address
        if srflx and srflx not in {c.address for c in cands}:
            cands.append(Candidate(srflx, "srflx"))
        self._cache = (time.monotonic(), cands)
        return cands

    async def fresh_candidates(self, max_age: float = 2.0) -> list[Candidate]:
        return await asyncio.to_thread(self.host_candidates, max_age)

    async def current_candidates(self) -> list[Candidate]:
        """Our candidates now, for the watchdog's roaming check: read afresh when rtnetlink reported a
        link or address change (or every ADDRESS_RECHECK s), else the last reading (no netlink read)."""
        # In a worker thread: pyroute2 runs its own event loop inside its synchronous calls.
        if self._watch is None:
            self._watch = await asyncio.to_thread(netlink.AddressWatch)
        now = time.monotonic()
        changed = await asyncio.to_thread(self._watch.changed)
        if changed or now - self._checked >= ADDRESS_RECHECK or not self._cache[0]:
            self._checked = now
            return await self.fresh_candidates(0.0)
        return self._cache[1]

    def ice_address_ok(self, address: str) -> bool:
        """ICE host candidates: exactly the addresses we offer as host candidates (no mesh, no virtual).
        Runs inside aioice on the event loop: uses the cache that `fresh_candidates()` filled."""
        return address in {c.ip for c in self._cache[1] if c.kind == "host"}

    async def local_nets(self) -> list[ipaddress.IPv4Network]:
        """The networks we are directly on (same-subnet candidates are tried first)."""
        addrs = await asyncio.to_thread(netlink.local_addresses, {self.interface}, [MESH])
        return [ipaddress.IPv4Network(f"{ip}/{plen}", strict=False) for _, ip, plen in addrs]

    def stun_servers(self) -> list[tuple[str, int]]:
        """STUN servers: every UDP STUN/TURN URL of the map's relays (coturn answers STUN too)."""
        servers: list[tuple[str, int]] = []
        for relay in self.relays():
            for url in relay.urls:
                if "transport=tcp" in url or not url.startswith(("stun:", "turn:")):
                    continue
                with contextlib.suppress(ValueError):
                    server = parse_server(url)
                    if server not in servers:
                        servers.append(server)
        return servers

    async def refresh_reflexive(self, limit: float = 2.0) -> bool:
        """Ask STUN for our public mapping now; True if it changed (then the candidate cache, which holds
        the old mapping, is dropped)."""
        servers = self.stun_servers()
        if not servers:
            return False
        before = self.reflexive.address
        await self.reflexive.learn(servers, limit=limit)
        if self.reflexive.address == before:
            return False
        self.forget()
        return True

    async def keep_mapping(self, changed: Callable[[str], Awaitable[None]]) -> None:
        """Keep the WireGuard port's public mapping known; `changed(why)` when it moves."""
        while True:
            # Cleared before learning, not after: a wakeup while a probe is under way (roaming: the
            # new address appeared first, the old one went while we asked through it) must not be lost.
            self.wakeup.clear()
            if await self.refresh_reflexive():
                await changed("public address changed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NAT_REFRESH):
                    await self.wakeup.wait()

    def close(self) -> None:
        self.reflexive.close()
        if self._watch is not None:
            self._watch.close()

    async def remove(self) -> None:
        await asyncio.to_thread(self.reflexive.remove)
