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
        if self.proxy is not None and self.proxy.pair.relayed:
            sent, received = sent + self.proxy.to_peer_bytes, received + self.proxy.from_peer_bytes
        return sent, received
