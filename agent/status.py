"""One upstream service's connection status as `starling status` shows it (management, signal)."""

from __future__ import annotations

import time
from typing import Any


class ServiceStatus:
    """Connected or not, since when, and the last error."""

    def __init__(self) -> None:
        self.connected = False
        self.last_error: str | None = None
        self.since = time.time()

    def set(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            self.since = time.time()
        self.connected, self.last_error = connected, error

    def as_dict(self) -> dict[str, Any]:
        return {"connected": self.connected, "last_error": self.last_error, "since": self.since}
