"""Peers: enrollment with setup keys, peer credentials, admin updates, state reports, ephemeral expiry."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Forbidden, NotFound, RateLimited, Unauthorized
from coordinator.ipam import IpAllocator, parse_mesh_prefix
from coordinator.schemas import (
    ConnectionState,
    EnrollRequest,
    EnrollResponse,
    KeyChange,
    Page,
    PeerEvent,
    PeerOut,
    PeerUpdate,
    StateReport,
    sanitize_peer_name,
)
from coordinator.security import PEER_CREDENTIAL_PREFIX, hash_secret, new_id, new_secret
from coordinator.service.core import Coordinator, Tx, peer_node, utcnow
from coordinator.service.lookup import group_ids, page
from coordinator.store.models import Group, MeshSettings, Peer, PeerGroup, Policy, SetupKey


def peer_out(peer: Peer, domain: str) -> PeerOut:
    return PeerOut(
        id=peer.id,
        name=peer.name,
        hostname=peer.hostname,
        public_key=peer.public_key,
        mesh_ip=peer.mesh_ip,
        dns_name=f"{peer.name}.{domain}" if domain else peer.name,
        groups=[g.name for g in peer.groups],
        os=peer.os,
        agent_version=peer.agent_version,
        approved=peer.approved,
        ephemeral=peer.ephemeral,
        connected=peer.connected,
        last_seen=peer.last_seen,
        created_at=peer.created_at,
        connections=[ConnectionState.model_validate(c) for c in peer.connections or []],
        connections_reported_at=peer.connections_reported_at,
    )


def summary(peer: Peer) -> dict[str, Any]:
    return {
        "name": peer.name,
        "public_key": peer.public_key,
        "mesh_ip": peer.mesh_ip,
        "groups": sorted(g.name for g in peer.groups),
        "approved": peer.approved,
    }


def setup_key_state(key: SetupKey, now: dt.datetime) -> str:
    if key.revoked:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    limit = key.usage_limit if key.reusable else 1
    if limit and key.used_count >= limit:
        return "exhausted"
    return "valid"


class PeerService:
    def __init__(self, coord: Coordinator) -> None:
        self.c = coord
        self._last_report: dict[str, float] = {}
        self._events: dict[str, list[float]] = {}

    @property
    def domain(self) -> str:
        settings = self.c.graph.settings
        return settings.dns_domain if settings else ""

    def _get(self, session: Session, peer_id: str) -> Peer:
        peer = session.get(Peer, peer_id)
        if peer is None:
            raise NotFound("peer", peer_id)
        return peer

    # ----- admin API --------------------------------------------------------------------------
    def find(
        self, *, name: str | None, group: str | None, connected: bool | None, cursor: str | None, limit: int
    ) -> Page[PeerOut]:
        with self.c.store.read() as s:
            stmt = select(Peer)
            if name:
                stmt = stmt.where(Peer.name == name)
            if group:
                stmt = stmt.join(PeerGroup, PeerGroup.peer_id == Peer.id).join(Group, Group.id == PeerGroup.group_id)
                stmt = stmt.where(Group.name == group)
            if connected is not None:
                stmt = stmt.where(Peer.connected.is_(connected))
            rows, nxt = page(s, stmt, Peer.name, cursor, limit)
            return Page[PeerOut](items=[peer_out(p, self.domain) for p in rows], next_cursor=nxt)

    def get(self, peer_id: str) -> PeerOut:
        with self.c.store.read() as s:
            return peer_out(self._get(s, peer_id), self.domain)

    def update(self, actor: str, peer_id: str, body: PeerUpdate) -> PeerOut:
        def run(tx: Tx) -> PeerOut:
            s = tx.session
            peer = self._get(s, peer_id)
            before = summary(peer)
            if body.name is not None and body.name != peer.name:
                if s.scalar(select(Peer.id).where(Peer.name == body.name)):
                    raise Conflict(f"peer name {body.name!r} is taken", field="name")
                peer.name = body.name
            if body.approved is not None:
                peer.approved = body.approved
            if body.groups is not None:
                wanted = group_ids(s, body.groups, "groups")
                s.execute(delete(PeerGroup).where(PeerGroup.peer_id == peer.id))
                s.add_all(PeerGroup(peer_id=peer.id, group_id=g) for g in wanted)
            s.flush()
            s.refresh(peer, ["groups"])
            after = summary(peer)
            if after != before:
                node = peer_node(peer)
                tx.graph(lambda rev: self.c.graph.upsert_peer(node, rev))
                tx.audit("peer.update", "peer", peer.id, peer.name, before, after)
            return peer_out(peer, self.domain)

        return self.c.write(actor, run)

    def delete(self, actor: str, peer_id: str) -> None:
        def run(tx: Tx) -> None:
            self._delete(tx, self._get(tx.session, peer_id), "peer.delete")

        self.c.write(actor, run)

    def _delete(self, tx: Tx, peer: Peer, action: str) -> None:
        s = tx.session
        before = summary(peer)
        for pol in s.scalars(select(Policy)):
            ends = pol.endpoints
            if peer.id in ends["sources"]["peers"] + ends["destinations"]["peers"]:
                pol.endpoints = {
                    side: {"groups": ends[side]["groups"], "peers": [p for p in ends[side]["peers"] if p != peer.id]}
                    for side in ("sources", "destinations")
                }
                tx.audit("policy.update", "policy", pol.id, pol.name, None, {"removed_peer": peer.name})
        s.delete(peer)
        peer_id = peer.id
        tx.graph(lambda _rev: self.c.graph.remove_peer(peer_id))
        tx.audit(action, "peer", peer.id, peer.name, before, None)

    # ----- enrollment -------------------------------------------------------------------------
    def enroll(self, body: EnrollRequest) -> EnrollResponse:
        key_hash = hash_secret(body.setup_key)

        def run(tx: Tx) -> EnrollResponse:
            s = tx.session
            now = utcnow()
            key = s.scalar(select(SetupKey).where(SetupKey.key_hash == key_hash))
            if key is None:
                raise Forbidden("setup key is not valid")
            tx.actor = f"setup-key:{key.name}"
            state = setup_key_state(key, now)
            credential = new_secret(PEER_CREDENTIAL_PREFIX)
            peer = s.scalar(select(Peer).where(Peer.public_key == body.public_key))
            if peer is not None:
                # Re-login of a known key: idempotent; a one-off key may re-login the peer it enrolled.
                if state in ("revoked", "expired") or (state == "exhausted" and peer.setup_key_id != key.id):
                    raise Forbidden(f"setup key is {state}")
                peer.hostname, peer.os, peer.agent_version = body.hostname, body.os, body.agent_version
                peer.credential_hash = credential.hash
                peer.last_seen = now
                tx.audit("peer.login", "peer", peer.id, peer.name, None, {"hostname": body.hostname})
            else:
                if state != "valid":
                    raise Forbidden(f"setup key is {state}")
                peer = self._new_peer(tx, body, key, credential.hash, now)
                key.used_count += 1
                key.last_used = now
            s.flush()
            return EnrollResponse(
                peer=peer_out(peer, self.domain),
                credential=credential.clear,
                signing_public_key=self.c.signer.public_key_b64,
            )

        return self.c.write("enroll", run)

    def _new_peer(self, tx: Tx, body: EnrollRequest, key: SetupKey, cred_hash: str, now: dt.datetime) -> Peer:
        s = tx.session
        settings = s.get(MeshSettings, 1)
        assert settings is not None
        name = self._unique_name(s, body.name or sanitize_peer_name(body.hostname), explicit=body.name is not None)
        # The graph holds every assigned address (writes are serialized); a replica racing us for the
        # same address hits the unique constraint and the enrollment fails cleanly with 409.
        used = {n.mesh_ip for n in self.c.graph.peers.values()}
        mesh_ip = IpAllocator(parse_mesh_prefix(settings.mesh_prefix)).allocate(used)
        existing_groups = set(s.scalars(select(Group.id).where(Group.id.in_(key.auto_groups))))
        peer = Peer(
            id=new_id(),
            name=name,
            public_key=body.public_key,
            mesh_ip=mesh_ip,
            hostname=body.hostname,
            os=body.os,
            agent_version=body.agent_version,
            approved=not settings.peer_approval_required,
            ephemeral=key.ephemeral,
            connected=False,
            last_seen=now,
            created_at=now,
            credential_hash=cred_hash,
            setup_key_id=key.id,
            connections=[],
        )
        s.add(peer)
        s.flush()
        s.add_all(PeerGroup(peer_id=peer.id, group_id=g) for g in key.auto_groups if g in existing_groups)
        s.flush()
        s.refresh(peer, ["groups"])
        node = peer_node(peer)
        tx.graph(lambda rev: self.c.graph.upsert_peer(node, rev))
        tx.audit("peer.enroll", "peer", peer.id, peer.name, None, {**summary(peer), "setup_key": key.name})
        return peer

    @staticmethod
    def _unique_name(session: Session, base: str, *, explicit: bool) -> str:
        taken = set(session.scalars(select(Peer.name).where(Peer.name.like(base[:55] + "%"))))
        if base not in taken:
            return base
        if explicit:
            raise Conflict(f"peer name {base!r} is taken", field="name")
        for n in range(2, 10_000):
            candidate = f"{base[:55]}-{n}"
            if candidate not in taken:
                return candidate
        raise Conflict(f"no free peer name for {base!r}", field="hostname")

    # ----- peer-facing ------------------------------------------------------------------------
    def authenticate(self, credential: str) -> tuple[str, str]:
        """(peer id, peer name) for a peer credential, or Unauthorized."""
        with self.c.store.read() as s:
            row = s.execute(select(Peer.id, Peer.name).where(Peer.credential_hash == hash_secret(credential))).first()
        if row is None:
            raise Unauthorized("peer credential is not valid")
        return row[0], row[1]

    def report_state(self, peer_id: str, report: StateReport) -> None:
        """Store the agent's connection report; at most one per `limits.state_report_interval`."""
        interval = self.c.config.limits.state_report_interval
        mono = time.monotonic()
        if mono - self._last_report.get(peer_id, -1e9) < interval:
            raise RateLimited(f"state reports are limited to one per {interval:g}s")
        self._last_report[peer_id] = mono
        now = utcnow()
        known = self.c.graph.peers
        data = [c.model_dump(mode="json") for c in report.connections if c.peer_id in known]
        with self.c.store.transaction() as s:
            s.execute(
                update(Peer)
                .where(Peer.id == peer_id)
                .values(connections=data, connections_reported_at=now, last_seen=now)
            )

    def report_event(self, peer_id: str, event: PeerEvent) -> None:
        """Record an agent-reported event in the audit log (at most 10 per minute per peer)."""
        now = time.monotonic()
        recent = [t for t in self._events.get(peer_id, []) if now - t < 60]
        if len(recent) >= 10:
            raise RateLimited("at most 10 events per minute per peer")
        self._events[peer_id] = [*recent, now]

        def run(tx: Tx) -> None:
            peer = self._get(tx.session, peer_id)
            tx.actor = f"peer:{peer.name}"
            tx.audit(f"peer.{event.kind}", "peer", peer.id, peer.name, None, {"message": event.message})

        self.c.write("peer", run)

    def change_key(self, peer_id: str, body: KeyChange) -> PeerOut:
        """Key rotation, presented by the peer itself. `prepare` validates and audits the intent;
        `commit` switches the peer's public key (pushed to its neighbours by the map stream).
        Idempotent: committing the key the coordinator already holds changes nothing."""

        def run(tx: Tx) -> PeerOut:
            s = tx.session
            peer = self._get(s, peer_id)
            tx.actor = f"peer:{peer.name}"
            if body.public_key == peer.public_key:
                return peer_out(peer, self.domain)
            if body.previous_public_key != peer.public_key:
                raise Conflict(
                    f"the coordinator holds key {peer.public_key[:8]}... for this peer, not "
                    f"{body.previous_public_key[:8]}... (changed concurrently?)",
                    field="previous_public_key",
                )
            if s.scalar(select(Peer.id).where(Peer.public_key == body.public_key, Peer.id != peer.id)):
                raise Conflict("that public key belongs to another peer", field="public_key")
            detail: dict[str, Any] = {"public_key": body.public_key, "version": body.version, "source": body.source}
            if body.phase == "prepare":
                tx.audit("peer.key.prepare", "peer", peer.id, peer.name, {"public_key": peer.public_key}, detail)
                return peer_out(peer, self.domain)
            before = {"public_key": peer.public_key}
            peer.public_key = body.public_key
            s.flush()
            node = peer_node(peer)
            tx.graph(lambda rev: self.c.graph.upsert_peer(node, rev))
            tx.audit("peer.key.rotate", "peer", peer.id, peer.name, before, detail)
            return peer_out(peer, self.domain)

        return self.c.write("peer", run)

    def mark_connected(self, peer_id: str, connected: bool) -> None:
        with self.c.store.transaction() as s:
            s.execute(update(Peer).where(Peer.id == peer_id).values(connected=connected, last_seen=utcnow()))
        self.c.metrics.peers_connected.set(self.c.hub.connected_peers())

    def expire_ephemeral(self) -> int:
        """Delete ephemeral peers that have been offline longer than the configured timeout."""

        def run(tx: Tx) -> int:
            s = tx.session
            settings = s.get(MeshSettings, 1)
            assert settings is not None
            cutoff = utcnow() - dt.timedelta(seconds=settings.ephemeral_offline_timeout)
            stale = [
                p
                for p in s.scalars(select(Peer).where(Peer.ephemeral.is_(True), Peer.connected.is_(False)))
                if p.last_seen is None or p.last_seen < cutoff
            ]
            for peer in stale:
                if peer.id not in self.c.hub.connected:
                    self._delete(tx, peer, "peer.expire")
            return len(stale)

        return self.c.write("system", run)
