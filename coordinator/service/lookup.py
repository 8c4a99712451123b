"""Name <-> id resolution and paging helpers shared by the services."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from coordinator.errors import UnknownReference
from coordinator.store.models import Group, Peer, Route

R = TypeVar("R")
MAX_PAGE = 1000


def group_ids(session: Session, names: Sequence[str], field: str) -> list[str]:
    """Ids of the named groups, in order; UnknownReference names the field and the missing group."""
    if not names:
        return []
    found = {g.name: g.id for g in session.scalars(select(Group).where(Group.name.in_(set(names))))}
    for idx, name in enumerate(names):
        if name not in found:
            raise UnknownReference(f"unknown group {name!r}", field=f"{field}[{idx}]")
    return list(dict.fromkeys(found[n] for n in names))


def peer_ids(session: Session, names: Sequence[str], field: str) -> list[str]:
    if not names:
        return []
    found = {p.name: p.id for p in session.scalars(select(Peer).where(Peer.name.in_(set(names))))}
    for idx, name in enumerate(names):
        if name not in found:
            raise UnknownReference(f"unknown peer {name!r}", field=f"{field}[{idx}]")
    return list(dict.fromkeys(found[n] for n in names))


def route_ids(session: Session, names: Sequence[str], field: str) -> list[str]:
    if not names:
        return []
    found = {r.name: r.id for r in session.scalars(select(Route).where(Route.name.in_(set(names))))}
    for idx, name in enumerate(names):
        if name not in found:
            raise UnknownReference(f"unknown route {name!r}", field=f"{field}[{idx}]")
    return list(dict.fromkeys(found[n] for n in names))


def route_names(session: Session, ids: Sequence[str]) -> list[str]:
    if not ids:
        return []
    names = {row[0]: row[1] for row in session.execute(select(Route.id, Route.name).where(Route.id.in_(set(ids))))}
    return [names[i] for i in ids if i in names]


def group_names(session: Session, ids: Sequence[str]) -> list[str]:
    if not ids:
        return []
    names = {row[0]: row[1] for row in session.execute(select(Group.id, Group.name).where(Group.id.in_(set(ids))))}
    return [names[i] for i in ids if i in names]


def peer_names(session: Session, ids: Sequence[str]) -> list[str]:
    if not ids:
        return []
    names = {row[0]: row[1] for row in session.execute(select(Peer.id, Peer.name).where(Peer.id.in_(set(ids))))}
    return [names[i] for i in ids if i in names]


def page(session: Session, stmt: Select[R], key: Any, cursor: str | None, limit: int) -> tuple[list[R], str | None]:
    """Keyset paging on a unique column `key` (ascending)."""
    limit = max(1, min(limit, MAX_PAGE))
    if cursor:
        stmt = stmt.where(key > cursor)
    rows = list(session.scalars(stmt.order_by(key).limit(limit + 1)))
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, str(getattr(rows[-1], key.key))
    return rows, None
