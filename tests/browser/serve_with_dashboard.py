"""Run a coordinator with the dashboard installed: `python -m tests.browser.serve_with_dashboard --config FILE`.

The same as `starling-coordinator serve` (config, logging, uvicorn options) plus
`coordinator.dashboard.install(app)`, so the browser tests do not depend on whether
`create_app` already installs the dashboard (install is idempotent). Optional
`--poll-interval` sets the live feed's poll period.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from coordinator.api.app import create_app
from coordinator.cli import setup_logging
from coordinator.config import ConfigError, load_config
from coordinator.dashboard import install


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve_with_dashboard")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--poll-interval", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"serve_with_dashboard: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    app = create_app(config)
    install(app, poll_interval=args.poll_interval)
    install(app)  # a second call (e.g. create_app already installing it) must be harmless
    uvicorn.run(
        app,
        host=config.listen.host,
        port=config.listen.port,
        log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
