"""Links, addresses and routes of the mesh interface, through pyroute2's IPRoute (rtnetlink)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class NetlinkError_(Exception):
    pass


@contextmanager
def iproute() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(name: str) -> int | None:
    with iproute() as ipr:
        found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_exists(name: str) -> bool:
    return link_index(name) is not None


def set_up(name: str, mtu: int | None = None) -> None:
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise NetlinkError_(f"interface {name} does not exist")
        kwargs: dict[str, object] = {"state": "up"}
        if mtu:
            kwargs["mtu"] = mtu
        ipr.link("set", index=idx[0], **kwargs)


def delete_link(name: str) -> bool:
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as exc:
            raise NetlinkError_(f"cannot delete {name}: {exc}") from exc
    return True


def ensure_address(name: str, address: str, prefixlen: int) -> None:
    """Make `address/prefixlen` the only IPv4 address of the link (adds the connected route too)."""
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise NetlinkError_(f"interface {name} does not exist")
        current = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx[0], family=2)}
        if (address, prefixlen) in current:
            return
        for addr, plen in current:
            ipr.addr("del", index=idx[0], address=addr, prefixlen=plen)
        ipr.addr("add", index=idx[0], address=address, prefixlen=prefixlen)


def local_addresses(exclude_ifaces: set[str], exclude_nets: list[ipaddress.IPv4Network]) -> list[tuple[str, str, int]]:
    """(interface, IPv4, prefix length) of usable local addresses: no loopback, no excluded interfaces or ranges."""
    out = []
    with iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr(family=2):
            ifname = names.get(a["index"], "")
            ip = a.get_attr("IFA_ADDRESS")
            if not ip or ifname in exclude_ifaces:
                continue
            addr = ipaddress.IPv4Address(ip)
            if addr.is_loopback or addr.is_link_local or any(addr in net for net in exclude_nets):
                continue
            out.append((ifname, ip, int(a["prefixlen"])))
    return out
