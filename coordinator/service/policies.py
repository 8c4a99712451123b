"""Policies: deny by default; each policy opens sources -> destinations for a protocol and ports."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.schemas import (
    Endpoints,
    Page,
    PolicyIn,
    PolicyOut,
    PolicyUpdate,
    check_ports_protocol,
    format_port,
    parse_port,
)
from coordinator.security import new_id
from coordinator.service.context import ServiceContext
from coordinator.service.lookup import group_ids, group_names, page, peer_ids, peer_names, route_ids, route_names
from coordinator.service.tx import Tx, policy_node, utcnow
from coordinator.store.models import Policy


def endpoints_out(session: Session, ends: dict[str, list[str]]) -> Endpoints:
    return Endpoints.model_construct(
        groups=sorted(group_names(session, ends["groups"])),
        peers=sorted(peer_names(session, ends["peers"])),
        routes=sorted(route_names(session, ends.get("routes", []))),
    )


def policy_out(session: Session, pol: Policy) -> PolicyOut:
    return PolicyOut(
        id=pol.id,
        name=pol.name,
        description=pol.description,
        enabled=pol.enabled,
        protocol=pol.protocol,
        ports=[format_port(p) for p in pol.ports],
        bidirectional=pol.bidirectional,
        sources=endpoints_out(session, pol.endpoints["sources"]),
        destinations=endpoints_out(session, pol.endpoints["destinations"]),
        created_at=pol.created_at,
    )


def summary(session: Session, pol: Policy) -> dict[str, Any]:
    return policy_out(session, pol).model_dump(mode="json", exclude={"id", "created_at"})


def resolve_endpoints(session: Session, ends: Endpoints, field: str) -> dict[str, list[str]]:
    out = {
        "groups": group_ids(session, ends.groups, f"{field}.groups"),
        "peers": peer_ids(session, ends.peers, f"{field}.peers"),
    }
    if field == "destinations":
        out["routes"] = route_ids(session, ends.routes, f"{field}.routes")
    elif ends.routes:
        raise Invalid("a route can only be a destination: traffic comes from peers", field=f"{field}.routes")
    return out


def check_routed(endpoints: dict[str, Any], bidirectional: bool) -> None:
    """Routed traffic is one-way: hosts on a route's LAN cannot open connections into the mesh."""
    if bidirectional and endpoints["destinations"].get("routes"):
        raise Invalid(
            "a policy whose destinations include routes cannot be bidirectional: routed traffic is one-way "
            "(hosts on the route's LAN cannot open connections into the mesh)",
            field="bidirectional",
        )


def normalize_ports(ports: list[int | str]) -> list[list[int]]:
    ranges = sorted({parse_port(p) for p in ports})
    return [list(r) for r in ranges]


class PolicyService:
    def __init__(self, coord: ServiceContext) -> None:
        self.ctx = coord

    def _get(self, session: Session, policy_id: str) -> Policy:
        pol = session.get(Policy, policy_id)
        if pol is None:
            raise NotFound("policy", policy_id)
        return pol

    def find(self, *, name: str | None, cursor: str | None, limit: int) -> Page[PolicyOut]:
        with self.ctx.store.read() as s:
            stmt = select(Policy)
            if name:
                stmt = stmt.where(Policy.name == name)
            rows, nxt = page(s, stmt, Policy.name, cursor, limit)
            return Page[PolicyOut](items=[policy_out(s, p) for p in rows], next_cursor=nxt)

    def get(self, policy_id: str) -> PolicyOut:
        with self.ctx.store.read() as s:
            return policy_out(s, self._get(s, policy_id))

    def create(self, actor: str, body: PolicyIn) -> PolicyOut:
        def run(tx: Tx) -> PolicyOut:
            s = tx.session
            if s.scalar(select(Policy.id).where(Policy.name == body.name)):
                raise Conflict(f"policy {body.name!r} already exists", field="name")
            pol = Policy(
                id=new_id(),
                name=body.name,
                description=body.description,
                enabled=body.enabled,
                protocol=body.protocol,
                ports=normalize_ports(body.ports),
                bidirectional=body.bidirectional,
                endpoints={
                    "sources": resolve_endpoints(s, body.sources, "sources"),
                    "destinations": resolve_endpoints(s, body.destinations, "destinations"),
                },
                created_at=utcnow(),
            )
            check_routed(pol.endpoints, pol.bidirectional)
            s.add(pol)
            s.flush()
            node = policy_node(pol)
            tx.graph(lambda g, _rev: g.upsert_policy(node))
            tx.audit("policy.create", "policy", pol.id, pol.name, None, summary(s, pol))
            return policy_out(s, pol)

        return self.ctx.write(actor, run)

    def update(self, actor: str, policy_id: str, body: PolicyUpdate) -> PolicyOut:
        def run(tx: Tx) -> PolicyOut:
            s = tx.session
            pol = self._get(s, policy_id)
            before = summary(s, pol)
            if body.name is not None and body.name != pol.name:
                if s.scalar(select(Policy.id).where(Policy.name == body.name)):
                    raise Conflict(f"policy {body.name!r} already exists", field="name")
                pol.name = body.name
            for attr in ("description", "enabled", "protocol", "bidirectional"):
                value = getattr(body, attr)
                if value is not None:
                    setattr(pol, attr, value)
            if body.ports is not None:
                pol.ports = normalize_ports(body.ports)
            try:
                check_ports_protocol(pol.protocol, pol.ports)
            except ValueError as exc:
                raise Invalid(str(exc), field="ports") from exc
            ends = dict(pol.endpoints)
            if body.sources is not None:
                ends["sources"] = resolve_endpoints(s, body.sources, "sources")
            if body.destinations is not None:
                ends["destinations"] = resolve_endpoints(s, body.destinations, "destinations")
            check_routed(ends, pol.bidirectional)
            pol.endpoints = ends
            s.flush()
            after = summary(s, pol)
            if after != before:
                node = policy_node(pol)
                tx.graph(lambda g, _rev: g.upsert_policy(node))
                tx.audit("policy.update", "policy", pol.id, pol.name, before, after)
            return policy_out(s, pol)

        return self.ctx.write(actor, run)

    def delete(self, actor: str, policy_id: str) -> None:
        def run(tx: Tx) -> None:
            s = tx.session
            pol = self._get(s, policy_id)
            before = summary(s, pol)
            s.delete(pol)
            tx.graph(lambda g, _rev: g.remove_policy(policy_id))
            tx.audit("policy.delete", "policy", policy_id, pol.name, before, None)

        self.ctx.write(actor, run)
