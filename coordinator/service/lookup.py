"""Name <-> id resolution and paging helpers shared by the services."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from coordinator.errors import UnknownReference
from coordinator.store.models import Group, Peer, Route

R = TypeVar("R")
MAX_PAGE = 1000
Named = type[Group] | type[Peer] | type[Route]  # models with a unique `name`


def ids_by_name(session: Session, model: Named, names: Iterable[str]) -> dict[str, str]:
    """{name: id} of the rows of `model` with these names (unknown names are left out)."""
    wanted = set(names)
    if not wanted:
        return {}
    return {name: id_ for name, id_ in session.execute(select(model.name, model.id).where(model.name.in_(wanted)))}


def names_by_id(session: Session, model: Named, ids: Iterable[str]) -> dict[str, str]:
    """{id: name} of the rows of `model` with these ids (unknown ids are left out)."""
    wanted = set(ids)
    if not wanted:
        return {}
    return {id_: name for id_, name in session.execute(select(model.id, model.name).where(model.id.in_(wanted)))}


def _ids(session: Session, model: Named, kind: str, names: Sequence[str], field: str) -> list[str]:
    """Ids of the named rows, in order, without repeats; UnknownReference names the field and the missing name."""
    found = ids_by_name(session, model, names)
    for idx, name in enumerate(names):
        if name not in found:
            raise UnknownReference(f"unknown {kind} {name!r}", field=f"{field}[{idx}]")
    return list(dict.fromkeys(found[n] for n in names))


def _names(session: Session, model: Named, ids: Sequence[str]) -> list[str]:
    """Names of the rows with these ids, in order (ids of removed rows are skipped)."""
    names = names_by_id(session, model, ids)
    return [names[i] for i in ids if i in names]


def group_ids(session: Session, names: Sequence[str], field: str) -> list[str]:
    return _ids(session, Group, "group", names, field)


def peer_ids(session: Session, names: Sequence[str], field: str) -> list[str]:
    return _ids(session, Peer, "peer", names, field)


def route_ids(session: Session, names: Sequence[str], field: str) -> list[str]:
    return _ids(session, Route, "route", names, field)


def group_names(session: Session, ids: Sequence[str]) -> list[str]:
    return _names(session, Group, ids)


def peer_names(session: Session, ids: Sequence[str]) -> list[str]:
    return _names(session, Peer, ids)


def route_names(session: Session, ids: Sequence[str]) -> list[str]:
    return _names(session, Route, ids)


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
