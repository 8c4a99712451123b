"""The cross-platform WireGuard UAPI text protocol (what `wg` speaks to wireguard-go's socket).

https://www.wireguard.com/xplatform/ — `get=1` / `set=1` requests, key=value lines, keys in hex,
terminated by an empty line; the reply ends with `errno=N` (non-zero, also negative, is failure).
"""

from __future__ import annotations

import base64
import binascii
import socket
from pathlib import Path

from agent.wg.backend import PeerConfig, PeerStats, WireGuardError

SOCKET_DIR = Path("/var/run/wireguard")


def key_to_hex(key_b64: str) -> str:
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except binascii.Error as exc:
        raise WireGuardError(f"invalid key {key_b64[:8]}...: not base64") from exc
    if len(raw) != 32:
        raise WireGuardError("invalid key: not 32 bytes")
    return raw.hex()


def hex_to_key(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def _check(key: str, value: str) -> str:
    if any(c in value for c in "\n\r="):
        raise WireGuardError(f"invalid UAPI value for {key}")
    return value


def peer_lines(peer: PeerConfig, *, replace_allowed_ips: bool = True) -> list[str]:
    lines = [f"public_key={key_to_hex(peer.public_key)}"]
    if peer.endpoint:
        lines.append(f"endpoint={_check('endpoint', peer.endpoint)}")
    lines.append(f"persistent_keepalive_interval={int(peer.keepalive)}")
    if replace_allowed_ips:
        lines.append("replace_allowed_ips=true")
    lines += [f"allowed_ip={_check('allowed_ip', ip)}" for ip in peer.allowed_ips]
    return lines


def parse_get(text: str) -> tuple[dict[str, str], dict[str, PeerStats]]:
    """Parse a `get=1` reply into (interface fields, peers by base64 public key)."""
    iface: dict[str, str] = {}
    peers: dict[str, PeerStats] = {}
    current: PeerStats | None = None
    hs_sec = 0
    for line in text.splitlines():
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "public_key":
            current = PeerStats(public_key=hex_to_key(value))
            peers[current.public_key] = current
            hs_sec = 0
        elif current is None:
            iface[key] = value
        elif key == "endpoint":
            current.endpoint = value
        elif key == "allowed_ip":
            current.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            hs_sec = int(value)
        elif key == "last_handshake_time_nsec":
            current.last_handshake = hs_sec + int(value) / 1e9 if hs_sec else 0.0
        elif key == "rx_bytes":
            current.rx_bytes = int(value)
        elif key == "tx_bytes":
            current.tx_bytes = int(value)
        elif key == "persistent_keepalive_interval":
            current.keepalive = int(value)
        elif key == "errno":
            iface["errno"] = value
    return iface, peers


class UapiClient:
    def __init__(self, interface: str, socket_dir: Path = SOCKET_DIR) -> None:
        self.path = socket_dir / f"{interface}.sock"
        self.interface = interface

    def request(self, body: str, timeout: float = 5.0) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.path))
                sock.sendall(body.encode())
                chunks = []
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
                    if b"errno=" in data and data.endswith(b"\n\n"):
                        break
        except OSError as exc:
            raise WireGuardError(f"{self.interface}: UAPI socket {self.path}: {exc.strerror or exc}") from exc
        reply = b"".join(chunks).decode()
        errno = next((ln.split("=", 1)[1] for ln in reply.splitlines() if ln.startswith("errno=")), None)
        if errno is None:
            raise WireGuardError(f"{self.interface}: UAPI reply without errno")
        if errno != "0":
            raise WireGuardError(f"{self.interface}: UAPI request failed (errno={errno})")
        return reply

    def get(self) -> tuple[dict[str, str], dict[str, PeerStats]]:
        return parse_get(self.request("get=1\n\n"))

    def set(self, lines: list[str]) -> None:
        self.request("set=1\n" + "".join(line + "\n" for line in lines) + "\n")
