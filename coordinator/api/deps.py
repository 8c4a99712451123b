"""Request dependencies: the Coordinator, API callers (admin/API tokens) and peers (peer credentials).

Both authenticating dependencies ask the coordinator's AuthThrottle first (429 while the source address
failed too often) and report a wrong credential to it (coordinator.throttle).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.errors import Unauthorized
from coordinator.hub import StreamHub
from coordinator.service.core import Coordinator
from coordinator.service.credentials import Caller

bearer = HTTPBearer(auto_error=False, description="API token (admin or `sat_...`) or peer credential (`spc_...`)")


def get_coordinator(request: Request) -> Coordinator:
    coord: Coordinator = request.app.state.coordinator
    return coord


Coord = Annotated[Coordinator, Depends(get_coordinator)]


def get_hub(request: Request) -> StreamHub:
    hub: StreamHub = request.app.state.hub
    return hub


Hub = Annotated[StreamHub, Depends(get_hub)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing bearer token")
    if len(creds.credentials) > 512:
        raise Unauthorized("bearer token too long")
    return creds.credentials


def client_address(request: Request) -> str:
    """The TCP peer address of the request (uvicorn runs without proxy headers): the throttle's source."""
    return request.client.host if request.client is not None else ""


def api_caller(
    request: Request, coord: Coord, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    token = _token(creds)  # no credential at all: a plain 401, neither throttled nor counted
    with coord.throttle.attempt(client_address(request), "api_token"):
        return coord.credentials.authenticate(token)


def api_writer(caller: Annotated[Caller, Depends(api_caller)]) -> Caller:
    caller.require_write()
    return caller


def peer_caller(
    request: Request, coord: Coord, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> tuple[str, str]:
    token = _token(creds)
    with coord.throttle.attempt(client_address(request), "peer_credential"):
        return coord.peers.authenticate(token)


Reader = Annotated[Caller, Depends(api_caller)]
Writer = Annotated[Caller, Depends(api_writer)]
PeerAuth = Annotated[tuple[str, str], Depends(peer_caller)]
