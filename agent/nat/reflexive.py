"""The WireGuard port's public (server-reflexive) address, learned by STUN while WireGuard owns the port.

WireGuard (kernel or wireguard-go) holds the UDP port, so the agent cannot send STUN from it. It
sends from a side socket instead and lets one nftables rule rewrite that socket's source port to
the WireGuard port (`snat to :PORT` in the agent's table `ip starling-stun`): the NAT in front of
the host sees the WireGuard port and answers with the mapping WireGuard's own packets get (with
an endpoint-independent NAT: the mapping every peer sees). Conntrack takes the answer back to the
side socket. The probe only ever talks to the STUN servers, which WireGuard never talks to, so
the two flows cannot clash. Without nftables the agent probes from the side socket unmapped and
says so: the address is then right only for the host's public IP, not the port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from agent.firewall.model import FirewallError
from agent.firewall.nft import Nft
from agent.nat.stun import StunClient, StunError
from agent.status import ReflexiveStatus

log = logging.getLogger("starling.agent.nat")
TABLE = "starling-stun"
UDP_SPORT = {"protocol": "udp", "field": "sport"}


def snat_table(probe_port: int, wg_port: int) -> list[dict[str, Any]]:
    """nft JSON batch: (re)create `ip starling-stun` with the one SNAT rule, atomically."""
    table = {"family": "ip", "name": TABLE}
    ref = {"family": "ip", "table": TABLE}
    return [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        {
            "add": {
                "chain": {
                    **ref,
                    "name": "postrouting",
                    "type": "nat",
                    "hook": "postrouting",
                    "prio": 100,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "rule": {
                    **ref,
                    "chain": "postrouting",
                    "comment": "starling: STUN probes leave from the WireGuard port",
                    "expr": [
                        {"match": {"op": "==", "left": {"payload": UDP_SPORT}, "right": probe_port}},
                        {"snat": {"port": wg_port}},
                    ],
                }
            }
        },
    ]


class ReflexiveProbe:
    """Learns and remembers the server-reflexive address of the WireGuard port."""

    def __init__(self, wg_port: int, nft: Nft | None = None) -> None:
        self.wg_port = wg_port
        self.nft = nft or Nft()
        self.probe_port = 0
        self.mapped = False  # the SNAT rule is in place: answers describe the WireGuard port
        self.address: str | None = None  # "ip:port" of the WireGuard port as the STUN server saw it
        self.server: str | None = None
        self.learned_at = 0.0
        self.last_error: str | None = None
        self._client: StunClient | None = None
        self._lock = asyncio.Lock()

    def _open(self) -> StunClient:
        """The probe socket (one port for the agent's lifetime) and the SNAT rule for it.

        One port matters: a second probe flow to the same server would be rewritten to the same
        (WireGuard port, server) tuple, conntrack would pick another source port to keep the
        tuples unique, and the server would see a port WireGuard never uses.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        sock.setblocking(False)
        self.probe_port = sock.getsockname()[1]
        try:
            self.nft.apply(snat_table(self.probe_port, self.wg_port))
            self.mapped = True
        except FirewallError as exc:
            self.mapped = False
            log.warning("STUN probe not mapped to the WireGuard port (nftables: %s)", exc)
        return StunClient(sock)

    async def learn(self, servers: list[tuple[str, int]], limit: float = 2.0) -> str | None:
        """Ask the servers in turn; returns the new address, or None (the last one stays, error noted).
        Calls are serialized: one probe flow at a time."""
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._open)
            errors = []
            for server in servers:
                try:
                    ip, port = await self._client.binding(server, limit=limit)
                except (StunError, OSError) as exc:
                    errors.append(f"{server[0]}:{server[1]}: {exc}")
                    continue
                if not self.mapped:
                    port = self.wg_port  # best guess: port-preserving NAT or none
                address = f"{ip}:{port}"
                if address != self.address:
                    log.info("WireGuard port %s seen as %s by %s:%s", self.wg_port, address, *server)
                self.address, self.server = address, f"{server[0]}:{server[1]}"
                self.learned_at, self.last_error = time.time(), None
                return address
            self.last_error = "; ".join(errors) or "no STUN server in the network map"
            return None

    def close(self) -> None:
        """Close the probe socket (on the event loop)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def remove(self) -> None:
        """Delete the SNAT table (blocking: run it in a thread)."""
        table = {"family": "ip", "name": TABLE}
        try:
            self.nft.apply([{"add": {"table": table}}, {"delete": {"table": table}}])
        except FirewallError as exc:
            log.debug("removing %s: %s", TABLE, exc)
        self.mapped = False

    def status(self) -> ReflexiveStatus:
        return {
            "address": self.address,
            "server": self.server,
            "mapped_to_wireguard_port": self.mapped,
            "learned_at": self.learned_at or None,
            "error": self.last_error,
        }
