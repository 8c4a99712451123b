"""SQLAlchemy ORM models: the coordinator's durable state (one mesh per database)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite drops the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class PeerGroup(Base):
    __tablename__ = "peer_groups"
    peer_id: Mapped[str] = mapped_column(String(32), ForeignKey("peers.id", ondelete="CASCADE"), primary_key=True)
    group_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Peer(Base):
    __tablename__ = "peers"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    public_key: Mapped[str] = mapped_column(String(44), unique=True)
    mesh_ip: Mapped[str] = mapped_column(String(15), unique=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    os: Mapped[str] = mapped_column(String(255), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    approved: Mapped[bool] = mapped_column(Boolean, default=True)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    credential_hash: Mapped[str] = mapped_column(String(64), index=True)
    setup_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    connections: Mapped[list[Any]] = mapped_column(JSON, default=list)
    connections_reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The exit node the administrator chose for this peer (a routing peer of a 0.0.0.0/0 route), if any.
    exit_node_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("peers.id", ondelete="SET NULL", name="fk_peers_exit_node_id"), nullable=True
    )
    groups: Mapped[list[Group]] = relationship(secondary="peer_groups", lazy="selectin", order_by="Group.name")
    exit_node: Mapped[Peer | None] = relationship(remote_side=[id], foreign_keys=[exit_node_id], lazy="select")


class Group(Base):
    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Policy(Base):
    __tablename__ = "policies"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    protocol: Mapped[str] = mapped_column(String(8), default="any")
    bidirectional: Mapped[bool] = mapped_column(Boolean, default=False)
    # ports: list of [start, end] pairs (a single port is [p, p]).
    ports: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # endpoints: {"sources": {"groups": [ids], "peers": [ids]}, "destinations": {..., "routes": [ids]}}
    # ("routes" only in destinations, and absent in rows written before routes existed)
    endpoints: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Route(Base):
    """A network route: an IPv4 prefix reached through routing peers (0.0.0.0/0: an exit node)."""

    __tablename__ = "routes"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    prefix: Mapped[str] = mapped_column(String(18))
    masquerade: Mapped[bool] = mapped_column(Boolean, default=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    routers: Mapped[list[RouteRouter]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="RouteRouter.id"
    )


class RouteRouter(Base):
    """One routing peer of a route: a peer, or every member of a group (exactly one of the two)."""

    __tablename__ = "route_routers"
    __table_args__ = (
        CheckConstraint("(peer_id IS NULL) <> (group_id IS NULL)", name="ck_route_routers_peer_or_group"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    route_id: Mapped[str] = mapped_column(String(32), ForeignKey("routes.id", ondelete="CASCADE"), index=True)
    peer_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("peers.id", ondelete="CASCADE"), nullable=True, index=True
    )
    group_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("groups.id", ondelete="CASCADE"), nullable=True, index=True
    )
    metric: Mapped[int] = mapped_column(Integer)


class SetupKey(Base):
    __tablename__ = "setup_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    reusable: Mapped[bool] = mapped_column(Boolean, default=False)
    usage_limit: Mapped[int] = mapped_column(Integer, default=0)
    used_count: Mapped[int] = mapped_column(Integer, default=0)
    auto_groups: Mapped[list[Any]] = mapped_column(JSON, default=list)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(8))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class MeshSettings(Base):
    """Singleton row (id=1): mesh-wide settings and the revision counter bumped by every map-affecting write."""

    __tablename__ = "mesh_settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    mesh_prefix: Mapped[str] = mapped_column(String(18))
    dns_domain: Mapped[str] = mapped_column(String(253))
    turn_servers: Mapped[list[Any]] = mapped_column(JSON, default=list)
    signal_url: Mapped[str] = mapped_column(String(255), default="")
    credential_ttl: Mapped[int] = mapped_column(Integer)
    ephemeral_offline_timeout: Mapped[int] = mapped_column(Integer)
    peer_approval_required: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_target", "target_type", "target_id"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(64))
    target_name: Mapped[str] = mapped_column(String(255), default="")
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ConsumedChallenge(Base):
    """A challenge that a sealed request used: refused if presented again, purged once expired."""

    __tablename__ = "consumed_challenges"
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


__all__ = [
    "ApiToken",
    "AuditEvent",
    "Base",
    "ConsumedChallenge",
    "Group",
    "MeshSettings",
    "Peer",
    "PeerGroup",
    "Policy",
    "Route",
    "RouteRouter",
    "SetupKey",
]
