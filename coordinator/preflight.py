"""Start-up checks ("preflight") of `starling-coordinator` and `starling-signal`.

Everything an operator must fix is found before the process writes anything: no state directory, secret
file or database file is created and no migration runs until every check has passed. The checks run in
this order and stop at the first problem:

1. TLS files (certificate and key load together; signal: also `coordinator_ca`),
2. the listening socket: bound (and listening) now and handed to uvicorn later, so a port in use is found
   first and no other process can take the port in between,
3. the state directory: it is a writable directory, or its nearest existing ancestor is one (read only:
   `os.access`, nothing is created),
4. the database: a SQLite file that exists must be a readable and writable SQLite file in a writable
   directory, a missing one must be creatable; PostgreSQL must accept a connection (short timeout),
5. the secret source: every secret is read (Vault reachable, token or AppRole accepted, entries readable)
   and validated; missing ones are generated in memory only, to check that they could be stored.

A problem raises :class:`PreflightError`, whose message is one line naming it; the CLIs print it and exit 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig
    from coordinator.secrets import SecretSource
    from coordinator.signal.config import SignalConfig

CoordinatorCommand = Literal["serve", "migrate", "show-admin-token"]

POSTGRES_CONNECT_TIMEOUT = 5  # seconds; libpq's minimum is 2
_SQLITE_MAGIC = b"SQLite format 3\x00"


class PreflightError(Exception):
    """A start-up problem an operator must fix; the message is one line."""


def one_line(text: str) -> str:
    """`text` with its lines joined by spaces (library messages such as libpq's span several lines)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


# ----- files named by the configuration -----------------------------------------------------------------


def tls_problem(certfile: Path, keyfile: Path) -> str | None:
    """Why the certificate and key cannot serve HTTPS (None when they can)."""
    import ssl

    for file in (certfile, keyfile):  # OpenSSL's own error does not say which of the two is missing
        try:
            with open(file, "rb"):
                pass
        except FileNotFoundError:
            return f"{file}: no such file"
        except OSError as exc:
            return f"{file}: {_reason(exc)}"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        return f"{exc.filename or certfile}: no such file"
    except PermissionError as exc:
        return f"{exc.filename or certfile}: permission denied"
    except (ssl.SSLError, OSError) as exc:
        return f"cannot use certfile {certfile} with keyfile {keyfile}: {one_line(str(exc))}"
    return None


def check_tls(certfile: Path, keyfile: Path) -> None:
    if problem := tls_problem(certfile, keyfile):
        raise PreflightError(f"tls: {problem}")


def check_ca_bundle(path: Path, option: str) -> None:
    """`path` is a readable PEM CA bundle (as `ssl.create_default_context(cafile=...)` needs it)."""
    import ssl

    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise PreflightError(f"{option} {path}: no such file") from None
    except PermissionError:
        raise PreflightError(f"{option} {path}: permission denied") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise PreflightError(f"{option} {path}: not a readable PEM CA bundle ({one_line(str(exc))})") from None


# ----- the listening socket -----------------------------------------------------------------------------


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` and listening, for `uvicorn.Server.run(sockets=[...])`.

    Like uvicorn's own listener: IPv6 when `host` contains a colon, SO_REUSEADDR (a restart does not wait for
    TIME_WAIT; a port another process listens on is still refused). Connections that arrive before the server
    runs wait in the backlog instead of being refused.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PreflightError(f"listen {where}: {_reason(exc)}") from None
    return sock


# ----- directories and the database ---------------------------------------------------------------------


def check_writable_dir(path: Path, what: str) -> None:
    """`path` is a writable directory, or could be created (its nearest existing ancestor is a writable
    directory). Only reads: nothing is created, not even a probe file."""
    path = Path(os.path.abspath(path))
    if problem := _dir_problem(path):
        raise PreflightError(f"{what} {path}: {problem}")


def _dir_problem(path: Path) -> str | None:
    """Why `path` (absolute) cannot be used or created as a writable directory; None when it can."""
    current = path
    while True:
        try:
            st = current.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            if current.is_symlink():
                return f"{current} is a dangling symbolic link"
            current = current.parent
        except OSError as exc:
            return f"cannot examine {current}: {_reason(exc)}"
    if current == path:
        if not stat.S_ISDIR(st.st_mode):
            return "not a directory"
        return None if _access(path, os.R_OK | os.W_OK | os.X_OK) else "directory not writable"
    if not stat.S_ISDIR(st.st_mode):
        return f"cannot be created: {current} is not a directory"
    return None if _access(current, os.W_OK | os.X_OK) else f"cannot be created: {current} is not writable"


def _access(path: Path, mode: int) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def check_database(url: str, connect_timeout: int = POSTGRES_CONNECT_TIMEOUT) -> None:
    """The database URL names SQLite or PostgreSQL, and the database can be opened (SQLite: without creating
    the file; PostgreSQL: one connection with a short timeout). Nothing is written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from coordinator.store.database import normalize_dsn

    try:
        parsed = make_url(normalize_dsn(url))
    except (ArgumentError, ValueError):
        raise PreflightError(
            "database.url is not a database URL (expected sqlite:////PATH or postgresql://USER@HOST/DB)"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _check_sqlite(parsed.database)
    elif backend == "postgresql":
        _check_postgres(parsed, connect_timeout)
    else:
        raise PreflightError(
            f"database.url: unsupported database {parsed.drivername!r} (use sqlite:////PATH or postgresql://...)"
        )


def _check_sqlite(database: str | None) -> None:
    if not database or database == ":memory:" or "mode=memory" in database:
        raise PreflightError("database.url: in-memory SQLite is not supported: give a file path (sqlite:////path/db)")
    path = Path(os.path.abspath(database))
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if problem := _dir_problem(path.parent):
            raise PreflightError(f"database {path}: directory {path.parent}: {problem}") from None
        return
    except OSError as exc:
        raise PreflightError(f"database {path}: {_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PreflightError(f"database {path}: not a regular file")
    if not _access(path, os.R_OK | os.W_OK):
        raise PreflightError(f"database {path}: not readable and writable")
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise PreflightError(f"database {path}: cannot read: {_reason(exc)}") from None
    if head and head != _SQLITE_MAGIC:
        raise PreflightError(f"database {path}: not a SQLite database")
    if problem := _dir_problem(path.parent):  # the -wal and -shm files are created next to it
        raise PreflightError(f"database {path}: directory {path.parent}: {problem}")


def _check_postgres(parsed: Any, connect_timeout: int) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import DBAPIError

    where = parsed.render_as_string(hide_password=True)
    try:
        engine = create_engine(parsed, connect_args={"connect_timeout": connect_timeout})
    except Exception as exc:  # a missing driver (the `postgres` extra) or a bad option
        raise PreflightError(f"database {where}: cannot load the driver: {one_line(str(exc))}") from None
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        raise PreflightError(f"database {where}: {one_line(str(exc.orig))}") from None
    finally:
        engine.dispose()


# ----- secrets -----------------------------------------------------------------------------------------


class _DryRun:
    """A secret source that reads through to the real one and keeps generated values in memory only."""

    def __init__(self, source: SecretSource) -> None:
        self.name = source.name
        self._source = source
        self.missing: list[str] = []

    def get(self, key: str) -> str | None:
        return self._source.get(key)

    def create(self, key: str, value: str) -> str:
        self.missing.append(key)
        return value


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """The real start-up reads the secrets again and logs what it finds: say it once."""
    before, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = before


def check_secrets(secrets_cfg: Mapping[str, Any], state_dir: Path) -> None:
    """Every secret can be read and is valid, and missing ones could be stored; nothing is written."""
    from coordinator.secrets import SecretError, StaticSecrets, ensure_secrets, load_secret_source

    try:
        source = load_secret_source(secrets_cfg, state_dir)
        dry = _DryRun(source)
        with _quiet(logging.getLogger("coordinator.secrets")):
            ensure_secrets(dry)
    except SecretError as exc:
        raise PreflightError(one_line(str(exc))) from None
    if dry.missing and isinstance(source, StaticSecrets):
        check_writable_dir(state_dir / "secrets", "secrets directory")


# ----- per process ---------------------------------------------------------------------------------------


def check_coordinator(config: CoordinatorConfig, command: CoordinatorCommand) -> socket.socket | None:
    """Run the coordinator's checks for `command`, in order; for `serve`, return the bound listener."""
    if command == "serve" and config.tls is not None:
        check_tls(config.tls.certfile, config.tls.keyfile)
    sock = bind_listener(config.listen.host, config.listen.port) if command == "serve" else None
    try:
        check_writable_dir(config.state_dir, "state_dir")
        if command != "show-admin-token":
            check_database(config.database_url())
        if command != "migrate":
            check_secrets(config.secrets, config.state_dir)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock


def check_signal(config: SignalConfig, *, listen: bool) -> socket.socket | None:
    """Run signal's checks (its files, then the listener when `listen`); return the bound listener."""
    if config.tls is not None:
        check_tls(config.tls.certfile, config.tls.keyfile)
    if config.coordinator_ca is not None:
        check_ca_bundle(config.coordinator_ca, "coordinator_ca")
    return bind_listener(config.listen.host, config.listen.port) if listen else None
