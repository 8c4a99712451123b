"""Brute-force limits against a real coordinator process: failed authentications per source address.

Every test attacks from its own loopback address (127.0.0.N, bound as the client's source address), so the
tests share one coordinator without sharing buckets; the admin reads audit and metrics from 127.0.0.1,
which never fails here. Limits are low: 3 failures at once, then one per 2 s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.coordinator import CoordinatorProcess, running_coordinator

BURST = 3
PER_MINUTE = 30  # one token every 2 s


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    config = {"limits": {"auth_failures_burst": BURST, "auth_failures_per_minute": PER_MINUTE}}
    with running_coordinator(tmp_path_factory.mktemp("throttle"), config) as proc:
        yield proc


def from_address(coord: CoordinatorProcess, source: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=coord.url, headers=headers, timeout=10, transport=transport)


def metric(coord: CoordinatorProcess, series: str, kind: str) -> float:
    text = httpx.get(coord.url + "/metrics", timeout=10).text
    match = re.search(rf'^{series}\{{kind="{kind}"\}} (\S+)$', text, re.M)
    assert match, f"{series}{{kind={kind!r}}} missing from /metrics"
    return float(match.group(1))


def throttled_events(coord: CoordinatorProcess, source: str) -> list[dict[str, Any]]:
    with coord.client() as admin:  # 127.0.0.1
        r = admin.get("/api/v1/audit", params={"action": "auth.throttled", "target_id": source, "limit": 100})
        assert r.status_code == 200, r.text
        return list(r.json()["items"])


def wait_for_events(coord: CoordinatorProcess, source: str, count: int = 1) -> list[dict[str, Any]]:
    """The audit event is written off the request path: poll for it."""
    deadline = time.monotonic() + 10
    while len(events := throttled_events(coord, source)) < count:
        assert time.monotonic() < deadline, f"no auth.throttled audit event for {source}"
        time.sleep(0.1)
    return events


def assert_throttled(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    assert r.json() == {"error": "rate_limited", "message": r.json()["message"], "field": None}
    assert "too many failed authentications" in r.json()["message"]
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 60 // PER_MINUTE
    return retry_after


def test_bad_api_tokens_throttle_their_address_and_only_theirs(coord: CoordinatorProcess) -> None:
    attacker, bystander = "127.0.0.11", "127.0.0.12"
    failures = metric(coord, "starling_coordinator_auth_failures_total", "api_token")
    throttled = metric(coord, "starling_coordinator_auth_throttled_total", "api_token")
    with from_address(coord, attacker, "sat_wrong-guess") as bad:
        for _ in range(BURST):
            assert bad.get("/api/v1/peers").status_code == 401
        assert_throttled(bad.get("/api/v1/peers"))
    # Refused before the credential is looked at: the admin token from the same address is refused too.
    with from_address(coord, attacker, coord.admin_token) as valid_same:
        retry_after = assert_throttled(valid_same.get("/api/v1/peers"))
    # A valid client from another address never notices.
    with from_address(coord, bystander, coord.admin_token) as valid_other:
        for _ in range(5):
            assert valid_other.get("/api/v1/peers").status_code == 200
    assert metric(coord, "starling_coordinator_auth_failures_total", "api_token") == failures + BURST
    assert metric(coord, "starling_coordinator_auth_throttled_total", "api_token") == throttled + 2

    time.sleep(retry_after)  # the throttle expires after Retry-After
    with from_address(coord, attacker, coord.admin_token) as valid_same:
        assert valid_same.get("/api/v1/peers").status_code == 200
    # That success did not reset the address's count: one more wrong guess and it is throttled again.
    with from_address(coord, attacker, "sat_another-guess") as bad:
        assert bad.get("/api/v1/peers").status_code == 401
        assert_throttled(bad.get("/api/v1/peers"))

    events = wait_for_events(coord, attacker)
    time.sleep(0.5)  # a second event (there must be none) would be written by now
    events = throttled_events(coord, attacker)
    assert len(events) == 1, events  # one event for the whole episode, not one per failure
    event = events[0]
    assert event["actor"] == "system" and event["target_type"] == "address"
    assert event["after"]["source"] == attacker
    assert event["after"]["failures"] == BURST and event["after"]["kinds"] == {"api_token": BURST}
    assert throttled_events(coord, bystander) == []


def test_bad_peer_credentials_are_throttled_the_same_way(coord: CoordinatorProcess) -> None:
    attacker = "127.0.0.21"
    failures = metric(coord, "starling_coordinator_auth_failures_total", "peer_credential")
    with from_address(coord, attacker, "spc_wrong-guess") as bad:
        for _ in range(BURST):
            assert bad.get("/api/v1/peer/map").status_code == 401
        assert_throttled(bad.get("/api/v1/peer/map"))
        assert_throttled(bad.post("/api/v1/peer/signal-token"))
    with from_address(coord, attacker, coord.admin_token) as valid_same:  # one bucket per address, all kinds
        assert_throttled(valid_same.get("/api/v1/groups"))
    assert metric(coord, "starling_coordinator_auth_failures_total", "peer_credential") == failures + BURST
    assert metric(coord, "starling_coordinator_auth_throttled_total", "peer_credential") >= 2
    assert metric(coord, "starling_coordinator_auth_throttled_total", "api_token") >= 1
    (event,) = wait_for_events(coord, attacker)
    assert event["after"]["kinds"] == {"peer_credential": BURST}


def test_requests_without_credentials_are_neither_counted_nor_throttled(coord: CoordinatorProcess) -> None:
    with from_address(coord, "127.0.0.41") as anonymous:
        for _ in range(BURST * 3):
            assert anonymous.get("/api/v1/peers").status_code == 401
            assert anonymous.get("/api/v1/peer/map").status_code == 401
    with from_address(coord, "127.0.0.41", coord.admin_token) as valid:
        assert valid.get("/api/v1/peers").status_code == 200


def dashboard_login(client: httpx.Client, token: str) -> httpx.Response:
    page = client.get("/dashboard/login")
    assert page.status_code == 200
    nonce = page.cookies["starling_login"]
    return client.post("/dashboard/login", data={"token": token, "csrf": nonce, "next": "/dashboard/peers"})


def test_dashboard_login_failures_are_throttled(coord: CoordinatorProcess) -> None:
    attacker, bystander = "127.0.0.31", "127.0.0.32"
    failures = metric(coord, "starling_coordinator_auth_failures_total", "dashboard")
    with from_address(coord, attacker) as browser:
        for _ in range(BURST):
            r = dashboard_login(browser, "sat_wrong-guess")
            assert r.status_code == 401 and "not valid" in r.text
        r = dashboard_login(browser, coord.admin_token)  # even the right token: refused, not checked
        assert r.status_code == 429, r.text
        assert r.headers["content-type"].startswith("text/html")
        assert "Too many failed logins" in r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60 // PER_MINUTE
        assert "starling_session" not in r.cookies
    with from_address(coord, bystander) as browser:
        r = dashboard_login(browser, coord.admin_token)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/peers"
    assert metric(coord, "starling_coordinator_auth_failures_total", "dashboard") == failures + BURST
    assert metric(coord, "starling_coordinator_auth_throttled_total", "dashboard") >= 1
    (event,) = wait_for_events(coord, attacker)
    assert event["after"]["kinds"] == {"dashboard": BURST}


def test_limits_can_be_disabled(tmp_path: Path) -> None:
    config = {"limits": {"auth_failures_burst": 0}}
    with running_coordinator(tmp_path / "c", config) as proc, from_address(proc, "127.0.0.51", "sat_x") as bad:
        for _ in range(25):
            assert bad.get("/api/v1/peers").status_code == 401
        assert metric(proc, "starling_coordinator_auth_failures_total", "api_token") == 25
        assert throttled_events(proc, "127.0.0.51") == []
