"""Per-peer rate limiting: a token bucket, plus the window counter that spots persistent abuse."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, at most `burst` banked; each frame takes one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst


class AbuseCounter:
    """Counts rate-limited frames in fixed windows; `hit()` is True once `limit` is exceeded in one window."""

    def __init__(self, limit: int, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._start = clock()
        self._count = 0

    def hit(self) -> bool:
        now = self._clock()
        if now - self._start >= self.window:
            self._start, self._count = now, 0
        self._count += 1
        return self._count > self.limit
