"""Admin API: peers, groups, policies and routes (read with any token, write with a write-scoped token)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from coordinator.api.deps import Coord, Reader, Writer
from coordinator.api.params import Cursor, Limit, NameFilter
from coordinator.errors import NotFound
from coordinator.schemas import (
    GroupIn,
    GroupOut,
    GroupUpdate,
    Page,
    PeerOut,
    PeerUpdate,
    PolicyIn,
    PolicyOut,
    PolicyUpdate,
    RouteIn,
    RouteOut,
    RouteUpdate,
)

router = APIRouter(prefix="/api/v1")


# ----- peers ------------------------------------------------------------------------------------
@router.get("/peers", tags=["peers"])
def list_peers(
    coord: Coord,
    _: Reader,
    name: NameFilter = None,
    group: NameFilter = None,
    connected: bool | None = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[PeerOut]:
    return coord.peers.find(name=name, group=group, connected=connected, cursor=cursor, limit=limit)


@router.get("/peers/{peer_id}", tags=["peers"])
def get_peer(coord: Coord, _: Reader, peer_id: str) -> PeerOut:
    return coord.peers.get(peer_id)


@router.patch("/peers/{peer_id}", tags=["peers"])
def update_peer(coord: Coord, caller: Writer, peer_id: str, body: PeerUpdate) -> PeerOut:
    return coord.peers.update(caller.actor, peer_id, body)


@router.delete("/peers/{peer_id}", status_code=204, tags=["peers"])
def delete_peer(coord: Coord, caller: Writer, peer_id: str) -> Response:
    coord.peers.delete(caller.actor, peer_id)
    return Response(status_code=204)


@router.get("/peers/{peer_id}/map", tags=["peers"], response_model=dict[str, Any])
async def get_peer_map(coord: Coord, _: Reader, peer_id: str) -> Response:
    """The network map this peer receives (admin view, for debugging who-reaches-whom)."""
    text = await run_in_threadpool(coord.maps.full_json, peer_id)
    if text is None:
        raise NotFound("peer", peer_id)
    data = json.loads(text)
    for relay in data.get("relays", []):
        relay["password"] = "***"  # noqa: S105 - masking
    return Response(json.dumps(data), media_type="application/json")


@router.get("/maps/consistency", tags=["peers"])
def map_consistency(coord: Coord, _: Reader) -> dict[str, Any]:
    """Check that both ends of every path received matching rules (an out rule on one side has its
    in rule on the other, and every rule's peers are in the map). `violations` is empty when sound."""
    result = coord.view.consistency()
    return {"peers_checked": result.peers_checked, "violations": [v.describe() for v in result.violations]}


# ----- groups -----------------------------------------------------------------------------------
@router.get("/groups", tags=["groups"])
def list_groups(
    coord: Coord, _: Reader, name: NameFilter = None, cursor: Cursor = None, limit: Limit = 100
) -> Page[GroupOut]:
    return coord.groups.find(name=name, cursor=cursor, limit=limit)


@router.post("/groups", status_code=201, tags=["groups"])
def create_group(coord: Coord, caller: Writer, body: GroupIn) -> GroupOut:
    return coord.groups.create(caller.actor, body)


@router.get("/groups/{group_id}", tags=["groups"])
def get_group(coord: Coord, _: Reader, group_id: str) -> GroupOut:
    return coord.groups.get(group_id)


@router.patch("/groups/{group_id}", tags=["groups"])
def update_group(coord: Coord, caller: Writer, group_id: str, body: GroupUpdate) -> GroupOut:
    return coord.groups.update(caller.actor, group_id, body)


@router.delete("/groups/{group_id}", status_code=204, tags=["groups"])
def delete_group(coord: Coord, caller: Writer, group_id: str) -> Response:
    coord.groups.delete(caller.actor, group_id)
    return Response(status_code=204)


# ----- policies ---------------------------------------------------------------------------------
@router.get("/policies", tags=["policies"])
def list_policies(
    coord: Coord, _: Reader, name: NameFilter = None, cursor: Cursor = None, limit: Limit = 100
) -> Page[PolicyOut]:
    return coord.policies.find(name=name, cursor=cursor, limit=limit)


@router.post("/policies", status_code=201, tags=["policies"])
def create_policy(coord: Coord, caller: Writer, body: PolicyIn) -> PolicyOut:
    return coord.policies.create(caller.actor, body)


@router.get("/policies/{policy_id}", tags=["policies"])
def get_policy(coord: Coord, _: Reader, policy_id: str) -> PolicyOut:
    return coord.policies.get(policy_id)


@router.patch("/policies/{policy_id}", tags=["policies"])
def update_policy(coord: Coord, caller: Writer, policy_id: str, body: PolicyUpdate) -> PolicyOut:
    return coord.policies.update(caller.actor, policy_id, body)


@router.delete("/policies/{policy_id}", status_code=204, tags=["policies"])
def delete_policy(coord: Coord, caller: Writer, policy_id: str) -> Response:
    coord.policies.delete(caller.actor, policy_id)
    return Response(status_code=204)


# ----- routes -----------------------------------------------------------------------------------
@router.get("/routes", tags=["routes"])
def list_routes(
    coord: Coord, _: Reader, name: NameFilter = None, cursor: Cursor = None, limit: Limit = 100
) -> Page[RouteOut]:
    return coord.routes.find(name=name, cursor=cursor, limit=limit)


@router.post("/routes", status_code=201, tags=["routes"])
def create_route(coord: Coord, caller: Writer, body: RouteIn) -> RouteOut:
    return coord.routes.create(caller.actor, body)


@router.get("/routes/{route_id}", tags=["routes"])
def get_route(coord: Coord, _: Reader, route_id: str) -> RouteOut:
    return coord.routes.get(route_id)


@router.patch("/routes/{route_id}", tags=["routes"])
def update_route(coord: Coord, caller: Writer, route_id: str, body: RouteUpdate) -> RouteOut:
    return coord.routes.update(caller.actor, route_id, body)


@router.delete("/routes/{route_id}", status_code=204, tags=["routes"])
def delete_route(coord: Coord, caller: Writer, route_id: str) -> Response:
    coord.routes.delete(caller.actor, route_id)
    return Response(status_code=204)
