"""Mesh IP allocation inside the configured prefix (always within 100.64.0.0/10)."""

from __future__ import annotations

import ipaddress
import socket

CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class PrefixError(ValueError):
    pass


def parse_mesh_prefix(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise PrefixError(f"invalid mesh prefix {text!r}: {exc}") from exc
    if not net.subnet_of(CGNAT):
        raise PrefixError(f"mesh prefix {text} must lie inside 100.64.0.0/10")
    if net.prefixlen > 30:
        raise PrefixError(f"mesh prefix {text} is too small (at most /30)")
    return net


class IpAllocator:
    """Hands out the lowest free host address; addresses in use are never handed out again."""

    def __init__(self, prefix: ipaddress.IPv4Network) -> None:
        self.prefix = prefix
        self._first = int(prefix.network_address) + 1
        self._last = int(prefix.broadcast_address) - 1
        self._hint = self._first

    def allocate(self, used: set[str]) -> str:
        used_ints = {int.from_bytes(socket.inet_aton(ip), "big") for ip in used}
        span = self._last - self._first + 1
        candidate = max(self._hint, self._first)
        for _ in range(span):
            if candidate > self._last:
                candidate = self._first
            if candidate not in used_ints:
                self._hint = candidate + 1
                return str(ipaddress.IPv4Address(candidate))
            candidate += 1
        raise PrefixError(f"mesh prefix {self.prefix} is full")

    def contains(self, ip: str) -> bool:
        return ipaddress.IPv4Address(ip) in self.prefix
