"""The WireGuard device as the event loop sees it (`WireGuardPort`): asynchronous, one peer at a time,
errors logged rather than raised (a peer that cannot be configured now is retried by the watchdog).
`ThreadedWireGuard` runs a `WireGuardBackend`'s blocking calls in worker threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from agent.wg.backend import PeerConfig, PeerStats, WireGuardBackend, WireGuardError

log = logging.getLogger("starling.agent")


class WireGuardPort(Protocol):
    async def set_peer(self, peer: PeerConfig) -> bool:
        """Add or update one peer; False (logged) if WireGuard refused."""
        ...

    async def remove_peer(self, public_key: str) -> bool: ...

    async def swap_key(self, old_public_key: str, peer: PeerConfig) -> bool:
        """A peer rotated its key: see WireGuardBackend.swap_key."""
        ...

    async def peers(self) -> dict[str, PeerStats]:
        """Every peer's stats now ({} if the device cannot be read)."""
        ...


class ThreadedWireGuard:
    """A `WireGuardPort` over a blocking backend (kernel netlink or wireguard-go's UAPI socket)."""

    def __init__(self, backend: WireGuardBackend) -> None:
        self.backend = backend

    async def set_peer(self, peer: PeerConfig) -> bool:
        return await self._call("set peer", self.backend.set_peer, peer)

    async def remove_peer(self, public_key: str) -> bool:
        return await self._call("remove peer", self.backend.remove_peer, public_key)

    async def swap_key(self, old_public_key: str, peer: PeerConfig) -> bool:
        what = f"cannot swap key {old_public_key[:8]}... for {peer.public_key[:8]}..."
        return await self._call(what, self.backend.swap_key, old_public_key, peer)

    async def peers(self) -> dict[str, PeerStats]:
        return await asyncio.to_thread(self.peers_now)

    def peers_now(self) -> dict[str, PeerStats]:
        """The blocking read (for threads that are not the event loop)."""
        try:
            return self.backend.peers()
        except WireGuardError:
            return {}

    @staticmethod
    async def _call(what: str, fn: Callable[..., None], *args: object) -> bool:
        try:
            await asyncio.to_thread(fn, *args)
            return True
        except WireGuardError as exc:
            log.error("WireGuard: %s: %s", what, exc)
            return False
