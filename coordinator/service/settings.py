"""Mesh settings (prefix, DNS, TURN servers, credential TTL) and the audit log query."""

from __future__ import annotations

import datetime as dt
import ipaddress

from sqlalchemy import select

from coordinator.errors import Conflict, Invalid
from coordinator.ipam import PrefixError, parse_mesh_prefix
from coordinator.schemas import AuditOut, Page, SettingsOut, SettingsUpdate
from coordinator.service.context import ServiceContext
from coordinator.service.tx import Tx, settings_node
from coordinator.store.models import AuditEvent, MeshSettings, Peer

AUDIT_MAX_PAGE = 1000


def settings_out(row: MeshSettings) -> SettingsOut:
    return SettingsOut(
        mesh_prefix=row.mesh_prefix,
        dns_domain=row.dns_domain,
        turn_servers=list(row.turn_servers),
        signal_url=row.signal_url,
        credential_ttl=row.credential_ttl,
        ephemeral_offline_timeout=row.ephemeral_offline_timeout,
        peer_approval_required=row.peer_approval_required,
        revision=row.revision,
    )


class SettingsService:
    def __init__(self, coord: ServiceContext) -> None:
        self.ctx = coord

    def get(self) -> SettingsOut:
        with self.ctx.store.read() as s:
            row = s.get(MeshSettings, 1)
            assert row is not None
            return settings_out(row)

    def update(self, actor: str, body: SettingsUpdate) -> SettingsOut:
        def run(tx: Tx) -> SettingsOut:
            s = tx.session
            row = s.get(MeshSettings, 1)
            assert row is not None
            before = settings_out(row).model_dump(exclude={"revision"})
            if body.mesh_prefix is not None and body.mesh_prefix != row.mesh_prefix:
                try:
                    net = parse_mesh_prefix(body.mesh_prefix)
                except PrefixError as exc:
                    raise Invalid(str(exc), field="mesh_prefix") from exc
                outside = [
                    name
                    for name, ip in s.execute(select(Peer.name, Peer.mesh_ip))
                    if ipaddress.IPv4Address(ip) not in net
                ]
                if outside:
                    raise Conflict(
                        f"{len(outside)} peers have addresses outside {net} (e.g. {outside[0]}): remove them first",
                        field="mesh_prefix",
                    )
                row.mesh_prefix = str(net)
            for attr in (
                "dns_domain",
                "turn_servers",
                "signal_url",
                "credential_ttl",
                "ephemeral_offline_timeout",
                "peer_approval_required",
            ):
                value = getattr(body, attr)
                if value is not None:
                    setattr(row, attr, value)
            after = settings_out(row).model_dump(exclude={"revision"})
            if after != before:
                node = settings_node(row)
                tx.graph(lambda g, rev: g.set_settings(node, rev))
                tx.touch_all = True
                tx.audit("settings.update", "settings", "mesh", "mesh", before, after)
            s.flush()
            return settings_out(row)

        out = self.ctx.write(actor, run)
        out.revision = self.ctx.view.revision
        return out

    def audit(
        self,
        *,
        action: str | None,
        actor: str | None,
        target_type: str | None,
        target_id: str | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        cursor: str | None,
        limit: int,
    ) -> Page[AuditOut]:
        """Newest first; `cursor` is the id of the last event of the previous page."""
        limit = max(1, min(limit, AUDIT_MAX_PAGE))
        with self.ctx.store.read() as s:
            stmt = select(AuditEvent)
            if action:
                stmt = stmt.where(AuditEvent.action.like(action.replace("*", "%")))
            if actor:
                stmt = stmt.where(AuditEvent.actor == actor)
            if target_type:
                stmt = stmt.where(AuditEvent.target_type == target_type)
            if target_id:
                stmt = stmt.where(AuditEvent.target_id == target_id)
            if since:
                stmt = stmt.where(AuditEvent.time >= since)
            if until:
                stmt = stmt.where(AuditEvent.time < until)
            if cursor:
                try:
                    stmt = stmt.where(AuditEvent.id < int(cursor))
                except ValueError as exc:
                    raise Invalid("cursor must be an audit event id", field="cursor") from exc
            rows = list(s.scalars(stmt.order_by(AuditEvent.id.desc()).limit(limit + 1)))
            nxt = None
            if len(rows) > limit:
                rows = rows[:limit]
                nxt = str(rows[-1].id)
            items = [AuditOut.model_validate(r, from_attributes=True) for r in rows]
            return Page[AuditOut](items=items, next_cursor=nxt)
