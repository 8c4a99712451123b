"""Browser-test fixtures: a real coordinator with the dashboard, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.browser.server import DashboardCoordinator, running_dashboard
from tests.conftest import IN_CI
from tests.fixtures.enroll import sealed_enroll

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

CHROMIUM = os.environ.get("STARLING_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "output" / "screenshots"


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _need(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is missing: CI installs it (apt chromium, pip playwright)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def dash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardCoordinator]:
    workdir = tmp_path_factory.mktemp("dashboard")
    config = {"limits": {"state_report_interval": 0.1}, "stream_heartbeat": 5}
    with running_dashboard(workdir, config, poll_interval=0.5) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright (PyPI)")
    if not Path(CHROMIUM).exists():
        _need(f"Chromium ({CHROMIUM})")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def context(browser: Browser, dash_server: DashboardCoordinator) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=dash_server.url, viewport={"width": 1400, "height": 900})
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def shot(page: Page, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def login(page: Page, token: str, start: str = "/dashboard/login") -> None:
    page.goto(start)
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()


# ----- a small mesh over the API ---------------------------------------------------------------
class MiniMesh:
    """Groups dev/db/ci (fresh names), policy dev -> db tcp/5432, one enrolled peer per role."""

    def __init__(self, coord: DashboardCoordinator) -> None:
        self.coord = coord
        self.api = coord.client()
        self.groups = {g: uniq(g) for g in ("dev", "db", "ci")}
        for name in self.groups.values():
            self.api.post("/api/v1/groups", json={"name": name}).raise_for_status()
        self.api.post(
            "/api/v1/policies",
            json={
                "name": uniq("dev-db"),
                "protocol": "tcp",
                "ports": [5432],
                "sources": {"groups": [self.groups["dev"]]},
                "destinations": {"groups": [self.groups["db"]]},
            },
        ).raise_for_status()
        self.peers = {role: self.enroll(role) for role in ("dev", "db", "ci")}

    def enroll(self, role: str, os_name: str = "linux") -> dict[str, Any]:
        key = self.api.post("/api/v1/setup-keys", json={"name": uniq("k"), "auto_groups": [self.groups[role]]})
        key.raise_for_status()
        r = sealed_enroll(
            self.coord.url,
            {"setup_key": key.json()["key"], "hostname": uniq(role), "os": os_name, "agent_version": "0.1.0"},
        )
        r.raise_for_status()
        return dict(r.json())

    def id(self, role: str) -> str:
        return str(self.peers[role]["peer"]["id"])

    def name(self, role: str) -> str:
        return str(self.peers[role]["peer"]["name"])

    def report(self, role: str, connections: list[dict[str, Any]]) -> None:
        r = httpx.post(
            self.coord.url + "/api/v1/peer/state",
            json={"connections": connections},
            headers={"Authorization": f"Bearer {self.peers[role]['credential']}"},
        )
        assert r.status_code == 204, r.text

    def stream(self, role: str) -> PeerStream:
        return PeerStream(self.coord.host, self.coord.port, self.peers[role]["credential"])


class PeerStream:
    """GET /api/v1/peer/stream on a raw socket (as an agent): `close()` really drops the connection."""

    def __init__(self, host: str, port: int, credential: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(
            (
                f"GET /api/v1/peer/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {credential}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
        )
        self.got_map = threading.Event()
        self.buffer = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
                if re.search(rb"event: map", self.buffer):
                    self.got_map.set()
        except OSError:
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
