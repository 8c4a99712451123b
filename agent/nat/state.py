"""What the NAT fallback knows about one peer (`PeerNat`): its ICE sessions, relay proxy, re-probes and
the history that `starling explain` prints. Each `agent.peers.PeerConnection` owns one; `agent.nat.fallback`
drives it."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.nat.ice import IceParams, IceSession
    from agent.nat.relay import PairProxy
    from agent.status import ProxyStatus

log = logging.getLogger("starling.agent.nat")


@dataclass
class PeerNat:
    """What the fallback knows about one peer (lives as long as the peer is in the map)."""

    session: IceSession | None = None  # the session the proxy uses
    pending: IceSession | None = None  # a negotiation in progress (may replace `session`)
    answer: asyncio.Future[IceParams] | None = None
    task: asyncio.Task[None] | None = None  # an ICE negotiation (or answer) in progress
    probe_task: asyncio.Task[None] | None = None  # a direct re-probe in progress
    renewals: int = 0  # moves to a new TURN allocation because the credential was ageing
    proxy: PairProxy | None = None
    relay_server: str | None = None
    relay_transport: str | None = None  # how the last negotiation reaches its relay: udp, tcp, tls
    turn_unreachable: str | None = None  # no TURN endpoint answered the last probes: which and why
    last_pick: str = ""  # the last probe summary noted in the history (not repeated every attempt)
    next_transport_check: float = 0.0  # while on TURN over TCP/TLS: next look for UDP to the relay
    next_attempt: float = 0.0
    failures: int = 0
    next_probe: float = 0.0
    probe: IceSession | None = None
    probe_answer: asyncio.Future[IceParams] | None = None
    switching_since: float = 0.0  # > 0: WireGuard points direct again, proxy kept until confirmed
    rx_at_switch: int = 0
    rx_seen: int = 0  # WireGuard's rx bytes at the previous pass while on the proxy (0: none yet)
    next_renewal: float = 0.0
    relayed_sent: int = 0  # bytes through closed relay proxies (the open one adds its own counters)
    relayed_received: int = 0
    # Replaced proxies (with their sessions) that still carry what arrives on the old pair until the
    # monotonic deadline: the peer moves to the new pair a moment after us (make before break, both ends).
    retiring: list[tuple[PairProxy, IceSession | None, float]] = field(default_factory=list)
    history: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=60))

    def note(self, text: str) -> None:
        self.history.append(f"{time.strftime('%H:%M:%S')} {text}")
        log.info("%s", text)

    def status(self) -> ProxyStatus | None:
        """The relay proxy's status (None: no proxy)."""
        return self.proxy.status() if self.proxy else None

    def relayed_bytes(self) -> tuple[int, int]:
        """(sent, received) through TURN relays for this peer since it joined our map."""
        sent, received = self.relayed_sent, self.relayed_received
        for proxy in [self.proxy] + [p for p, _, _ in self.retiring]:
            if proxy is not None and proxy.pair.relayed:
                sent, received = sent + proxy.to_peer_bytes, received + proxy.from_peer_bytes
        return sent, received
