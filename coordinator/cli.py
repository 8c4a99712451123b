"""`starling-coordinator`: serve the API, run migrations, print the OpenAPI document or the admin token.

Exit codes: 0 ok; 2 the configuration, TLS files, listening port, state directory, database or secret source
cannot be used: one line on stderr, found before anything is written (see coordinator.preflight). A genuine
bug still raises, with its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from coordinator import __version__, configfile
from coordinator.config import ConfigError, CoordinatorConfig, load_config
from coordinator.preflight import PreflightError, check_coordinator, one_line
from coordinator.preflight import tls_problem as tls_problem  # re-exported: it used to live here

EXIT_CONFIG = 2
log = logging.getLogger("coordinator.cli")


def setup_logging(config: CoordinatorConfig) -> None:
    configfile.setup_logging(config.log.level, config.log.format)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="starling-coordinator", description="Starling mesh coordinator")
    p.add_argument("--config", type=Path, default=os.environ.get("STARLING_CONFIG"), help="YAML config file")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the API server")
    sub.add_parser("migrate", help="create or upgrade the database schema")
    sub.add_parser("openapi", help="print the OpenAPI document (JSON)")
    sub.add_parser("show-admin-token", help="print the bootstrap admin token (create it if missing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(config)
    try:
        return _run(args.command, config)
    except PreflightError as exc:
        return fail(str(exc))
    except Exception as exc:  # operator-facing: one clear line, no traceback
        from coordinator.secrets import SecretError
        from coordinator.store import StoreError

        if isinstance(exc, SecretError | StoreError):
            return fail(str(exc))
        raise


def fail(message: str) -> int:
    print(f"starling-coordinator: {one_line(message)}", file=sys.stderr)
    return EXIT_CONFIG


def _run(command: str, config: CoordinatorConfig) -> int:
    if command == "openapi":
        from coordinator.api.app import create_app

        print(json.dumps(create_app(config).openapi(), indent=2, sort_keys=True))
        return 0
    if command == "migrate":
        check_coordinator(config, "migrate")
        from coordinator.store import Store

        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        Store(config.database_url()).migrate()
        return 0
    if command == "show-admin-token":
        check_coordinator(config, "show-admin-token")
        from coordinator.secrets import ensure_secrets, load_secret_source

        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        print(ensure_secrets(load_secret_source(config.secrets, config.state_dir))["admin_token"])
        return 0
    sock = check_coordinator(config, "serve")
    assert sock is not None
    with sock:  # uvicorn closes it on shutdown too; closing twice is harmless
        return _serve(config, sock)


def _serve(config: CoordinatorConfig, sock: socket.socket) -> int:
    """Secrets, store and migrations (the preflight passed), then uvicorn on the listener the preflight bound."""
    import uvicorn

    from coordinator.api.app import build_coordinator, create_app

    coord = build_coordinator(config)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, coord),
            host=config.listen.host,
            port=config.listen.port,
            log_config=None,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=str(config.tls.certfile) if config.tls else None,
            ssl_keyfile=str(config.tls.keyfile) if config.tls else None,
        )
    )
    host, port = sock.getsockname()[:2]
    log.info("serving on %s://%s:%d", "https" if config.tls else "http", f"[{host}]" if ":" in host else host, port)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
