"""WireGuard backends behind one interface: kernel (pyroute2 netlink) and userspace (wireguard-go + UAPI)."""

from agent.wg.backend import PeerConfig, PeerStats, WireGuardBackend, WireGuardError

__all__ = ["PeerConfig", "PeerStats", "WireGuardBackend", "WireGuardError"]
