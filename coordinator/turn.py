"""TURN credentials in coturn's REST API scheme (`use-auth-secret`).

username = "<expiry unix time>:<peer name>", password = base64(HMAC-SHA1(secret, username)).
Expiry is quantized to half the TTL, so every call inside one window yields the same credential
(streams resend only when it changes) and a delivered credential always has >= TTL/2 left.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from starling_proto.netmap import RelayCredential


def turn_password(secret: str, username: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


def credential_window(ttl: int, now: float | None = None) -> tuple[int, int]:
    """(expiry of the credential valid now, time when the next credential replaces it)."""
    step = max(ttl // 2, 1)
    current = int(time.time() if now is None else now)
    window = current - current % step
    return window + ttl, window + step


def advertised(url: str) -> str:
    """A relay URL as the map carries it. `turns:` (TURN over TLS) always says `?transport=tcp`:
    agents before TCP/TLS support skip every URL that does, but would take a bare `turns:host:443`
    for a UDP STUN server. Everything else goes out as configured."""
    if url.lower().startswith("turns:") and "?" not in url:
        return f"{url}?transport=tcp"
    return url


def relay_credentials(
    secret: str, peer_name: str, servers: tuple[str, ...] | list[str], ttl: int, now: float | None = None
) -> tuple[RelayCredential, ...]:
    """One credential for all of the mesh's relay URLs (`mesh.turn_servers`), in their configured order:
    `turn:H:3478?transport=udp`, `turn:H:3478?transport=tcp`, `turns:H:443?transport=tcp`, `stun:H:3478`.
    Agents try UDP first, then TCP, then TLS (agent/nat/transport.py)."""
    if not servers:
        return ()
    expiry, _ = credential_window(ttl, now)
    username = f"{expiry}:{peer_name}"
    urls = tuple(advertised(u) for u in servers)
    return (RelayCredential(urls, username, turn_password(secret, username), expiry),)
