"""Groups, policies and routes, and who a chosen peer can reach (from its rendered map): peers, the routes
it may use, and the routes it forwards for others."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from coordinator.dashboard import data
from coordinator.dashboard.web import (
    PREFIX,
    Auth,
    call,
    opt,
)

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/access")
async def access(request: Request, auth: Auth) -> Response:
    chosen = opt(request.query_params.get("peer"))

    def load() -> dict[str, Any]:
        c = auth.coord
        groups = c.groups.find(name=None, cursor=None, limit=1000).items
        policies = c.policies.find(name=None, cursor=None, limit=1000).items
        routes = c.routes.find(name=None, cursor=None, limit=1000).items
        choices = data.peer_choices(c)
        reach: list[data.Reach] | None = None
        uses: list[data.RouteReach] = []
        forwards: list[data.RouteReach] = []
        peer_name = ""
        peer_groups: list[str] = []
        applies: list[str] = []
        if chosen:
            node = c.view.peer(chosen)
            if node is not None:
                group_names = c.view.group_names()
                peer_name = node.name
                peer_groups = sorted(group_names.get(g, g) for g in node.groups)
            if peer_name:
                try:
                    reach, uses, forwards = data.reachability(c, chosen, {p.id: p.name for p in policies})
                except KeyError:  # removed a moment ago
                    peer_name = ""
                mine = set(peer_groups)
                applies = [
                    p.name
                    for p in policies
                    if mine & set(p.sources.groups + p.destinations.groups)
                    or peer_name in p.sources.peers + p.destinations.peers
                ]
        return {
            "groups": groups,
            "policies": policies,
            "routes": routes,
            "choices": choices,
            "reach": reach,
            "uses": uses,
            "forwards": forwards,
            "peer_name": peer_name,
            "peer_groups": peer_groups,
            "applies": applies,
        }

    ctx = await call(load)
    if chosen and not ctx["peer_name"]:
        return auth.dash.error_page(auth, 404, "No such peer (it may have been removed).")
    return auth.dash.render(
        request,
        "access.html",
        {"title": "Groups, routes & policies", "nav": "access", "chosen": chosen or "", **ctx},
        session=auth.session,
        started=auth.started,
    )
