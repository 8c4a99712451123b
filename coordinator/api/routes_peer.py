"""Peer-facing API: challenges and sealed enrollment/login, the peer's own network map (once or as an SSE
stream), state reports, sealed key rotation and signal tokens. A peer authenticates with its credential and
can only see and report its own data; logging in as a key or rotating it needs proof of possession of the
private key (starling_proto.seal, docs/security.md).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from coordinator.api.deps import Coord, Hub, PeerAuth, client_address
from coordinator.errors import Forbidden, NotFound, Unauthorized
from coordinator.schemas import (
    Challenge,
    PeerEvent,
    PeerOut,
    SealedReply,
    SealedRequest,
    SignalToken,
    SigningKey,
    StateReport,
)

router = APIRouter(prefix="/api/v1")


@router.get("/signing-key", tags=["peer"])
def signing_key(coord: Coord) -> SigningKey:
    """The coordinator's Ed25519 public key: signal verifies peer tokens with it offline."""
    return SigningKey(public_key=coord.signer.public_key_b64)


@router.post("/challenge", tags=["peer"])
def challenge(coord: Coord, response: Response) -> Challenge:
    """A single-use challenge (valid `limits.challenge_ttl` seconds) and the coordinator's X25519 identity
    key: seal the next enrollment, login or key rotation over it. Stateless until used."""
    token, expires = coord.identity.issue()
    response.headers["Cache-Control"] = "no-store"
    return Challenge(challenge=token, expires_at=expires, coordinator_public_key=coord.identity.public_key_b64)


@router.post(
    "/enroll",
    tags=["peer"],
    responses={
        401: {
            "description": "no proof of possession: stale, forged or replayed challenge, or a box sealed by another key"
        },
        403: {"description": "unknown key without a valid setup key (unknown, expired, revoked or used up)"},
    },
)
def enroll(coord: Coord, request: Request, body: SealedRequest) -> SealedReply:
    """Enroll a WireGuard public key with a setup key, or log in a known key on its proof alone. The body is
    sealed with the key's private half over a fresh challenge; the reply (credential inside) is sealed back.
    Failed enrollments change nothing; refused proofs about an existing peer are audited."""
    source = client_address(request) or "unknown"
    coord.throttle.check(source, "peer_proof")
    try:
        return coord.peers.enroll(body, source)
    except Unauthorized:
        coord.throttle.failure(source, "peer_proof")
        raise
    except Forbidden:
        coord.throttle.failure(source, "setup_key")
        raise


@router.get("/peer/map", tags=["peer"], response_model=dict[str, Any])
async def peer_map(coord: Coord, peer: PeerAuth) -> Response:
    """The caller's full network map (same document as the first stream event)."""
    text = await run_in_threadpool(coord.render_full, peer[0])
    return Response(text, media_type="application/json")


@router.get(
    "/peer/stream",
    tags=["peer"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE: `map`, then `delta` events"}},
)
async def peer_stream(hub: Hub, peer: PeerAuth) -> StreamingResponse:
    """Server-Sent Events: `map` (full map) on connect, then `delta` events as the map changes,
    keep-alive comments, `closed`/`deleted` before the server ends the stream. See docs/api.md."""
    return StreamingResponse(
        hub.stream(peer[0]),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post("/peer/state", status_code=204, tags=["peer"])
def report_state(coord: Coord, peer: PeerAuth, body: StateReport) -> Response:
    """The agent's per-remote-peer connection state (path, latency, last handshake, bytes)."""
    coord.peers.report_state(peer[0], body)
    return Response(status_code=204)


@router.post("/peer/events", status_code=204, tags=["peer"])
def report_event(coord: Coord, peer: PeerAuth, body: PeerEvent) -> Response:
    """An event the agent saw that belongs in the audit log (e.g. `firewall.drift`: someone flushed or
    edited the agent's nftables table and it restored it). At most 10 per minute per peer."""
    coord.peers.report_event(peer[0], body)
    return Response(status_code=204)


@router.post(
    "/peer/key",
    tags=["peer"],
    responses={
        401: {"description": "bad credential, or no proof of possession of both the current and the new key"},
        409: {"description": "public_key is not the current key, or new_public_key belongs to another peer"},
    },
)
def change_key(coord: Coord, request: Request, peer: PeerAuth, body: SealedRequest) -> PeerOut:
    """Key rotation: the agent presents its new WireGuard public key, sealed with both its current and its
    new private key (`prepare`, then `commit` once it uses the key). The commit is pushed to every peer that
    may reach this one; both steps are audited (`peer.key.prepare`, `peer.key.rotate`). See docs/vault.md."""
    source = client_address(request) or "unknown"
    try:
        return coord.peers.change_key(peer[0], body, source)
    except Unauthorized:
        coord.throttle.failure(source, "peer_proof")
        raise


@router.post("/peer/signal-token", tags=["peer"])
def signal_token(coord: Coord, peer: PeerAuth) -> SignalToken:
    """A short-lived token for the signal service, bound to this peer's WireGuard public key."""
    node = coord.view.peer(peer[0])
    if node is None:
        raise NotFound("peer", peer[0])
    ttl = coord.config.signal_token_ttl
    now = int(time.time())
    token = coord.signer.issue(node.public_key, audience="signal", ttl=ttl, now=now, name=node.name)
    return SignalToken(token=token, expires_at=now + ttl, signing_public_key=coord.signer.public_key_b64)
