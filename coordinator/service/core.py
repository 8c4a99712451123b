"""Coordinator: owns the store, the mesh graph and the stream hub, and runs every write.

`write()` is the single path for changes: one transaction that also bumps the mesh revision and
records audit events; after commit the queued graph operations run under the graph lock, the
affected maps are recomputed, and connected streams are woken. A failed write changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.config import CoordinatorConfig
from coordinator.engine import MeshGraph
from coordinator.engine.meshview import MeshView
from coordinator.errors import Conflict, Unavailable
from coordinator.identity import Identity
from coordinator.maps import MapService
from coordinator.metrics import Metrics
from coordinator.security import hash_secret
from coordinator.service.context import NoStreams, StreamNotifier
from coordinator.service.tx import Tx, peer_node, policy_node, route_node, settings_node
from coordinator.signing import TokenSigner
from coordinator.store import Store
from coordinator.store.database import is_unique_violation
from coordinator.store.models import Group, MeshSettings, Peer, Policy, Route
from coordinator.throttle import AuthThrottle
from starling_proto.netmap import RelayCredential

if TYPE_CHECKING:
    from coordinator.secrets import SecretSource
    from coordinator.service.credentials import CredentialService
    from coordinator.service.groups import GroupService
    from coordinator.service.peers import PeerService
    from coordinator.service.policies import PolicyService
    from coordinator.service.routes import RouteService
    from coordinator.service.settings import SettingsService

log = logging.getLogger(__name__)
T = TypeVar("T")


class Coordinator:
    peers: PeerService
    groups: GroupService
    policies: PolicyService
    routes: RouteService
    credentials: CredentialService
    settings: SettingsService

    def __init__(self, config: CoordinatorConfig, store: Store, secrets: dict[str, str]) -> None:
        from coordinator.service.credentials import CredentialService
        from coordinator.service.groups import GroupService
        from coordinator.service.peers import PeerService
        from coordinator.service.policies import PolicyService
        from coordinator.service.routes import RouteService
        from coordinator.service.settings import SettingsService

        self.config = config
        self.store = store
        # The graph is written only here (write(), reload()); everyone else reads it through `view`
        # (routes, dashboard, services) or `maps` (rendered maps, the stream hub's MapSource).
        self.graph = MeshGraph()
        # write_lock orders whole writes (transaction + graph update); lock guards the graph for
        # readers (streams, renders) and is held only while the graph changes, not during SQL.
        self.write_lock = threading.RLock()
        self.lock = threading.RLock()
        self.view = MeshView(self.graph, self.lock)
        self.maps = MapService(self.graph, self.lock, secrets["turn_secret"])
        self.metrics = Metrics()
        self.signer = TokenSigner(secrets["signing_key"])
        self.identity = Identity(secrets["identity_key"], config.limits.challenge_ttl)
        self.identity_key = secrets["identity_key"]
        self.signing_key = secrets["signing_key"]
        self.secret_source: SecretSource | None = None  # set by build_coordinator: where reload_secrets reads
        self.admin_token_hash = hash_secret(secrets["admin_token"])
        self.hub: StreamNotifier = NoStreams()  # build_coordinator attaches the stream hub
        self.started_at = time.time()
        self.peers = PeerService(self)
        self.groups = GroupService(self)
        self.policies = PolicyService(self)
        self.routes = RouteService(self)
        self.credentials = CredentialService(self)
        self.settings = SettingsService(self)
        self.throttle = AuthThrottle.for_coordinator(self)  # failed authentications per source address

    # ----- start-up and replica sync --------------------------------------------------------
    def ensure_settings(self) -> None:
        defaults = self.config.mesh
        with self.store.transaction() as s:
            if s.get(MeshSettings, 1) is None:
                s.add(
                    MeshSettings(
                        id=1,
                        revision=1,
                        mesh_prefix=defaults.prefix,
                        dns_domain=defaults.dns_domain,
                        turn_servers=list(defaults.turn_servers),
                        signal_url=defaults.signal_url,
                        credential_ttl=defaults.credential_ttl,
                        ephemeral_offline_timeout=defaults.ephemeral_offline_timeout,
                        peer_approval_required=defaults.peer_approval_required,
                    )
                )

    def reload(self) -> None:
        """Rebuild the graph from the store and compute every map."""
        started = time.perf_counter()
        with self.store.read() as s:
            settings = s.get(MeshSettings, 1)
            if settings is None:
                raise RuntimeError("store has no settings row: run migrations and start the coordinator once")
            groups = {g.id: g.name for g in s.scalars(select(Group))}
            policies = [policy_node(p) for p in s.scalars(select(Policy).order_by(Policy.id))]
            peers = [peer_node(p) for p in s.scalars(select(Peer).order_by(Peer.created_at, Peer.id))]
            routes = [route_node(r) for r in s.scalars(select(Route).order_by(Route.id))]
            revision = settings.revision
            snode = settings_node(settings)
        with self.lock:
            self.graph.load(snode, groups, policies, peers, revision, routes)
            self.maps.reset()
            self.metrics.observe_compute(self.graph.last_stats.maps, time.perf_counter() - started, full=True)
        self.hub.notify_all()
        log.info("graph loaded: %d peers, %d policies, revision %d", len(peers), len(policies), revision)

    def sync_from_store(self) -> bool:
        """Reload if another replica advanced the revision; True when it did."""
        with self.write_lock:
            with self.store.read() as s:
                revision = s.scalar(select(MeshSettings.revision).where(MeshSettings.id == 1)) or 0
            if revision > self.graph.revision:
                self.reload()
                return True
            return False

    # ----- writes ---------------------------------------------------------------------------
    def write(self, actor: str, fn: Callable[[Tx], T]) -> T:
        with self.write_lock:
            try:
                with self.store.transaction() as session:
                    tx = Tx(session=session, actor=actor)
                    result = fn(tx)
                    revision = self.graph.revision
                    if tx.graph_ops or tx.touch_all:
                        revision = self._bump_revision(session)
                    session.add_all(tx.audits)
                    session.flush()
            except IntegrityError as exc:
                if is_unique_violation(exc):
                    raise Conflict("a record with the same unique value already exists") from exc
                raise
            with self.lock:
                self._apply(tx, revision)
        for hook in tx.after_commit:
            hook()
        return result

    @staticmethod
    def _bump_revision(session: Session) -> int:
        session.execute(update(MeshSettings).where(MeshSettings.id == 1).values(revision=MeshSettings.revision + 1))
        revision = session.scalar(select(MeshSettings.revision).where(MeshSettings.id == 1))
        if revision is None:
            raise RuntimeError("store has no settings row")
        return int(revision)

    def _apply(self, tx: Tx, revision: int) -> None:
        if not (tx.graph_ops or tx.touch_all):
            return
        if revision != self.graph.revision + 1:
            # Another replica wrote since our last sync: rebuild from the store (includes this write).
            self.reload()
            return
        started = time.perf_counter()
        affected: set[str] = set()
        for op in tx.graph_ops:
            affected |= op(self.graph, revision)
        changed = self.graph.recompute(affected, revision)
        if tx.touch_all:
            self.graph.touch(set(self.graph.peers), revision)
        changed |= self.graph.take_touched()
        changed |= {pid for pid in self.hub.connected_ids() if pid not in self.graph.peers}  # removed: say goodbye
        self.metrics.observe_compute(len(affected), time.perf_counter() - started, full=False)
        self.hub.notify(changed)

    # ----- secrets rotation -------------------------------------------------------------------
    def reload_secrets(self, actor: str) -> dict[str, list[str]]:
        """Read the secrets again from their source (Vault) after a rotation. The TURN secret and the
        admin token take effect at once (every stream gets credentials minted with the new TURN
        secret), so does a new identity key (challenges of the old one are refused: agents fetch new
        ones); a new signing key needs a restart of coordinator and signal, so it is only reported."""
        from coordinator.secrets import SecretError, ensure_secrets

        if self.secret_source is None:
            raise Conflict("this coordinator was started without a secret source")
        try:
            values = ensure_secrets(self.secret_source)
        except SecretError as exc:
            raise Unavailable(f"cannot read the secrets: {exc}") from exc
        changed, restart = [], []
        if values["turn_secret"] != self.maps.turn_secret:
            changed.append("turn_secret")
        if hash_secret(values["admin_token"]) != self.admin_token_hash:
            changed.append("admin_token")
        if values["signing_key"] != self.signing_key:
            restart.append("signing_key")
        if values["identity_key"] != self.identity_key:
            changed.append("identity_key")

        def run(tx: Tx) -> None:
            detail = {"changed": changed, "restart_required": restart}
            tx.audit("secrets.reload", "secrets", getattr(self.secret_source, "name", "?"), "", None, detail)

        self.write(actor, run)
        self.maps.turn_secret = values["turn_secret"]
        self.admin_token_hash = hash_secret(values["admin_token"])
        if "identity_key" in changed:  # challenges issued under the old key stop working: agents fetch new ones
            self.identity = Identity(values["identity_key"], self.config.limits.challenge_ttl)
            self.identity_key = values["identity_key"]
        if "turn_secret" in changed:
            self.hub.notify_all()
        return {"changed": changed, "restart_required": restart}

    # ----- reads used by several services -----------------------------------------------------
    def relays_for(self, peer_name: str) -> tuple[RelayCredential, ...]:
        return self.maps.relays_for(peer_name)

    def render_full(self, peer_id: str) -> str:
        text = self.maps.full_json(peer_id)
        if text is None:
            raise KeyError(peer_id)
        return text
