"""The dashboard's options come from the coordinator config (`dashboard:`): checked on real coordinator
processes through the login flow, plus the config model itself (defaults, the old key, errors)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.config import ConfigError, CoordinatorConfig, load_config
from tests.fixtures.coordinator import CoordinatorProcess, running_coordinator


def login(coord: CoordinatorProcess) -> tuple[httpx.Response, httpx.Response]:
    """GET the login page, then POST the admin token: (page response, login response)."""
    page = httpx.get(coord.url + "/dashboard/login", timeout=10)
    assert page.status_code == 200, page.text
    nonce = page.cookies.get("starling_login") or re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert nonce
    nonce = nonce if isinstance(nonce, str) else nonce.group(1)
    done = httpx.post(
        coord.url + "/dashboard/login",
        data={"csrf": nonce, "token": coord.admin_token, "next": "/dashboard/peers"},
        headers={"Cookie": f"starling_login={nonce}"},
        timeout=10,
    )
    assert done.status_code == 303, done.text
    return page, done


def set_cookie(response: httpx.Response, name: str) -> str:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith(name + "="):
            return value
    raise AssertionError(f"no {name} cookie in {response.headers.get_list('set-cookie')}")


def flags(cookie: str) -> set[str]:
    return {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}


def max_age(cookie: str) -> int:
    match = re.search(r"max-age=(\d+)", cookie, re.IGNORECASE)
    assert match, cookie
    return int(match.group(1))


@pytest.mark.parametrize(
    ("dashboard", "secure"),
    [({"cookie_secure": True, "session_ttl": 600}, True), ({"cookie_secure": False}, False), ({}, False)],
    ids=["secure", "not-secure", "auto-over-http"],
)
def test_cookie_flags_follow_the_config(tmp_path: Path, dashboard: dict[str, Any], secure: bool) -> None:
    with running_coordinator(tmp_path, {"dashboard": dashboard} if dashboard else {}) as coord:
        page, done = login(coord)
        session = set_cookie(done, "starling_session")
        nonce = set_cookie(page, "starling_login")
        assert ("secure" in flags(session)) is secure, session
        assert ("secure" in flags(nonce)) is secure, nonce
        assert {"httponly", "samesite", "path"} <= flags(session)
        ttl = dashboard.get("session_ttl", 8 * 3600)
        assert ttl - 5 <= max_age(session) <= ttl


def test_config_defaults_are_the_old_behaviour() -> None:
    dash = CoordinatorConfig().dashboard
    assert (dash.poll_interval, dash.session_ttl, dash.cookie_secure, dash.heartbeat) == (1.0, 28800, "auto", 15.0)
    assert dash.secure is None


def test_config_values_and_the_old_poll_interval_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dashboard:\n  cookie_secure: true\n  session_ttl: 3600\n  heartbeat: 5\n  poll_interval: 0.5\n")
    dash = load_config(path, env={}).dashboard
    assert (dash.secure, dash.session_ttl, dash.heartbeat, dash.poll_interval) == (True, 3600, 5.0, 0.5)
    path.write_text("dashboard_poll_interval: 0.25\n")  # the old name still works
    assert load_config(path, env={}).dashboard.poll_interval == 0.25


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dashboard_poll_interval: 0.5\ndashboard:\n  poll_interval: 2\n", "old name of dashboard.poll_interval"),
        ("dashboard:\n  cookie_secure: maybe\n", "dashboard.cookie_secure: Value error, must be true, false or auto"),
        ("dashboard:\n  session_ttl: 10\n", "dashboard.session_ttl"),
        ("dashboard:\n  poll_interval: 0\n", "dashboard.poll_interval"),
        ("dashboard:\n  cookie_secure_typo: true\n", "dashboard.cookie_secure_typo"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, env={})
