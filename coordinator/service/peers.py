"""Peers: enrollment with setup keys, peer credentials, admin updates, state reports, ephemeral expiry."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Forbidden, Invalid, NotFound, RateLimited, Unauthorized, UnknownReference
from coordinator.identity import ChallengeError
from coordinator.ipam import IpAllocator, PrefixError, parse_mesh_prefix
from coordinator.schemas import (
    ConnectionState,
    EnrollPayload,
    EnrollResponse,
    KeyChangePayload,
    Page,
    PeerEvent,
    PeerOut,
    PeerUpdate,
    SealedReply,
    SealedRequest,
    StateReport,
    sanitize_peer_name,
)
from coordinator.security import PEER_CREDENTIAL_PREFIX, hash_secret, new_id, new_secret
from coordinator.service.context import ServiceContext
from coordinator.service.lookup import group_ids, page
from coordinator.service.tx import Tx, peer_node, upsert_peer, utcnow
from coordinator.store.models import (
    ConsumedChallenge,
    Group,
    MeshSettings,
    Peer,
    PeerGroup,
    Policy,
    Route,
    RouteRouter,
    SetupKey,
)
from starling_proto.routes import EXIT_PREFIX
from starling_proto.seal import OpenedRequest, Purpose, SealError, open_request


def exit_node_name(peer: Peer) -> str | None:
    """The name of the peer's chosen exit node (no query unless it has one), or None."""
    return peer.exit_node.name if peer.exit_node_id and peer.exit_node else None


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
        exit_node=exit_node_name(peer),
    )


