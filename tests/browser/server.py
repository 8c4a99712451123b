"""A real coordinator process (its dashboard is part of the app) on a loopback port, for browser tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fixtures.coordinator import CoordinatorProcess


class DashboardCoordinator(CoordinatorProcess):
    """The coordinator fixture, named for what the browser tests use it for."""


@contextlib.contextmanager
def running_dashboard(
    workdir: Path, config: dict[str, Any] | None = None, poll_interval: float = 1.0
) -> Iterator[DashboardCoordinator]:
    """Start `starling-coordinator serve` with the dashboard's live feed polling every `poll_interval` s."""
    config = {"dashboard": {"poll_interval": poll_interval}, **(config or {})}
    proc = DashboardCoordinator(workdir=workdir, config=config)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
