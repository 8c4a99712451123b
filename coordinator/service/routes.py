"""Routes: LAN prefixes (or 0.0.0.0/0, an exit node) reached through routing peers. Who may use a route
is decided by policies that name it among their destinations."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Invalid, NotFound, UnknownReference
from coordinator.schemas import Page, RouteIn, RouteOut, RouterIn, RouterOut, RouteUpdate
from coordinator.security import new_id
from coordinator.service.context import ServiceContext
from coordinator.service.lookup import ids_by_name, names_by_id, page
from coordinator.service.tx import Tx, route_node, utcnow
from coordinator.store.models import Group, Peer, Policy, Route, RouteRouter
from starling_proto.routes import EXIT_PREFIX


def routes_out(session: Session, routes: Sequence[Route]) -> list[RouteOut]:
    """The API view of these routes (their routers' peer and group names in one query each)."""
    peers = names_by_id(session, Peer, (r.peer_id for route in routes for r in route.routers if r.peer_id))
    groups = names_by_id(session, Group, (r.group_id for route in routes for r in route.routers if r.group_id))
    return [
        RouteOut(
            id=route.id,
            name=route.name,
            description=route.description,
            prefix=route.prefix,
            exit_node=route.prefix == str(EXIT_PREFIX),
            masquerade=route.masquerade,
            enabled=route.enabled,
            routers=[
                RouterOut(
                    peer=peers.get(r.peer_id) if r.peer_id else None,
                    group=groups.get(r.group_id) if r.group_id else None,
                    metric=r.metric,
                )
                for r in route.routers
            ],
            created_at=route.created_at,
        )
        for route in routes
    ]


def route_out(session: Session, route: Route) -> RouteOut:
    return routes_out(session, [route])[0]


def summary(session: Session, route: Route) -> dict[str, Any]:
    return route_out(session, route).model_dump(mode="json", exclude={"id", "created_at"})


def policies_naming(session: Session, route_id: str) -> list[str]:
    """Names of the policies whose destinations name this route."""
    return sorted(
        p.name for p in session.scalars(select(Policy)) if route_id in p.endpoints["destinations"].get("routes", [])
    )


class RouteService:
    def __init__(self, coord: ServiceContext) -> None:
        self.ctx = coord

    def _get(self, session: Session, route_id: str) -> Route:
        route = session.get(Route, route_id)
        if route is None:
            raise NotFound("route", route_id)
        return route

    def find(self, *, name: str | None, cursor: str | None, limit: int) -> Page[RouteOut]:
        with self.ctx.store.read() as s:
            stmt = select(Route)
            if name:
                stmt = stmt.where(Route.name == name)
            rows, nxt = page(s, stmt, Route.name, cursor, limit)
            return Page[RouteOut](items=routes_out(s, rows), next_cursor=nxt)

    def get(self, route_id: str) -> RouteOut:
        with self.ctx.store.read() as s:
            return route_out(s, self._get(s, route_id))

    def create(self, actor: str, body: RouteIn) -> RouteOut:
        def run(tx: Tx) -> RouteOut:
            s = tx.session
            if s.scalar(select(Route.id).where(Route.name == body.name)):
                raise Conflict(f"route {body.name!r} already exists", field="name")
            self._check_overlap(s, body.prefix, None)
            route = Route(
                id=new_id(),
                name=body.name,
                description=body.description,
                prefix=body.prefix,
                masquerade=body.masquerade,
                enabled=body.enabled,
                created_at=utcnow(),
            )
            route.routers = self._routers(s, body.routers)
            s.add(route)
            s.flush()
            node = route_node(route)
            tx.graph(lambda g, _rev: g.upsert_route(node))
            tx.audit("route.create", "route", route.id, route.name, None, summary(s, route))
            return route_out(s, route)

        return self.ctx.write(actor, run)

    def update(self, actor: str, route_id: str, body: RouteUpdate) -> RouteOut:
        def run(tx: Tx) -> RouteOut:
            s = tx.session
            route = self._get(s, route_id)
            before = summary(s, route)
            if body.name is not None and body.name != route.name:
                if s.scalar(select(Route.id).where(Route.name == body.name)):
                    raise Conflict(f"route {body.name!r} already exists", field="name")
                route.name = body.name
            if body.prefix is not None and body.prefix != route.prefix:
                self._check_overlap(s, body.prefix, route.id)
                route.prefix = body.prefix
            for attr in ("description", "masquerade", "enabled"):
                value = getattr(body, attr)
                if value is not None:
                    setattr(route, attr, value)
            if body.routers is not None:
                wanted = self._routers(s, body.routers)
                if [(r.peer_id, r.group_id, r.metric) for r in wanted] != [
                    (r.peer_id, r.group_id, r.metric) for r in route.routers
                ]:
                    route.routers = wanted
            s.flush()
            after = summary(s, route)
            if after != before:
                node = route_node(route)
                tx.graph(lambda g, _rev: g.upsert_route(node))
                tx.audit("route.update", "route", route.id, route.name, before, after)
            return route_out(s, route)

        return self.ctx.write(actor, run)

    def delete(self, actor: str, route_id: str) -> None:
        def run(tx: Tx) -> None:
            s = tx.session
            route = self._get(s, route_id)
            users = policies_naming(s, route_id)
            if users:
                raise Conflict(f"route {route.name!r} is used by policies: {', '.join(users)}")
            before = summary(s, route)
            s.delete(route)
            tx.graph(lambda g, _rev: g.remove_route(route_id))
            tx.audit("route.delete", "route", route_id, route.name, before, None)

        self.ctx.write(actor, run)

    @staticmethod
    def _check_overlap(session: Session, prefix: str, own_id: str | None) -> None:
        """Two routes may not cover the same addresses (which would win?); 0.0.0.0/0 (exit nodes) is exempt:
        several exit routes may exist, and any more specific route wins over it."""
        net = ipaddress.IPv4Network(prefix)
        if net == EXIT_PREFIX:
            return
        for other_id, other_name, other_prefix in session.execute(select(Route.id, Route.name, Route.prefix)):
            other = ipaddress.IPv4Network(other_prefix)
            if other_id != own_id and other != EXIT_PREFIX and net.overlaps(other):
                raise Invalid(f"{prefix} overlaps route {other_name!r} ({other_prefix})", field="prefix")

    @staticmethod
    def _routers(session: Session, routers: list[RouterIn]) -> list[RouteRouter]:
        names = [r.peer for r in routers if r.peer is not None]
        groups = [r.group for r in routers if r.group is not None]
        peer_ids = ids_by_name(session, Peer, names)
        group_ids = ids_by_name(session, Group, groups)
        out: list[RouteRouter] = []
        for i, r in enumerate(routers):
            if r.peer is not None:
                if r.peer not in peer_ids:
                    raise UnknownReference(f"unknown peer {r.peer!r}", field=f"routers[{i}].peer")
                out.append(RouteRouter(peer_id=peer_ids[r.peer], metric=r.metric))
            else:
                assert r.group is not None  # RouterIn names exactly one
                if r.group not in group_ids:
                    raise UnknownReference(f"unknown group {r.group!r}", field=f"routers[{i}].group")
                out.append(RouteRouter(group_id=group_ids[r.group], metric=r.metric))
        return out
