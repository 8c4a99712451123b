"""Network routes in the map contract: which LAN prefixes a peer may reach through which routing peers
(`RouteEntry`, a client's view), and what a routing peer forwards (`ForwardEntry`).

A route is an IPv4 prefix behind one or more routing peers (each with a metric: lower is preferred).
`0.0.0.0/0` makes the routing peers exit nodes: a client uses one only when it opted in (its
`exit_node` setting), never by default. The firewall rules that let traffic through a route are in
the firewall section (`starling_proto.firewall`, directions `route` and `forward`).

`check_route_prefix` is the one definition of an acceptable prefix, used by the coordinator's API and
by the agent's map parser alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from starling_proto.wire import WireFormatError, array, flag, integer, obj, text

MESH = ipaddress.IPv4Network("100.64.0.0/10")
EXIT_PREFIX = ipaddress.IPv4Network("0.0.0.0/0")
METRIC_MIN, METRIC_MAX, METRIC_DEFAULT = 1, 9999, 9999
MAX_ROUTERS = 64
_FORBIDDEN = (
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local"),
    (ipaddress.IPv4Network("224.0.0.0/3"), "multicast or reserved"),
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network'"),
)


def check_route_prefix(value: object, mesh: ipaddress.IPv4Network = MESH) -> ipaddress.IPv4Network:
    """The prefix as a network, or ValueError saying why it cannot be a route: not IPv4 CIDR text in
    canonical form (host bits set), overlapping the mesh range, or loopback/link-local/multicast.
    `0.0.0.0/0` (an exit node) is allowed: the mesh's own, more specific route still wins."""
    if not isinstance(value, str) or "/" not in value or len(value) > 18:
        raise ValueError(f"{value!r} is not an IPv4 prefix like 198.18.40.0/24")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 prefix in canonical form ({exc})") from None
    if str(net) != value:
        raise ValueError(f"{value!r} is not in canonical form (write {net})")
    if net == EXIT_PREFIX:
        return net
    if net.overlaps(mesh):
        raise ValueError(f"{value} overlaps the mesh range {mesh}: mesh addresses are routed by the mesh itself")
    for bad, what in _FORBIDDEN:
        if net.overlaps(bad):
            raise ValueError(f"{value} overlaps {bad} ({what}): not routable through the mesh")
    return net


def wire_prefix(value: object, where: str) -> str:
    """`where`.prefix of a map (a route, a forward entry or a firewall rule), checked: WireFormatError otherwise."""
    try:
        check_route_prefix(value)
    except ValueError as exc:
        raise WireFormatError(f"{where}.prefix: {exc}", field=f"{where}.prefix") from None
    return str(value)


@dataclass(frozen=True, slots=True)
class RouterRef:
    """One routing peer of a route (its id is in the map's `peers`) and its metric (lower wins)."""

    peer_id: str
    metric: int = METRIC_DEFAULT

    def to_wire(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "metric": self.metric}

    @classmethod
    def from_wire(cls, raw: object, where: str) -> RouterRef:
        doc = obj(raw, where)
        metric = integer(doc, "metric", where)
        if not METRIC_MIN <= metric <= METRIC_MAX:
            raise WireFormatError(f"{where}.metric: {metric} is outside {METRIC_MIN}-{METRIC_MAX}", field=where)
        return cls(text(doc, "peer_id", where, empty=False, limit=64), metric)


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """A route this peer may use (some policy allows it), with the routing peers it can go through."""

    id: str
    name: str
    prefix: str
    routers: tuple[RouterRef, ...]

    @property
    def exit_node(self) -> bool:
        return self.prefix == str(EXIT_PREFIX)

    def to_wire(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "prefix": self.prefix, "routers": [r.to_wire() for r in self.routers]}

    @classmethod
    def from_wire(cls, raw: object, where: str) -> RouteEntry:
        doc = obj(raw, where)
        routers = array(doc.get("routers"), f"{where}.routers", MAX_ROUTERS)
        return cls(
            text(doc, "id", where, empty=False, limit=64),
            text(doc, "name", where, limit=253),
            wire_prefix(doc.get("prefix"), where),
            tuple(RouterRef.from_wire(r, f"{where}.routers[{i}]") for i, r in enumerate(routers)),
        )


@dataclass(frozen=True, slots=True)
class ForwardEntry:
    """A route this peer is a routing peer of: forward mesh traffic to `prefix` (as the firewall's
    `forward` rules allow), masquerading it behind this host's LAN address when `masquerade`."""

    route_id: str
    name: str
    prefix: str
    masquerade: bool = True

    @property
    def exit_node(self) -> bool:
        return self.prefix == str(EXIT_PREFIX)

    def to_wire(self) -> dict[str, object]:
        return {"route_id": self.route_id, "name": self.name, "prefix": self.prefix, "masquerade": self.masquerade}

    @classmethod
    def from_wire(cls, raw: object, where: str) -> ForwardEntry:
        doc = obj(raw, where)
        return cls(
            text(doc, "route_id", where, empty=False, limit=64),
            text(doc, "name", where, limit=253),
            wire_prefix(doc.get("prefix"), where),
            flag(doc, "masquerade", where, True),
        )


def routes_from_wire(raw: object, where: str = "routes") -> tuple[RouteEntry, ...]:
    entries = tuple(RouteEntry.from_wire(r, f"{where}[{i}]") for i, r in enumerate(array(raw, where, 10_000)))
    _unique((e.id for e in entries), where)
    return entries


def forward_from_wire(raw: object, where: str = "forward") -> tuple[ForwardEntry, ...]:
    entries = tuple(ForwardEntry.from_wire(r, f"{where}[{i}]") for i, r in enumerate(array(raw, where, 10_000)))
    _unique((e.route_id for e in entries), where)
    return entries


def _unique(ids: Iterable[str], where: str) -> None:
    seen: set[str] = set()
    for i, rid in enumerate(ids):
        if rid in seen:
            raise WireFormatError(f"{where}[{i}]: route {rid!r} appears twice", field=f"{where}[{i}]")
        seen.add(rid)
