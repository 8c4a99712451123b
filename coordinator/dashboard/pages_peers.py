"""Peers: the list, one peer (connections, reachability), its connections fragment, and the mesh view."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from coordinator.dashboard import data
from coordinator.dashboard.web import (
    PREFIX,
    Auth,
    call,
    opt,
)
from coordinator.errors import NotFound

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/peers")
async def peers(request: Request, auth: Auth) -> Response:
    q = request.query_params
    status = q.get("status", "")
    connected = {"online": True, "offline": False}.get(status)
    name, group, cursor = opt(q.get("name")), opt(q.get("group")), opt(q.get("cursor"))
    try:
        limit = int(q.get("limit", data.PAGE_MAX))
    except ValueError:
        limit = data.PAGE_MAX
    await auth.dash.feed.ensure_started(auth.coord)
    since = time.time()

    def load() -> tuple[list[data.PeerRow], str | None, tuple[int, int], list[str]]:
        rows, nxt = data.list_peers(auth.coord, name=name, group=group, connected=connected, cursor=cursor, limit=limit)
        return rows, nxt, data.counts(auth.coord), data.group_names(auth.coord)

    t0 = time.perf_counter()
    rows, nxt, (total, online), groups = await call(load)
    timings = {"db": time.perf_counter() - t0}
    filters = {"name": name or "", "group": group or "", "status": status}
    next_url = None
    if nxt:
        params = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
        next_url = f"{PREFIX}/peers?{params + '&' if params else ''}cursor={quote(nxt)}&limit={limit}"
    return auth.dash.render(
        request,
        "peers.html",
        {
            "title": "Peers",
            "nav": "peers",
            "peers": rows,
            "total": total,
            "online": online,
            "groups": groups,
            "filters": filters,
            "next_url": next_url,
            "filtered": any(filters.values()) or bool(cursor),
        },
        session=auth.session,
        started=auth.started,
        live="peers",
        since=since,
        timings=timings,
    )


@router.get("/peers/{peer_id}/connections")
async def peer_connections(request: Request, auth: Auth, peer_id: str) -> Response:
    """HTML fragment: the first connections of one peer (loaded when a row of the peers list opens)."""

    def load() -> tuple[str, list[data.Conn], int]:
        out = auth.coord.peers.get(peer_id)
        names = data.peer_names(auth.coord)
        raw = [c.model_dump(mode="json") for c in out.connections]
        raw.sort(key=lambda c: (data.PATH_RANK.get(str(c.get("path")), 9), names.get(str(c.get("peer_id")), "")))
        shown = raw[: data.LIST_CONNECTIONS]
        return out.name, [data.conn_from(c, names) for c in shown], len(raw) - len(shown)

    try:
        name, conns, more = await call(load)
    except NotFound:
        return auth.dash.error_page(auth, 404, "No such peer (it may have been removed).")
    return auth.dash.render(
        request,
        "connections.html",
        {"title": "Connections", "nav": "", "name": name, "peer_id": peer_id, "conns": conns, "more": more},
        session=auth.session,
        started=auth.started,
    )


@router.get("/peers/{peer_id}")
async def peer(request: Request, auth: Auth, peer_id: str) -> Response:
    await auth.dash.feed.ensure_started(auth.coord)
    since = time.time()

    def load() -> tuple[Any, list[data.Conn], list[data.Reach], list[data.RouteReach], list[data.RouteReach]]:
        out = auth.coord.peers.get(peer_id)
        names = data.peer_names(auth.coord)
        conns = [data.conn_from(c.model_dump(mode="json"), names) for c in out.connections]
        conns.sort(key=lambda c: (data.PATH_RANK.get(c.path, 9), c.peer_name))
        policies = {p.id: p.name for p in auth.coord.policies.find(name=None, cursor=None, limit=1000).items}
        try:
            reach, uses, forwards = data.reachability(auth.coord, peer_id, policies)
        except KeyError:
            reach, uses, forwards = [], [], []
        return out, conns, reach, uses, forwards

    try:
        out, conns, reach, uses, forwards = await call(load)
    except NotFound:
        return auth.dash.error_page(auth, 404, "No such peer (it may have been removed).")
    return auth.dash.render(
        request,
        "peer.html",
        {
            "title": f"Peer {out.name}",
            "nav": "peers",
            "peer": out,
            "conns": conns,
            "reach": reach,
            "uses": uses,
            "forwards": forwards,
            "summary": data.path_summary([c.model_dump() for c in out.connections]),
        },
        session=auth.session,
        started=auth.started,
        live="peer",
        since=since,
    )


@router.get("/mesh")
async def mesh(request: Request, auth: Auth) -> Response:
    await auth.dash.feed.ensure_started(auth.coord)
    since = time.time()
    t0 = time.perf_counter()
    view = await call(data.mesh_view, auth.coord)
    timings = {"db": time.perf_counter() - t0}
    return auth.dash.render(
        request,
        "mesh.html",
        {"title": "Mesh", "nav": "mesh", "view": view, "paths": data.PATHS},
        session=auth.session,
        started=auth.started,
        live="mesh",
        since=since,
        timings=timings,
    )
