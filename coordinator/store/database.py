"""The Store: one SQLAlchemy engine (SQLite in WAL mode, or PostgreSQL), transactions and migrations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class StoreError(Exception):
    """Raised for store problems that an operator must fix (bad DSN, unmigrated schema)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def normalize_dsn(dsn: str) -> str:
    """Accept `postgresql://` DSNs and point them at psycopg 3; leave other URLs alone."""
    if dsn.startswith("postgresql://") or dsn.startswith("postgres://"):
        return "postgresql+psycopg://" + dsn.split("://", 1)[1]
    return dsn


class Store:
    """Owns the database engine; every unit of work runs in `transaction()` and commits or rolls back whole."""

    def __init__(self, dsn: str, *, echo: bool = False) -> None:
        self.dsn = normalize_dsn(dsn)
        self.is_sqlite = self.dsn.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            if ":memory:" in self.dsn or self.dsn.rstrip("/") == "sqlite:":
                raise StoreError("in-memory SQLite is not supported: give a file path (sqlite:////path/db.sqlite)")
            db_path = self.dsn.split("sqlite:///", 1)[-1]
            if db_path:
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        try:
            self.engine: Engine = create_engine(self.dsn, **kwargs)
        except Exception as exc:  # bad URL, missing driver
            raise StoreError(f"cannot open store {self.safe_dsn}: {exc}") from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=True)

    @property
    def safe_dsn(self) -> str:
        """The DSN with any password masked, for logs and errors."""
        url = self.dsn
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: commits when the block ends normally, rolls back on any exception."""
        session = self._sessions()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    @contextmanager
    def read(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
        finally:
            session.rollback()
            session.close()

    def alembic_config(self) -> AlembicConfig:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["engine"] = self.engine
        return cfg

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent); StoreError when the database refuses it."""
        try:
            with self.engine.begin() as conn:
                cfg = self.alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (OperationalError, CommandError) as exc:  # unreachable, locked, full, or newer than this version
            why = " ".join(str(getattr(exc, "orig", None) or exc).split())  # the driver's words, one line
            raise StoreError(f"cannot migrate {self.safe_dsn}: {why}") from exc
        log.info("store migrated", extra={"dsn": self.safe_dsn})

    def has_schema(self) -> bool:
        return inspect(self.engine).has_table("mesh_settings")

    def dispose(self) -> None:
        self.engine.dispose()


def is_unique_violation(exc: IntegrityError) -> bool:
    text = str(exc.orig).lower()
    return "unique" in text or "duplicate key" in text
