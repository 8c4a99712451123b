"""A real coordinator process with the dashboard (tests.browser.serve_with_dashboard) on a loopback port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.openbao import _die_with_parent, free_port

REPO = Path(__file__).resolve().parents[2]


class DashboardCoordinator(CoordinatorProcess):
    """CoordinatorProcess whose server is started by the dashboard launcher (stopped by its PID)."""

    poll_interval: float = 1.0
    launcher: str = "tests.browser.serve_with_dashboard"  # module run with `python -m`

    def start(self, timeout: float = 30.0) -> None:
        if not self.port:
            self.port = free_port()
        self.config.setdefault("listen", {}).update({"host": self.host, "port": self.port})
        self.config.setdefault("state_dir", str(self.workdir / "state"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {
            **os.environ,
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        log = open(self.workdir / "coordinator.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.launcher,
                "--config",
                str(self.config_path),
                "--poll-interval",
                str(self.poll_interval),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"coordinator did not become healthy:\n{self.log_tail()}")
        if not self.admin_token:
            self.admin_token = self.cli("show-admin-token").stdout.strip()


@contextlib.contextmanager
def running_dashboard(
    workdir: Path, config: dict[str, Any] | None = None, poll_interval: float = 1.0
) -> Iterator[DashboardCoordinator]:
    proc = DashboardCoordinator(workdir=workdir, config=dict(config or {}))
    proc.poll_interval = poll_interval
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
