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


def relay_credentials(
    secret: str, peer_name: str, servers: tuple[str, ...] | list[str], ttl: int, now: float | None = None
) -> tuple[RelayCredential, ...]:
    if not servers:
        return ()
    expiry, _ = credential_window(ttl, now)
    username = f"{expiry}:{peer_name}"
    return (RelayCredential(tuple(servers), username, turn_password(secret, username), expiry),)
