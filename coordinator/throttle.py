"""Brute-force limiting of failed authentications, per source address.

`AuthThrottle` owns the per-address failure buckets and nothing else: callers (the API dependencies, the
dashboard login, enrollment) call `check()` BEFORE they look at a credential and `failure()` when it was
wrong. Policy (`limits.auth_failures_burst`, `limits.auth_failures_per_minute`; 0 disables):

- a token bucket of failures per source: `burst` failures at once, then one more per `60 / per_minute` s;
  while the bucket holds less than one token, `check()` raises `RateLimited` (HTTP 429, `Retry-After`)
  for EVERY authentication attempt from that source, valid credentials included, before the credential
  is looked at (otherwise guessing would go on). Refused attempts do not count as failures;
- only failures count: a valid client is never slowed, and successes never reset a source's bucket
  (an attacker holding one valid token could otherwise keep guessing other credentials);
- the source is the TCP peer address; IPv6 sources count per /64 (one host usually holds a whole /64),
  IPv4-mapped IPv6 addresses as their IPv4 address;
- bounded memory: at most `limits.auth_failures_max_sources` sources are tracked (the one whose last
  failure is oldest is evicted first), and a source whose bucket has refilled is forgotten;
- per process: replicas do not share their buckets.

Metrics: `starling_coordinator_auth_failures_total{kind}`, `starling_coordinator_auth_throttled_total{kind}`.
Audit: one `auth.throttled` event when a source becomes throttled (failure count and kinds of this episode),
written on a background thread; the next event for that source comes only after its bucket refilled.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from coordinator.errors import RateLimited, Unauthorized

if TYPE_CHECKING:
    from coordinator.metrics import Metrics
    from coordinator.service.context import ServiceContext
    from coordinator.service.tx import Tx

log = logging.getLogger(__name__)

KINDS: Final = ("api_token", "peer_credential", "setup_key", "dashboard", "peer_proof")
AUDIT_ACTION: Final = "auth.throttled"
AUDIT_QUEUE: Final = 256


def source_key(source: str) -> str:
    """The bucket key of a client address: IPv4 as is, IPv6 as its /64, anything else verbatim (capped)."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return source[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True, slots=True)
class ThrottleEvent:
    """A source that just became throttled: what the `auth.throttled` audit event records."""

    source: str
    failures: int
    kinds: dict[str, int]
    retry_after: int


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float  # time of the last refill
    failures: int = 0  # failures since the bucket was last full (this episode)
    kinds: dict[str, int] = field(default_factory=dict)
    reported: bool = False  # the audit event of this episode was emitted


