"""The agent's one reconnect policy, shared by the map stream (agent/daemon.py) and the signal client
(agent/signal_client.py); documented once, in docs/agent.md ("Control plane outages").

Exponential backoff with full jitter: attempt k waits uniform(0, min(cap, base * 2**k)), base 0.2 s,
cap 4 s, reset after each successful connection. While a service is down the agent asks at least every
4 s, so it is back within ~4 s (plus one connection set-up) of the service's return.
"""

from __future__ import annotations

import random
from collections.abc import Callable

RECONNECT_BASE = 0.2  # s: the first retry waits up to this long
RECONNECT_CAP = 4.0  # s: no wait is longer (the control plane is picked up again within ~5 s of its return)
RESTART_CAP = 1.0  # s: the cap for a while after signal announced a restart (close 1012/1001)


class Backoff:
    """Exponential backoff with full jitter: attempt k waits uniform(0, min(cap, base * 2**k))."""

    def __init__(
        self,
        base: float = RECONNECT_BASE,
        cap: float = RECONNECT_CAP,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap (base {base}, cap {cap})")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng

    def limit(self, cap: float | None = None) -> float:
        """The longest the next wait can be (`cap` lowers the cap for this wait only)."""
        top = self.cap if cap is None else min(cap, self.cap)
        return min(top, self.base * 2.0**self.attempt)

    def next(self, cap: float | None = None) -> float:
        """The next wait in seconds."""
        limit = self.limit(cap)
        self.attempt = min(self.attempt + 1, 32)
        return self._rng() * limit

    def reset(self) -> None:
        """Connected: the next outage starts again from `base`."""
        self.attempt = 0

    def exhaust(self) -> None:
        """Jump to the cap (used after being replaced by another connection with our key)."""
        self.attempt = 32