def summary(peer: Peer) -> dict[str, Any]:
    return {
        "name": peer.name,
        "public_key": peer.public_key,
        "mesh_ip": peer.mesh_ip,
        "groups": sorted(g.name for g in peer.groups),
        "approved": peer.approved,
        "exit_node": exit_node_name(peer),
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


P = TypeVar("P", bound=BaseModel)


def payload_of(model: type[P], opened: OpenedRequest) -> P:
    """The sealed payload validated as `model`; Invalid (422) naming the first bad field."""
    try:
        return model.model_validate(opened.payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise Invalid(f"{where}: {first.get('msg')}", field=where or None) from exc


class PeerService:
    def __init__(self, coord: ServiceContext) -> None:
        self.ctx = coord
        self._last_report: dict[str, float] = {}
        self._events: dict[str, list[float]] = {}

    @property
    def domain(self) -> str:
        settings = self.ctx.view.settings
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
        with self.ctx.store.read() as s:
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
        with self.ctx.store.read() as s:
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
            if "exit_node" in body.model_fields_set:
                peer.exit_node_id = self._exit_node(s, peer, body.exit_node)
            s.flush()
            s.refresh(peer, ["groups", "exit_node"])
            after = summary(peer)
            if after != before:
                tx.graph(upsert_peer(peer_node(peer)))
                tx.audit("peer.update", "peer", peer.id, peer.name, before, after)
            return peer_out(peer, self.domain)

        return self.ctx.write(actor, run)

    @staticmethod
    def _exit_node(session: Session, peer: Peer, name: str | None) -> str | None:
        """The id of the exit node named `name` (None: none); Invalid unless it routes a 0.0.0.0/0 route."""
        if name is None:
            return None
        exit_peer = session.scalar(select(Peer).where(Peer.name == name))
        if exit_peer is None:
            raise UnknownReference(f"unknown peer {name!r}", field="exit_node")
        if exit_peer.id == peer.id:
            raise Invalid("a peer cannot be its own exit node", field="exit_node")
        groups = [g.id for g in exit_peer.groups]
        routes = session.scalars(
            select(Route.name)
            .join(RouteRouter, RouteRouter.route_id == Route.id)
            .where(Route.prefix == str(EXIT_PREFIX))
            .where((RouteRouter.peer_id == exit_peer.id) | RouteRouter.group_id.in_(groups))
        ).first()
        if routes is None:
            raise Invalid(
                f"peer {name!r} is not an exit node: make it a routing peer of a {EXIT_PREFIX} route first",
                field="exit_node",
            )
        return exit_peer.id

    def delete(self, actor: str, peer_id: str) -> None:
        def run(tx: Tx) -> None:
            self._delete(tx, self._get(tx.session, peer_id), "peer.delete")

        self.ctx.write(actor, run)

    def _delete(self, tx: Tx, peer: Peer, action: str) -> None:
        s = tx.session
        before = summary(peer)
        for pol in s.scalars(select(Policy)):
            ends = pol.endpoints
            if peer.id in ends["sources"]["peers"] + ends["destinations"]["peers"]:
                pol.endpoints = {
                    side: {**ends[side], "peers": [p for p in ends[side]["peers"] if p != peer.id]}
                    for side in ("sources", "destinations")
                }
                tx.audit("policy.update", "policy", pol.id, pol.name, None, {"removed_peer": peer.name})
        # Peers that used it as their exit node lose it (the store sets null; their maps say so).
        for user in list(s.scalars(select(Peer).where(Peer.exit_node_id == peer.id))):
            user.exit_node_id = None
            s.flush()
            s.refresh(user, ["groups", "exit_node"])
            tx.graph(upsert_peer(peer_node(user)))
            tx.audit("peer.update", "peer", user.id, user.name, {"exit_node": peer.name}, {"exit_node": None})
        s.delete(peer)
        peer_id = peer.id
        tx.graph(lambda g, _rev: g.remove_peer(peer_id))
        tx.audit(action, "peer", peer.id, peer.name, before, None)

    # ----- proof of possession ----------------------------------------------------------------
    def _open(self, purpose: Purpose, wire: SealedRequest, source: str) -> tuple[OpenedRequest, str, dt.datetime]:
        """Check the challenge (ours, not expired) and open the sealed request. Unauthorized (with the
        refusal audited when the named key belongs to a peer) if the sender did not prove possession."""
        try:
            nonce, expires = self.ctx.identity.check(wire.challenge)
            opened = open_request(purpose, self.ctx.identity.private, wire.model_dump(exclude_none=True))
        except ChallengeError as exc:
            self._refused(purpose, wire.public_key, source, exc.reason)
            raise Unauthorized(f"challenge refused: {exc.detail}") from exc
        except SealError as exc:
            if exc.reason == "malformed":
                raise Invalid(f"sealed request: {exc.detail}", field="box") from exc
            if exc.reason == "key":
                raise Invalid(exc.detail, field="public_key") from exc
            self._refused(purpose, wire.public_key, source, exc.reason)
            raise Unauthorized(f"proof of possession failed: {exc.detail}") from exc
        return opened, nonce, dt.datetime.fromtimestamp(expires, dt.UTC)

    def _refused(self, purpose: str, public_key: str, source: str, reason: str) -> None:
        """Audit a refused proof about an existing peer (a takeover attempt or a broken agent)."""
        node = self.ctx.view.peer_by_key(public_key)
        if node is None:
            return
        action = "peer.login.refused" if purpose == "enroll" else "peer.key.refused"

        def run(tx: Tx) -> None:
            tx.actor = f"source:{source}"
            tx.audit(action, "peer", node.id, node.name, None, {"source": source, "reason": reason})

        self.ctx.write("enroll", run)

    @staticmethod
    def _consume(tx: Tx, nonce: str, expires: dt.datetime) -> None:
        if tx.session.get(ConsumedChallenge, nonce) is not None:
            raise Unauthorized("challenge refused: it was already used (replayed request)")
        tx.session.add(ConsumedChallenge(nonce=nonce, expires_at=expires))

    def purge_challenges(self) -> int:
        """Forget consumed challenges that have expired (they are refused as stale anyway)."""
        with self.ctx.store.transaction() as s:
            result = s.execute(delete(ConsumedChallenge).where(ConsumedChallenge.expires_at < utcnow()))
        return int(getattr(result, "rowcount", 0) or 0)

    # ----- enrollment -------------------------------------------------------------------------
    def enroll(self, wire: SealedRequest, source: str) -> SealedReply:
        """Enroll a new WireGuard key with a setup key, or log in a known key on its proof alone."""
        opened, nonce, expires = self._open("enroll", wire, source)
        body = payload_of(EnrollPayload, opened)
        public_key = opened.public_keys[0]

        def run(tx: Tx) -> EnrollResponse:
            s = tx.session
            now = utcnow()
            self._consume(tx, nonce, expires)
            credential = new_secret(PEER_CREDENTIAL_PREFIX)
            peer = s.scalar(select(Peer).where(Peer.public_key == public_key))
            if peer is not None:
                # Login of a known key: its proof is the authority; a setup key adds nothing.
                tx.actor = f"peer:{peer.name}"
                peer.hostname, peer.os, peer.agent_version = body.hostname, body.os, body.agent_version
                peer.credential_hash = credential.hash
                peer.last_seen = now
                tx.audit("peer.login", "peer", peer.id, peer.name, None, {"hostname": body.hostname, "source": source})
                login = True
            else:
                if body.setup_key is None:
                    raise Forbidden("this key is not enrolled: a setup key is required")
                key = s.scalar(select(SetupKey).where(SetupKey.key_hash == hash_secret(body.setup_key)))
                if key is None:
                    raise Forbidden("setup key is not valid")
                tx.actor = f"setup-key:{key.name}"
                state = setup_key_state(key, now)
                if state != "valid":
                    raise Forbidden(f"setup key is {state}")
                peer = self._new_peer(tx, body, key, credential.hash, now, public_key, source)
                key.used_count += 1
                key.last_used = now
                login = False
            s.flush()
            return EnrollResponse(
                peer=peer_out(peer, self.domain),
                credential=credential.clear,
                signing_public_key=self.ctx.signer.public_key_b64,
                login=login,
            )

        result = self.ctx.write("enroll", run)
        return SealedReply.model_validate(opened.reply.seal(result.model_dump(mode="json")))

    def _new_peer(
        self, tx: Tx, body: EnrollPayload, key: SetupKey, cred_hash: str, now: dt.datetime, public_key: str, source: str
    ) -> Peer:
        s = tx.session
        settings = s.get(MeshSettings, 1)
        assert settings is not None
        name = self._unique_name(s, body.name or sanitize_peer_name(body.hostname), explicit=body.name is not None)
        # The graph holds every assigned address (writes are serialized); a replica racing us for the
        # same address hits the unique constraint and the enrollment fails cleanly with 409.
        used = self.ctx.view.used_mesh_ips()
        try:
            mesh_ip = IpAllocator(parse_mesh_prefix(settings.mesh_prefix)).allocate(used)
        except PrefixError as exc:
            raise Conflict(f"{exc}: widen it (PATCH /api/v1/settings mesh_prefix) or remove peers") from exc
        existing_groups = set(s.scalars(select(Group.id).where(Group.id.in_(key.auto_groups))))
        peer = Peer(
            id=new_id(),
            name=name,
            public_key=public_key,
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
        tx.graph(upsert_peer(peer_node(peer)))
        tx.audit(
            "peer.enroll", "peer", peer.id, peer.name, None, {**summary(peer), "setup_key": key.name, "source": source}
        )
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
        with self.ctx.store.read() as s:
            row = s.execute(select(Peer.id, Peer.name).where(Peer.credential_hash == hash_secret(credential))).first()
        if row is None:
            raise Unauthorized("peer credential is not valid")
        return row[0], row[1]

    def report_state(self, peer_id: str, report: StateReport) -> None:
        """Store the agent's connection report: only about peers in its own current map (422 naming the
        others, nothing stored), at most one per `limits.state_report_interval`."""
        in_map = self.ctx.view.map_members(peer_id)
        outside = sorted({c.peer_id for c in report.connections} - in_map)
        if outside:
            shown = ", ".join(repr(p) for p in outside[:5]) + (
                f" and {len(outside) - 5} more" if len(outside) > 5 else ""
            )
            raise Invalid(f"the report names peers that are not in this peer's map: {shown}", field="connections")
        interval = self.ctx.config.limits.state_report_interval
        mono = time.monotonic()
        if mono - self._last_report.get(peer_id, -1e9) < interval:
            raise RateLimited(f"state reports are limited to one per {interval:g}s")
        self._last_report[peer_id] = mono
        now = utcnow()
        data = [c.model_dump(mode="json") for c in report.connections]
        with self.ctx.store.transaction() as s:
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

        self.ctx.write("peer", run)

    def change_key(self, peer_id: str, wire: SealedRequest, source: str) -> PeerOut:
        """Key rotation, presented by the peer itself (credential) and sealed with both its current and its
        new private key. `prepare` validates and audits the intent; `commit` switches the peer's public key
        (pushed to its neighbours by the map stream). Committing a key the coordinator already holds
        changes nothing."""
        if wire.new_public_key is None:
            raise Invalid("a key rotation names new_public_key (and is sealed with both keys)", field="new_public_key")
        opened, nonce, expires = self._open("rotate", wire, source)
        body = payload_of(KeyChangePayload, opened)
        old_key, new_key = opened.public_keys

        def run(tx: Tx) -> PeerOut:
            s = tx.session
            peer = self._get(s, peer_id)
            tx.actor = f"peer:{peer.name}"
            if new_key == peer.public_key:
                return peer_out(peer, self.domain)
            if old_key != peer.public_key:
                raise Conflict(
                    f"the coordinator holds key {peer.public_key[:8]}... for this peer, not "
                    f"{old_key[:8]}... (changed concurrently?)",
                    field="public_key",
                )
            if s.scalar(select(Peer.id).where(Peer.public_key == new_key, Peer.id != peer.id)):
                raise Conflict("that public key belongs to another peer", field="new_public_key")
            self._consume(tx, nonce, expires)
            detail: dict[str, Any] = {"public_key": new_key, "version": body.version, "source": body.source}
            if body.phase == "prepare":
                tx.audit("peer.key.prepare", "peer", peer.id, peer.name, {"public_key": peer.public_key}, detail)
                return peer_out(peer, self.domain)
            before = {"public_key": peer.public_key}
            peer.public_key = new_key
            s.flush()
            tx.graph(upsert_peer(peer_node(peer)))
            tx.audit("peer.key.rotate", "peer", peer.id, peer.name, before, detail)
            return peer_out(peer, self.domain)

        return self.ctx.write("peer", run)

    def mark_connected(self, peer_id: str, connected: bool) -> None:
        with self.ctx.store.transaction() as s:
            s.execute(update(Peer).where(Peer.id == peer_id).values(connected=connected, last_seen=utcnow()))
        self.ctx.metrics.peers_connected.set(self.ctx.hub.connected_peers())

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
                if not self.ctx.hub.is_connected(peer.id):
                    self._delete(tx, peer, "peer.expire")
            return len(stale)

        return self.ctx.write("system", run)
