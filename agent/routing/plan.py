"""What the kernel's IPv4 routing should look like for the mesh (`RoutingPlan`), and the pure checks
that decide whether a route prefix may be installed on this host.

The daemon's reconciler builds a plan from the map (which prefixes go through the mesh interface,
whether an exit node is used, whether this peer forwards for others); a `RouteTable`
(`agent.routing.port`) makes the kernel match it. Prefixes are checked with the contract's
`check_route_prefix` (`starling_proto.routes`); `0.0.0.0/0` is never a prefix here: an exit node is
`RoutingPlan.exit`, installed in a table of its own so that the host's default route stays as it is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from starling_proto.routes import EXIT_PREFIX, check_route_prefix


def _bypass_address(value: str) -> str:
    """An IPv4 address, or the same as a /32, as plain address text; ValueError otherwise."""
    text = value.strip()
    if text.endswith("/32"):
        text = text[:-3]
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"exit bypass {value!r} is not an IPv4 address (or an IPv4 /32)") from None


@dataclass(frozen=True, slots=True)
class ExitPlan:
    """Send all other IPv4 traffic through the mesh interface (an exit node), except to `bypass`.

    `bypass`: underlay destinations that must never enter the tunnel: the coordinator, signal,
    STUN/TURN servers and every peer's underlay endpoint (WireGuard's own packets to them). IPv4
    addresses or /32s; normalised to sorted, unique addresses. IPv6 is not routed into the tunnel,
    so IPv6 destinations need no bypass (and are refused here, to catch a daemon passing them by mistake).
    `fwmark`: the firewall mark WireGuard sets on its own packets, if the daemon configured one; the
    exit rule then skips marked packets (`not fwmark M`, like wg-quick). None: no mark is set, the
    bypass rules alone keep WireGuard's packets out of the tunnel.
    """

    bypass: tuple[str, ...] = ()
    fwmark: int | None = None

    def __post_init__(self) -> None:
        addresses = sorted({_bypass_address(a) for a in self.bypass}, key=ipaddress.IPv4Address)
        object.__setattr__(self, "bypass", tuple(addresses))
        if self.fwmark is not None and not 0 < self.fwmark <= 0xFFFFFFFF:
            raise ValueError(f"exit fwmark {self.fwmark} is not a 32-bit mark above 0")


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """The desired routing of one mesh interface.

    `prefixes`: route prefixes (canonical IPv4 CIDR text, as in the map) to send through the mesh
    interface; normalised to sorted and unique; `0.0.0.0/0` is refused (use `exit`).
    `exit`: None, or the exit node's routing (`ExitPlan`).
    `forwarding`: this peer is a routing peer: IPv4 forwarding must be on.
    """

    interface: str
    prefixes: tuple[str, ...] = ()
    exit: ExitPlan | None = None
    forwarding: bool = False

    def __post_init__(self) -> None:
        if not self.interface or len(self.interface) > 15 or "/" in self.interface or " " in self.interface:
            raise ValueError(f"{self.interface!r} is not an interface name")
        nets = set()
        for prefix in self.prefixes:
            net = check_route_prefix(prefix)
            if net == EXIT_PREFIX:
                raise ValueError(f"{prefix} is an exit node, not a route prefix: give RoutingPlan.exit instead")
            nets.add(net)
        object.__setattr__(self, "prefixes", tuple(str(n) for n in sorted(nets)))

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(ipaddress.IPv4Network(p) for p in self.prefixes)


@dataclass(frozen=True, slots=True, order=True)
class ConnectedNet:
    """A network this host is directly on: an address or a link-scope route of another interface."""

    network: ipaddress.IPv4Network
    interface: str = field(compare=False)


def connected_networks(
    addresses: Iterable[tuple[str, str, int]],
    link_routes: Iterable[tuple[str, str, int]],
    mesh_interface: str,
) -> list[ConnectedNet]:
    """The directly connected networks of every interface but the mesh one, from (interface, address,
    prefix length) of its IPv4 addresses and of its link-scope routes. Default routes (a link-scope
    `default dev ppp0`) are not a network the host is "on", and are left out."""
    found: dict[tuple[ipaddress.IPv4Network, str], ConnectedNet] = {}
    for ifname, address, plen in (*addresses, *link_routes):
        if ifname == mesh_interface or plen == 0:
            continue
        net = ipaddress.IPv4Network(f"{address}/{plen}", strict=False)
        if net.is_loopback:
            continue
        found.setdefault((net, ifname), ConnectedNet(net, ifname))
    return sorted(found.values(), key=lambda c: (c.network, c.interface))


def overlap_reason(prefix: ipaddress.IPv4Network, connected: Iterable[ConnectedNet]) -> str | None:
    """Why `prefix` must not go through the mesh (it overlaps a network this host is directly on:
    routing it away would cut the host off its own LAN, or shadow part of it), or None."""
    for net in connected:
        if prefix.overlaps(net.network):
            return f"{prefix} overlaps {net.network} on {net.interface}, where this host is directly connected"
    return None


def underlay_reason(prefix: ipaddress.IPv4Network, bypass: Iterable[str]) -> str | None:
    """Why `prefix` must not go through the mesh because it contains an underlay destination the
    agent itself needs outside the tunnel (a coordinator, relay or peer endpoint), or None."""
    for address in bypass:
        if ipaddress.IPv4Address(address) in prefix:
            return f"{prefix} contains {address}, which the agent must reach outside the mesh (underlay)"
    return None


__all__ = [
    "ConnectedNet",
    "ExitPlan",
    "RoutingPlan",
    "connected_networks",
    "overlap_reason",
    "underlay_reason",
]
