"""Kernel WireGuard through pyroute2: rtnetlink for the link, generic netlink (WireGuard family) for config."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from pyroute2 import IPRoute, WireGuard

from agent import netlink
from agent.wg.backend import FWMARK, PeerConfig, PeerStats, WireGuardBackend, WireGuardError


def kernel_module_available() -> bool:
    """True when the kernel can create WireGuard links (tries a throwaway link)."""
    probe = "stprobe0"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=probe, kind="wireguard")
        except Exception:
            return False
        with contextlib.suppress(Exception):
            ipr.link("del", index=ipr.link_lookup(ifname=probe)[0])
    return True


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    ipaddress.ip_address(host)
    return host, int(port)


class KernelBackend(WireGuardBackend):
    kind = "kernel"

    def __init__(self, interface: str, wg: Any | None = None) -> None:
        super().__init__(interface)
        self._wg = wg

    @property
    def wg(self) -> Any:
        if self._wg is None:
            self._wg = WireGuard()
        return self._wg

    def _call(self, **kwargs: Any) -> Any:
        try:
            return self.wg.set(self.interface, **kwargs)
        except Exception as exc:
            raise WireGuardError(f"{self.interface}: kernel WireGuard: {exc}") from exc

    def up(self, private_key: str, listen_port: int) -> None:
        if not netlink.link_exists(self.interface):
            with IPRoute() as ipr:
                try:
                    ipr.link("add", ifname=self.interface, kind="wireguard")
                except Exception as exc:
                    raise WireGuardError(f"{self.interface}: cannot create kernel WireGuard link: {exc}") from exc
        self._call(private_key=private_key, listen_port=int(listen_port), fwmark=FWMARK)
        netlink.set_up(self.interface, mtu=1280)

    def set_private_key(self, private_key: str) -> None:
        self._call(private_key=private_key)

    def set_peer(self, peer: PeerConfig) -> None:
        spec: dict[str, Any] = {
            "public_key": peer.public_key,
            "allowed_ips": list(peer.allowed_ips),
            "persistent_keepalive": int(peer.keepalive),
            "replace_allowed_ips": True,
        }
        if peer.endpoint:
            spec["endpoint_addr"], spec["endpoint_port"] = split_endpoint(peer.endpoint)
        self._call(peer=spec)

    def remove_peer(self, public_key: str) -> None:
        self._call(peer={"public_key": public_key, "remove": True})

    def peers(self) -> dict[str, PeerStats]:
        try:
            messages = self.wg.info(self.interface)
        except Exception as exc:
            raise WireGuardError(f"{self.interface}: kernel WireGuard: {exc}") from exc
        out: dict[str, PeerStats] = {}
        for msg in messages:
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                key = _decode(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
                endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
                hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                stats = PeerStats(
                    public_key=key,
                    endpoint=f"{endpoint['addr']}:{endpoint['port']}" if endpoint else None,
                    rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                    tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                    keepalive=int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                    last_handshake=float(hs.get("tv_sec", 0)) + float(hs.get("tv_nsec", 0)) / 1e9
                    if hs.get("tv_sec")
                    else 0.0,
                )
                for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                    addr = ip.get_attr("WGALLOWEDIP_A_IPADDR") if hasattr(ip, "get_attr") else ip.get("addr")
                    cidr = ip.get_attr("WGALLOWEDIP_A_CIDR_MASK") if hasattr(ip, "get_attr") else ip.get("cidr")
                    if addr is not None:
                        stats.allowed_ips.append(f"{addr}/{cidr}")
                out[key] = stats
        return out

    def listen_port(self) -> int:
        for msg in self.wg.info(self.interface):
            port = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
            if port:
                return int(port)
        return 0

    def down(self) -> None:
        netlink.delete_link(self.interface)

    def close(self) -> None:
        if self._wg is not None:
            self._wg.close()
            self._wg = None


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
