"""Links, addresses and routes of the mesh interface, through pyroute2's IPRoute (rtnetlink).

pyroute2 is imported on first use, not with this module: `import pyroute2` loads every netlink family
it knows (~0.1-0.2 s of CPU), and `starling up` must not pay for it before it enrolls. Whether a link
exists is answered without it (`if_nametoindex`)."""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger("starling.agent")


class NetlinkError_(Exception):
    pass


@contextmanager
def iproute() -> Iterator[IPRoute]:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(name: str) -> int | None:
    """The link's index in this network namespace, None when there is no such link."""
    try:
        return socket.if_nametoindex(name)
    except OSError:  # ENODEV: no such link (also for names the kernel would refuse)
        return None


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
    from pyroute2.netlink.exceptions import NetlinkError

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


class AddressWatch:
    """Whether links or IPv4 addresses changed since the last look (rtnetlink multicast groups), so that
    the watchdog reads the addresses only when something happened: a full read costs ~2 ms of CPU,
    which every 0.5 s doubled an idle agent's CPU. If the socket cannot be opened, or its buffer
    overflowed, every look says "changed" (reading too often is safe; missing a change is not)."""

    MAX_DRAIN = 1000  # messages drained per look (a flood of events still counts as one change)

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None
        try:
            from pyroute2 import IPRoute
            from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK

            ipr = IPRoute()
            ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_LINK)
            self._ipr = ipr
        except Exception as exc:  # no watch: every look says "changed" (the old polling)
            log.warning("no rtnetlink address events (%s): reading the addresses every watchdog pass", exc)
            self._ipr = None

    def changed(self) -> bool:
        """Non-blocking: True if any link or address event arrived since the last call."""
        ipr = self._ipr
        if ipr is None:
            return True
        try:
            if not select.select([ipr.fileno()], [], [], 0)[0]:
                return False
            for _ in range(self.MAX_DRAIN):
                ipr.get()
                if not select.select([ipr.fileno()], [], [], 0)[0]:
                    break
        except Exception as exc:  # e.g. ENOBUFS after an overflow: events were lost, so something changed
            log.debug("address watch: %s", exc)
        return True

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
