"""Peer authentication: the bearer token at the handshake, verified offline with the coordinator's
Ed25519 public key, and the start-up fetch of that key from the coordinator (retried with backoff)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from coordinator.signing import TokenError, TokenVerifier
from starling_proto.signal import is_peer_key

log = logging.getLogger(__name__)

AUDIENCE = "signal"


class AuthError(Exception):
    """The handshake is refused; `kind` is `unauthorized` or `expired` (the metrics label)."""

    def __init__(self, reason: str, kind: str = "unauthorized") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Identity:
    peer: str
    name: str
    expires_at: int


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthError("missing Authorization: Bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be 'Bearer <signal token>'")
    return token.strip()


class Authenticator:
    def __init__(self, public_key_b64: str, leeway: int = 5) -> None:
        self._verifier = TokenVerifier(public_key_b64)
        self.leeway = leeway

    def authenticate(self, header: str | None) -> Identity:
        token = bearer_token(header)
        try:
            claims = self._verifier.verify(token, audience=AUDIENCE, leeway=self.leeway)
        except TokenError as exc:
            reason = str(exc)
            raise AuthError(reason, "expired" if reason == "token expired" else "unauthorized") from exc
        peer = claims.get("sub")
        if not is_peer_key(peer):
            raise AuthError("token subject is not a WireGuard public key")
        assert isinstance(peer, str)
        name = claims.get("name")
        return Identity(peer=peer, name=name if isinstance(name, str) else "", expires_at=int(claims["exp"]))


def _parse_key(data: object) -> str:
    key = data.get("public_key") if isinstance(data, dict) else None
    if not isinstance(key, str):
        raise ValueError("response has no public_key")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("public_key is not base64") from exc
    if len(raw) != 32:
        raise ValueError("public_key is not 32 bytes")
    return key


async def fetch_signing_key(
    coordinator_url: str,
    *,
    ca_file: Path | None = None,
    initial_delay: float = 0.5,
    max_delay: float = 30.0,
    request_timeout: float = 10.0,
) -> str:
    """GET <coordinator_url>/api/v1/signing-key until it answers with a valid key (full-jitter backoff)."""
    url = coordinator_url + "/api/v1/signing-key"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    attempt = 0
    async with httpx.AsyncClient(timeout=request_timeout, verify=verify) as client:
        while True:
            try:
                response = await client.get(url)
                response.raise_for_status()
                key = _parse_key(response.json())
                log.info("signing key fetched from %s", url)
                return key
            except (httpx.HTTPError, ValueError) as exc:
                delay = random.uniform(0, min(max_delay, initial_delay * 2**attempt))  # noqa: S311 - jitter
                attempt = min(attempt + 1, 20)
                log.warning("cannot fetch the signing key from %s (%s); retrying in %.1fs", url, exc, delay)
                await asyncio.sleep(delay)
