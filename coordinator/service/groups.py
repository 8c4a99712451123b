"""Groups: create, rename, set members, delete (refused while a policy, a route or a setup key uses the group)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, NotFound
from coordinator.schemas import GroupIn, GroupOut, GroupUpdate, Page
from coordinator.security import new_id
from coordinator.service.context import ServiceContext
from coordinator.service.lookup import page, peer_ids
from coordinator.service.tx import Tx, peer_node, upsert_peer, utcnow
from coordinator.store.models import Group, Peer, PeerGroup, Policy, Route, RouteRouter, SetupKey


def group_out(session: Session, group: Group) -> GroupOut:
    members = session.scalars(
        select(Peer.name).join(PeerGroup, PeerGroup.peer_id == Peer.id).where(PeerGroup.group_id == group.id)
    ).all()
    return GroupOut(
        id=group.id,
        name=group.name,
        description=group.description,
        peers=sorted(members),
        created_at=group.created_at,
    )


def summary(session: Session, group: Group) -> dict[str, object]:
    out = group_out(session, group)
    return {"name": out.name, "description": out.description, "peers": out.peers}


class GroupService:
    def __init__(self, coord: ServiceContext) -> None:
        self.ctx = coord

    def _get(self, session: Session, group_id: str) -> Group:
        group = session.get(Group, group_id)
        if group is None:
            raise NotFound("group", group_id)
        return group

    def find(self, *, name: str | None, cursor: str | None, limit: int) -> Page[GroupOut]:
        with self.ctx.store.read() as s:
            stmt = select(Group)
            if name:
                stmt = stmt.where(Group.name == name)
            rows, nxt = page(s, stmt, Group.name, cursor, limit)
            return Page[GroupOut](items=[group_out(s, g) for g in rows], next_cursor=nxt)

    def get(self, group_id: str) -> GroupOut:
        with self.ctx.store.read() as s:
            return group_out(s, self._get(s, group_id))

    def create(self, actor: str, body: GroupIn) -> GroupOut:
        def run(tx: Tx) -> GroupOut:
            s = tx.session
            if s.scalar(select(Group.id).where(Group.name == body.name)):
                raise Conflict(f"group {body.name!r} already exists", field="name")
            group = Group(id=new_id(), name=body.name, description=body.description, created_at=utcnow())
            s.add(group)
            s.flush()
            gid = group.id
            tx.graph(lambda g, _rev: g.upsert_group(gid, body.name))
            if body.peers is not None:
                self._set_members(tx, group, body.peers)
            s.flush()
            out = group_out(s, group)
            tx.audit("group.create", "group", gid, group.name, None, summary(s, group))
            return out

        return self.ctx.write(actor, run)

    def update(self, actor: str, group_id: str, body: GroupUpdate) -> GroupOut:
        def run(tx: Tx) -> GroupOut:
            s = tx.session
            group = self._get(s, group_id)
            before = summary(s, group)
            if body.name is not None and body.name != group.name:
                if s.scalar(select(Group.id).where(Group.name == body.name)):
                    raise Conflict(f"group {body.name!r} already exists", field="name")
                group.name = body.name
                name = body.name
                tx.graph(lambda g, _rev: g.upsert_group(group_id, name))
            if body.description is not None:
                group.description = body.description
            if body.peers is not None:
                self._set_members(tx, group, body.peers)
            s.flush()
            after = summary(s, group)
            if after != before:
                tx.audit("group.update", "group", group.id, group.name, before, after)
            return group_out(s, group)

        return self.ctx.write(actor, run)

    def delete(self, actor: str, group_id: str) -> None:
        def run(tx: Tx) -> None:
            s = tx.session
            group = self._get(s, group_id)
            users = [
                p.name
                for p in s.scalars(select(Policy))
                if group_id in p.endpoints["sources"]["groups"] + p.endpoints["destinations"]["groups"]
            ]
            if users:
                raise Conflict(f"group {group.name!r} is used by policies: {', '.join(sorted(users))}")
            routes = sorted(s.scalars(select(Route.name).join(RouteRouter).where(RouteRouter.group_id == group_id)))
            if routes:
                raise Conflict(f"group {group.name!r} routes routes: {', '.join(routes)}")
            keys = [k.name for k in s.scalars(select(SetupKey)) if group_id in k.auto_groups]
            if keys:
                raise Conflict(f"group {group.name!r} is an auto-group of setup keys: {', '.join(sorted(keys))}")
            before = summary(s, group)
            s.execute(delete(PeerGroup).where(PeerGroup.group_id == group_id))
            s.delete(group)
            tx.graph(lambda g, _rev: g.remove_group(group_id))
            tx.audit("group.delete", "group", group_id, before["name"], before, None)  # type: ignore[arg-type]

        self.ctx.write(actor, run)

    def _set_members(self, tx: Tx, group: Group, names: list[str]) -> None:
        s = tx.session
        wanted = set(peer_ids(s, names, "peers"))
        current = set(s.scalars(select(PeerGroup.peer_id).where(PeerGroup.group_id == group.id)))
        for pid in current - wanted:
            s.execute(delete(PeerGroup).where(PeerGroup.group_id == group.id, PeerGroup.peer_id == pid))
        for pid in wanted - current:
            s.add(PeerGroup(peer_id=pid, group_id=group.id))
        s.flush()
        for pid in current ^ wanted:
            peer = s.get(Peer, pid)
            assert peer is not None
            s.refresh(peer, ["groups"])
            tx.graph(upsert_peer(peer_node(peer)))
