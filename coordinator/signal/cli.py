"""`starling-signal`: run the signal service (`serve`) or validate its configuration (`check-config`).

Exit codes: 0 ok; 2 the configuration, its TLS or CA files, or the listening port cannot be used (one line on
stderr, found before the service starts: see coordinator.preflight); 1 a genuine bug (with its traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from coordinator import configfile
from coordinator.preflight import PreflightError, check_signal, one_line
from coordinator.signal import __version__
from coordinator.signal.config import ConfigError, SignalConfig, load_config

EXIT_CONFIG = 2


class _DenialNoise(logging.Filter):
    """Drops the ERROR uvicorn's websockets-sansio protocol logs after every handshake refused with a
    denial response (it never marks that handshake complete: Kludex/uvicorn PR #3138). Every path of
    the signal app accepts, denies or closes, so the message carries no information here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def setup_logging(config: SignalConfig) -> None:
    root = configfile.setup_logging(config.log.level, config.log.format)
    logging.getLogger("uvicorn.error").addFilter(_DenialNoise())
    for noisy in ("httpx", "httpcore", "websockets"):  # their debug output is not ours to show
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="starling-signal", description="Starling signal service (WebSocket broker)")
    p.add_argument("--config", type=Path, default=os.environ.get("STARLING_SIGNAL_CONFIG"), help="YAML config file")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the signal service")
    sub.add_parser("check-config", help="validate the configuration and print it (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config)
        sock = check_signal(config, listen=args.command == "serve")
    except (ConfigError, PreflightError) as exc:
        print(f"starling-signal: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    if sock is None:  # check-config
        print(config.model_dump_json(indent=2))
        return 0
    with sock:  # uvicorn closes it on shutdown too
        setup_logging(config)
        _serve(config, sock)
    return 0


def _serve(config: SignalConfig, sock: socket.socket) -> None:
    import uvicorn

    from coordinator.signal.app import create_app

    limits = config.limits
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.listen.host,
            port=config.listen.port,
            log_config=None,
            proxy_headers=False,
            server_header=False,
            # Frames up to twice the limit reach the app, which closes with 1009 and a clear reason;
            # anything bigger is cut off by the WebSocket layer itself (also 1009).
            ws_max_size=2 * limits.max_frame_bytes + 4096,
            ws_per_message_deflate=False,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            timeout_graceful_shutdown=5,
            ssl_certfile=str(config.tls.certfile) if config.tls else None,
            ssl_keyfile=str(config.tls.keyfile) if config.tls else None,
        )
    )
    host, port = sock.getsockname()[:2]
    logging.getLogger("coordinator.signal.cli").info(
        "serving on %s://%s:%d", "wss" if config.tls else "ws", f"[{host}]" if ":" in host else host, port
    )
    server.run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
