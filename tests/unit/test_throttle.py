"""AuthThrottle's bucket logic with an injected clock: burst, refill, Retry-After, episodes, bounds."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from coordinator.errors import RateLimited
from coordinator.metrics import Metrics
from coordinator.throttle import AuthThrottle, ThrottleEvent, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    burst: int = 3, per_minute: float = 60, **kw: object
) -> tuple[AuthThrottle, Clock, list[ThrottleEvent], Metrics]:
    clock, events, metrics = Clock(), [], Metrics()
    throttle = AuthThrottle(
        burst=burst,
        per_minute=per_minute,
        metrics=metrics,
        on_throttled=events.append,
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )
    return throttle, clock, events, metrics


def retry_after(throttle: AuthThrottle, source: str, kind: str = "api_token") -> int | None:
    try:
        throttle.check(source, kind)
    except RateLimited as exc:
        assert exc.status == 429 and exc.code == "rate_limited"
        return exc.retry_after
    return None


def test_burst_then_throttled_then_refilled() -> None:
    t, clock, events, _ = make(burst=3, per_minute=60)  # one token per second
    for _ in range(2):
        assert retry_after(t, "198.18.0.1") is None
        t.failure("198.18.0.1", "api_token")
    assert retry_after(t, "198.18.0.1") is None
    t.failure("198.18.0.1", "api_token")  # third failure: bucket empty
    assert retry_after(t, "198.18.0.1") == 1
    assert retry_after(t, "198.18.0.1", "peer_credential") == 1  # every kind, same source
    assert retry_after(t, "198.18.0.2") is None  # another source is untouched
    clock.now += 0.5
    assert retry_after(t, "198.18.0.1") == 1  # ceil(0.5)
    clock.now += 0.5
    assert retry_after(t, "198.18.0.1") is None  # one token back: one more attempt
    t.failure("198.18.0.1", "api_token")
    assert retry_after(t, "198.18.0.1") == 1
    assert len(events) == 1  # still the same episode: no second audit event


def test_refused_attempts_do_not_count_and_successes_do_not_reset() -> None:
    t, clock, _, metrics = make(burst=2, per_minute=30)  # a token every 2 s
    t.failure("198.18.0.1", "dashboard")
    t.failure("198.18.0.1", "dashboard")
    for _ in range(50):  # hammering while throttled costs nothing more...
        assert retry_after(t, "198.18.0.1", "dashboard") == 2
    clock.now += 2
    assert retry_after(t, "198.18.0.1") is None  # ...so the wait does not grow
    # There is no success(): a valid login from this address changes nothing; the next failure throttles.
    t.failure("198.18.0.1", "dashboard")
    assert retry_after(t, "198.18.0.1") == 2
    text = generate_latest(metrics.registry).decode()
    assert 'starling_coordinator_auth_failures_total{kind="dashboard"} 3.0' in text
    assert 'starling_coordinator_auth_throttled_total{kind="dashboard"} 50.0' in text
    assert 'starling_coordinator_auth_throttled_total{kind="api_token"} 1.0' in text
    assert 'starling_coordinator_auth_failures_total{kind="setup_key"} 0.0' in text  # every kind listed


def test_one_audit_event_per_episode() -> None:
    t, clock, events, _ = make(burst=3, per_minute=60)
    t.failure("198.18.0.1", "api_token")
    t.failure("198.18.0.1", "peer_credential")
    assert events == []
    t.failure("198.18.0.1", "api_token")
    assert events == [ThrottleEvent("198.18.0.1", 3, {"api_token": 2, "peer_credential": 1}, 1)]
    for _ in range(5):  # slow guessing at the refill rate stays one episode
        clock.now += 1
        t.failure("198.18.0.1", "setup_key")
    assert len(events) == 1
    clock.now += 3  # bucket full again: the episode is over
    assert retry_after(t, "198.18.0.1") is None
    for _ in range(3):
        t.failure("198.18.0.1", "dashboard")
    assert len(events) == 2 and events[1].failures == 3 and events[1].kinds == {"dashboard": 3}


def test_racing_failures_cost_but_the_wait_is_bounded() -> None:
    t, _, _, _ = make(burst=2, per_minute=60)
    for _ in range(100):  # concurrent requests that all passed check() before the first failed
        t.failure("198.18.0.1", "api_token")
    assert retry_after(t, "198.18.0.1") == 3  # from -burst back to one token: (2 + 1) s


def test_bounded_memory_evicts_oldest_and_forgets_refilled() -> None:
    t, clock, _, _ = make(burst=2, per_minute=60, max_sources=3)
    for i in range(1, 5):
        t.failure(f"198.18.0.{i}", "api_token")
        t.failure(f"198.18.0.{i}", "api_token")
        clock.now += 0.01
    assert len(t) == 3
    assert retry_after(t, "198.18.0.1") is None  # evicted: the oldest last failure
    assert retry_after(t, "198.18.0.4") == 1
    clock.now += 10  # every bucket refilled
    t.failure("198.18.0.9", "api_token")
    assert len(t) == 1


def test_disabled() -> None:
    for burst, rate in ((0, 10), (10, 0)):
        t, _, events, metrics = make(burst=burst, per_minute=rate)
        for _ in range(100):
            t.failure("198.18.0.1", "api_token")
        assert retry_after(t, "198.18.0.1") is None and events == [] and len(t) == 0
        assert 'auth_failures_total{kind="api_token"} 100.0' in generate_latest(metrics.registry).decode()


def test_sources_and_kinds() -> None:
    assert source_key("198.18.0.1") == "198.18.0.1"
    assert source_key("::ffff:198.18.0.1") == "198.18.0.1"
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("") == "unknown" and source_key("testclient") == "testclient"
    t, _, _, _ = make(burst=1)
    t.failure("2001:db8:1:2::1", "api_token")
    assert retry_after(t, "2001:db8:1:2::ffff") == 1  # same /64
    assert retry_after(t, "2001:db8:1:3::1") is None
    with pytest.raises(ValueError, match="unknown authentication kind"):
        t.failure("198.18.0.1", "password")
    with pytest.raises(ValueError):
        t.check("198.18.0.1", "password")
