"""The store suite: the same service-level scenarios on SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import text

from coordinator.config import CoordinatorConfig
from coordinator.errors import Conflict, Forbidden, UnknownReference
from coordinator.schemas import EnrollResponse, GroupIn, PeerUpdate, PolicyIn, SealedRequest, SetupKeyIn
from coordinator.secrets import StaticSecrets, ensure_secrets
from coordinator.service.core import Coordinator
from coordinator.store import Store, StoreError
from coordinator.store.models import Base
from starling_proto.seal import seal


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    pg = request.getfixturevalue("pg_dsn")
    store = Store(pg)
    with store.engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    store.dispose()
    yield pg


def make(dsn: str, tmp_path: Path, name: str = "a") -> Coordinator:
    config = CoordinatorConfig.model_validate({"state_dir": str(tmp_path / name), "database": {"url": dsn}})
    store = Store(dsn)
    store.migrate()
    coord = Coordinator(config, store, ensure_secrets(StaticSecrets({})))
    coord.ensure_settings()
    coord.reload()
    return coord


def seed(coord: Coordinator) -> dict[str, str]:
    for g in ("dev", "db", "ci"):
        coord.groups.create("admin", GroupIn(name=g))
    coord.policies.create(
        "admin",
        PolicyIn.model_validate(
            {
                "name": "dev-db",
                "protocol": "tcp",
                "ports": [5432],
                "sources": {"groups": ["dev"]},
                "destinations": {"groups": ["db"]},
            }
        ),
    )
    ids = {}
    for role in ("dev", "db", "ci"):
        key = coord.credentials.create_key("admin", SetupKeyIn(name=f"k-{role}", auto_groups=[role]))
        out = enroll(coord, {"setup_key": key.key, "hostname": role})
        ids[role] = out.peer.id
    return ids


def enroll(coord: Coordinator, payload: dict[str, object]) -> EnrollResponse:
    """A sealed enrollment through the service, as the API route does it (a fresh key each time)."""
    token, _ = coord.identity.issue()
    wire, reply = seal("enroll", [X25519PrivateKey.generate()], coord.identity.public_key_b64, token, payload)
    sealed = coord.peers.enroll(SealedRequest.model_validate(wire), "127.0.0.1")
    return EnrollResponse.model_validate(reply.open(sealed.model_dump()))


def maps_by_name(coord: Coordinator) -> dict[str, object]:
    out = {}
    for pid, node in coord.graph.peers.items():
        doc = json.loads(coord.render_full(pid))
        out[node.name] = (
            sorted(p["name"] for p in doc["peers"]),
            doc["firewall"]["rules"],
            {k: sorted(v) for k, v in doc["firewall"]["sets"].items()},
        )
    return out


def test_migrations_are_idempotent(dsn: str, tmp_path: Path) -> None:
    store = Store(dsn)
    store.migrate()
    store.migrate()
    assert store.has_schema()
    store.dispose()


def test_lifecycle_and_reload_give_identical_maps(dsn: str, tmp_path: Path) -> None:
    coord = make(dsn, tmp_path)
    ids = seed(coord)
    coord.peers.update("admin", ids["ci"], PeerUpdate(groups=["ci", "dev"]))
    incremental = maps_by_name(coord)
    assert incremental["db"][0] == ["ci", "dev"]
    assert incremental["ci"][0] == ["db"]
    coord.reload()
    assert maps_by_name(coord) == incremental
    peer = coord.peers.get(ids["dev"])
    assert peer.created_at.tzinfo is not None and peer.created_at.utcoffset() == dt.timedelta(0)
    coord.store.dispose()


def test_failed_write_changes_nothing(dsn: str, tmp_path: Path) -> None:
    coord = make(dsn, tmp_path)
    seed(coord)
    revision = coord.settings.get().revision
    audit = len(
        coord.settings.audit(
            action=None, actor=None, target_type=None, target_id=None, since=None, until=None, cursor=None, limit=1000
        ).items
    )
    with pytest.raises(UnknownReference):  # the group row is inserted, then the member lookup fails
        coord.groups.create("admin", GroupIn(name="half", peers=["dev", "ghost"]))
    assert coord.groups.find(name="half", cursor=None, limit=10).items == []
    assert coord.settings.get().revision == revision
    assert (
        len(
            coord.settings.audit(
                action=None,
                actor=None,
                target_type=None,
                target_id=None,
                since=None,
                until=None,
                cursor=None,
                limit=1000,
            ).items
        )
        == audit
    )
    with pytest.raises(Forbidden):
        enroll(coord, {"setup_key": "ssk_nope-nope", "hostname": "x"})
    assert len(coord.graph.peers) == 3
    coord.store.dispose()


def test_two_replicas_share_one_store(dsn: str, tmp_path: Path) -> None:
    """Two coordinators on one database: a write on either is seen by the other after sync, and a
    write on a stale replica rebuilds its graph instead of applying on top of old state."""
    a = make(dsn, tmp_path, "a")
    ids = seed(a)
    b = make(dsn, tmp_path, "b")
    assert maps_by_name(b) == maps_by_name(a)
    a.peers.update("admin", ids["ci"], PeerUpdate(groups=["db"]))
    assert b.sync_from_store() is True
    assert maps_by_name(b) == maps_by_name(a)
    assert b.sync_from_store() is False
    a.groups.create("admin", GroupIn(name="only-a"))
    b.peers.update("admin", ids["dev"], PeerUpdate(groups=["dev", "ci"]))  # b is one revision behind
    a.sync_from_store()
    assert maps_by_name(b) == maps_by_name(a)
    with pytest.raises(Conflict):
        b.groups.create("admin", GroupIn(name="only-a"))
    a.store.dispose()
    b.store.dispose()


def test_bad_dsn_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="in-memory"):
        Store("sqlite:///:memory:")
    with pytest.raises(StoreError, match="cannot open store"):
        Store("nosuchdriver://x/y")
    assert Store("postgresql://u:secretpw@127.0.0.1:1/db").safe_dsn == "postgresql+psycopg://u:***@127.0.0.1:1/db"