class AuthThrottle:
    """Failure buckets per source address; thread-safe (sync dependencies run on worker threads)."""

    def __init__(
        self,
        *,
        burst: int,
        per_minute: float,
        max_sources: int = 10_000,
        metrics: Metrics | None = None,
        on_throttled: Callable[[ThrottleEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = max(0, int(burst))
        self.rate = max(0.0, float(per_minute)) / 60.0  # tokens per second
        self.enabled = self.burst > 0 and self.rate > 0
        self.max_sources = max(1, max_sources)
        self._metrics = metrics
        self._on_throttled = on_throttled
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # oldest last failure first
        if metrics is not None:
            for kind in KINDS:  # every series visible (at 0) from the start
                metrics.auth_failures.labels(kind)
                metrics.auth_throttled.labels(kind)

    @classmethod
    def for_coordinator(cls, coord: ServiceContext) -> AuthThrottle:
        """The throttle of a coordinator: its `limits:` config, its metrics, audit events through `write()`."""
        limits = coord.config.limits
        return cls(
            burst=limits.auth_failures_burst,
            per_minute=limits.auth_failures_per_minute,
            max_sources=limits.auth_failures_max_sources,
            metrics=coord.metrics,
            on_throttled=AuditWriter(coord).submit,
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, source: str, kind: str) -> None:
        """Raise RateLimited (with `retry_after` seconds) while `source` may not try to authenticate."""
        _known(kind)
        if not self.enabled:
            return
        key = source_key(source)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return
            self._refill(bucket, self._clock())
            if bucket.tokens >= 1.0:
                return
            wait = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
        if self._metrics is not None:
            self._metrics.auth_throttled.labels(kind).inc()
        raise RateLimited(f"too many failed authentications from this address: try again in {wait} s", retry_after=wait)

    @contextlib.contextmanager
    def attempt(self, source: str, kind: str) -> Iterator[None]:
        """`check()` now, and `failure()` if the authentication inside raises Unauthorized."""
        self.check(source, kind)
        try:
            yield
        except Unauthorized:
            self.failure(source, kind)
            raise

    def failure(self, source: str, kind: str) -> None:
        """Record one failed authentication of `source`."""
        _known(kind)
        if self._metrics is not None:
            self._metrics.auth_failures.labels(kind).inc()
        if not self.enabled:
            return
        key = source_key(source)
        event: ThrottleEvent | None = None
        with self._lock:
            now = self._clock()
            self._forget_refilled(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), stamp=now)
                while len(self._buckets) > self.max_sources:
                    self._buckets.popitem(last=False)
            else:
                self._refill(bucket, now)
                self._buckets.move_to_end(key)
            # Failures that raced past check() (concurrent requests) still cost; bounded so a source
            # never waits longer than 2 * burst / rate.
            bucket.tokens = max(bucket.tokens - 1.0, -float(self.burst))
            bucket.failures += 1
            bucket.kinds[kind] = bucket.kinds.get(kind, 0) + 1
            if bucket.tokens < 1.0 and not bucket.reported:
                bucket.reported = True
                wait = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
                event = ThrottleEvent(key, bucket.failures, dict(sorted(bucket.kinds.items())), wait)
        if event is not None:
            log.warning(
                "authentication throttled: source=%s failures=%d kinds=%s retry_after=%ds",
                event.source,
                event.failures,
                ",".join(event.kinds),
                event.retry_after,
            )
            if self._on_throttled is not None:
                self._on_throttled(event)

    # ----- internals (lock held) ------------------------------------------------------------------
    def _refill(self, bucket: _Bucket, now: float) -> None:
        bucket.tokens = min(float(self.burst), bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= self.burst:  # quiet long enough: a new episode starts with the next failure
            bucket.failures, bucket.kinds, bucket.reported = 0, {}, False

    def _forget_refilled(self, now: float) -> None:
        """Drop full buckets from the old end (amortised O(1): each bucket is dropped once)."""
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if bucket.tokens + max(0.0, now - bucket.stamp) * self.rate < self.burst:
                return
            del self._buckets[key]


def _known(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown authentication kind {kind!r} (one of {', '.join(KINDS)})")


class AuditWriter:
    """Writes `auth.throttled` audit events on one background thread: no request waits for the store.

    The queue is bounded; when it is full (a store outage during a distributed attack) events are dropped
    with a log line; the warning that `AuthThrottle.failure` logs is written either way.
    """

    def __init__(self, coord: ServiceContext, maxsize: int = AUDIT_QUEUE) -> None:
        self._coord = coord
        self._queue: queue.Queue[ThrottleEvent] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, event: ThrottleEvent) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="auth-throttle-audit", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.error("audit queue full: auth.throttled for %s not recorded", event.source)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                self._coord.write("system", partial(_audit, event=event))
            except Exception:  # keep the writer alive; the event is in the log already
                log.exception("cannot record auth.throttled for %s", event.source)


def _audit(tx: Tx, event: ThrottleEvent) -> None:
    after: dict[str, Any] = {
        "source": event.source,
        "failures": event.failures,
        "kinds": event.kinds,
        "retry_after": event.retry_after,
    }
    tx.audit(AUDIT_ACTION, "address", event.source, "", None, after)
