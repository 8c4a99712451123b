"""The WireGuard backend interface and the value types it speaks.

Keys are base64 strings at this boundary. Backends configure peers incrementally: `set_peer`
touches one peer and leaves every other tunnel (and its handshake state) alone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


class WireGuardError(Exception):
    """A WireGuard operation failed (message names the interface and the cause)."""


@dataclass(frozen=True, slots=True)
class PeerConfig:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None  # "host:port"
    keepalive: int = 0


@dataclass(slots=True)
class PeerStats:
    public_key: str
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake: float = 0.0  # unix time, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0


FWMARK = 0x5354  # WireGuard marks its own UDP packets: an exit node's routing rule lets them bypass the tunnel


class WireGuardBackend(abc.ABC):
    kind: str = "abstract"

    def __init__(self, interface: str) -> None:
        self.interface = interface

    @abc.abstractmethod
    def up(self, private_key: str, listen_port: int) -> None:
        """Create (or adopt) the interface with this key and port, and bring it up."""

    @abc.abstractmethod
    def set_private_key(self, private_key: str) -> None: ...

    @abc.abstractmethod
    def set_peer(self, peer: PeerConfig) -> None:
        """Add or update one peer (replacing its allowed IPs); other peers are untouched."""

    @abc.abstractmethod
    def remove_peer(self, public_key: str) -> None: ...

    def swap_key(self, old_public_key: str, peer: PeerConfig) -> None:
        """A peer rotated its key: add the new key with the peer's allowed IPs and endpoint (which
        moves the allowed IPs off the old key) and leave the old key without allowed IPs and
        keepalive. Packets already queued for the old key still leave (removing it now would drop
        them); the caller removes it a few seconds later with `remove_peer`."""
        self.set_peer(peer)
        self.set_peer(PeerConfig(old_public_key, (), None, 0))

    @abc.abstractmethod
    def peers(self) -> dict[str, PeerStats]: ...

    @abc.abstractmethod
    def listen_port(self) -> int: ...

    @abc.abstractmethod
    def down(self) -> None:
        """Remove the interface (idempotent)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release resources but keep the interface (the daemon restarting adopts it)."""
