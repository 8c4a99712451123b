"""Request dependencies: the Coordinator, API callers (admin/API tokens) and peers (peer credentials)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.errors import Unauthorized
from coordinator.service.core import Coordinator
from coordinator.service.credentials import Caller

bearer = HTTPBearer(auto_error=False, description="API token (admin or `sat_...`) or peer credential (`spc_...`)")


def get_coordinator(request: Request) -> Coordinator:
    coord: Coordinator = request.app.state.coordinator
    return coord


Coord = Annotated[Coordinator, Depends(get_coordinator)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing bearer token")
    if len(creds.credentials) > 512:
        raise Unauthorized("bearer token too long")
    return creds.credentials


def api_caller(coord: Coord, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    return coord.credentials.authenticate(_token(creds))


def api_writer(caller: Annotated[Caller, Depends(api_caller)]) -> Caller:
    caller.require_write()
    return caller


def peer_caller(
    coord: Coord, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> tuple[str, str]:
    return coord.peers.authenticate(_token(creds))


Reader = Annotated[Caller, Depends(api_caller)]
Writer = Annotated[Caller, Depends(api_writer)]
PeerAuth = Annotated[tuple[str, str], Depends(peer_caller)]
