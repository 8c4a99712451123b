"""`starling-coordinator`: serve the API, run migrations, print the OpenAPI document or the admin token."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from coordinator import __version__, configfile
from coordinator.config import ConfigError, CoordinatorConfig, load_config

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


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
        print(f"starling-coordinator: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config)
    try:
        return _run(args.command, config)
    except Exception as exc:  # operator-facing: one clear line, no traceback
        from coordinator.secrets import SecretError
        from coordinator.store import StoreError

        if isinstance(exc, SecretError | StoreError):
            print(f"starling-coordinator: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        raise


def tls_problem(certfile: Path, keyfile: Path) -> str | None:
    """Why the certificate and key cannot serve HTTPS (None when they can): checked before the listener starts."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        return f"{exc.filename or certfile}: no such file"
    except PermissionError as exc:
        return f"{exc.filename or certfile}: permission denied"
    except (ssl.SSLError, OSError) as exc:
        return f"cannot use certfile {certfile} with keyfile {keyfile}: {exc}"
    return None


def _run(command: str, config: CoordinatorConfig) -> int:
    if command == "openapi":
        from coordinator.api.app import create_app

        print(json.dumps(create_app(config).openapi(), indent=2, sort_keys=True))
        return 0
    if command == "migrate":
        from coordinator.store import Store

        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        Store(config.database_url()).migrate()
        return 0
    if command == "show-admin-token":
        from coordinator.secrets import ensure_secrets, load_secret_source

        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        print(ensure_secrets(load_secret_source(config.secrets, config.state_dir))["admin_token"])
        return 0
    if config.tls is not None and (problem := tls_problem(config.tls.certfile, config.tls.keyfile)):
        print(f"starling-coordinator: tls: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    import uvicorn

    from coordinator.api.app import create_app

    uvicorn.run(
        create_app(config),
        host=config.listen.host,
        port=config.listen.port,
        log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=str(config.tls.certfile) if config.tls else None,
        ssl_keyfile=str(config.tls.keyfile) if config.tls else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
