"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real coordinator.

Peers are enrolled over the API with real X25519 keys, agents are simulated by state reports
(POST /api/v1/peer/state) and map streams (GET /api/v1/peer/stream). Screenshots go to
tests/output/screenshots/.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import MiniMesh, login, shot, uniq
from tests.browser.server import DashboardCoordinator
from tests.conftest import IN_CI
from tests.fixtures.enroll import sealed_enroll

try:
    from playwright.sync_api import BrowserContext, Page, expect
except ImportError:  # pragma: no cover - CI installs playwright (dev extra)
    if IN_CI:
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

PAGES = ["/dashboard/peers", "/dashboard/mesh", "/dashboard/access", "/dashboard/setup-keys", "/dashboard/audit"]


@pytest.fixture(scope="module")
def mesh(dash_server: DashboardCoordinator) -> MiniMesh:
    return MiniMesh(dash_server)


def api_token(coord: DashboardCoordinator, scope: str) -> dict[str, Any]:
    with coord.client() as api:
        r = api.post("/api/v1/tokens", json={"name": uniq(f"dash-{scope}"), "scope": scope})
        r.raise_for_status()
        return dict(r.json())


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# ----- login and access control -----------------------------------------------------------------
def test_without_a_session_every_page_redirects_to_login(page: Page, dash_server: DashboardCoordinator) -> None:
    for path in PAGES:
        page.goto(path)
        assert re.search(r"/dashboard/login\?next=", page.url), page.url
        expect(page.get_by_role("heading", name=re.compile("Log in"))).to_be_visible()
    with httpx.Client(base_url=dash_server.url) as anon:
        assert anon.get("/dashboard/events").status_code == 401
        r = anon.post("/dashboard/setup-keys", data={"name": "nope"})
        assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")
    with dash_server.client() as api:
        assert not [k for k in api.get("/api/v1/setup-keys").json()["items"] if k["name"] == "nope"]


def test_bad_token_shows_an_error(page: Page) -> None:
    login(page, "sat_this-is-not-a-token")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("not valid")
    assert "/dashboard/login" in page.url
    expect(page.get_by_label("API token")).to_have_attribute("aria-invalid", "true")
    shot(page, "login-bad-token")


def test_login_sets_a_strict_httponly_session_and_returns_to_the_page(
    page: Page, context: BrowserContext, dash_server: DashboardCoordinator
) -> None:
    page.goto("/dashboard/audit?action=peer.*")
    login(page, dash_server.admin_token, start=page.url)
    assert page.url.endswith("/dashboard/audit?action=peer.*"), page.url
    cookie = next(c for c in context.cookies() if c["name"] == "starling_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert dash_server.admin_token not in cookie["value"]
    expect(page.locator("header .actor")).to_have_text("admin")
    # logging out ends the session
    page.get_by_role("button", name="Log out").click()
    page.goto("/dashboard/peers")
    assert "/dashboard/login" in page.url


def test_login_form_needs_its_csrf_nonce(dash_server: DashboardCoordinator) -> None:
    with httpx.Client(base_url=dash_server.url) as s:
        r = s.post("/dashboard/login", data={"token": dash_server.admin_token})
        assert r.status_code == 400 and "starling_session" not in r.headers.get("set-cookie", "")


def test_revoking_the_api_token_ends_its_dashboard_session(page: Page, dash_server: DashboardCoordinator) -> None:
    token = api_token(dash_server, "read")
    login(page, token["token"])
    expect(page.get_by_role("heading", name="Peers")).to_be_visible()
    with dash_server.client() as api:
        api.patch(f"/api/v1/tokens/{token['id']}", json={"revoked": True}).raise_for_status()
    page.goto("/dashboard/peers")
    assert "/dashboard/login" in page.url


# ----- peers, live updates, mesh, access -----------------------------------------------------------
def test_peers_page_lists_peers_with_their_connections(page: Page, mesh: MiniMesh) -> None:
    mesh.report(
        "dev",
        [
            {
                "peer_id": mesh.id("db"),
                "path": "direct",
                "endpoint": "198.19.0.20:51820",
                "latency_ms": 3.25,
                "last_handshake": "2026-01-02T03:04:05Z",
                "rx_bytes": 1536,
                "tx_bytes": 3 * 1024 * 1024,
            }
        ],
    )
    login(page, mesh.coord.admin_token)
    expect(page.get_by_role("heading", name="Peers")).to_be_visible()
    for role in ("dev", "db", "ci"):
        row = page.locator(f'tr[data-peer="{mesh.id(role)}"]')
        expect(row).to_contain_text(mesh.name(role))
        expect(row).to_contain_text(mesh.peers[role]["peer"]["mesh_ip"])
        expect(row).to_contain_text(mesh.groups[role])
        expect(row).to_contain_text("linux")
        expect(row.locator('[data-role="status-text"]')).to_have_text("offline")
    dev = page.locator(f'tr[data-peer="{mesh.id("dev")}"]')
    expect(dev.locator('[data-role="summary"]')).to_have_text("1 (1 direct)")
    dev.locator("summary").click()
    conns = dev.locator("table.conns tbody tr")
    expect(conns).to_have_count(1)
    expect(conns.first).to_contain_text(mesh.name("db"))
    expect(conns.first).to_contain_text("direct")
    expect(conns.first).to_contain_text("3.2 ms")
    expect(conns.first).to_contain_text("2026-01-02 03:04:05 UTC")
    expect(conns.first).to_contain_text("1.5 KiB")
    expect(conns.first).to_contain_text("3.0 MiB")
    shot(page, "peers")
    # the peer page has the same connection and who it can reach (db on tcp/5432, from its map)
    dev.get_by_role("link", name=mesh.name("dev")).click()
    expect(page.get_by_role("heading", name=f"Peer {mesh.name('dev')}")).to_be_visible()
    expect(page.locator("table.conns tbody tr")).to_contain_text(mesh.name("db"))
    reach = page.locator("table.data").last
    expect(reach).to_contain_text(mesh.name("db"))
    expect(reach).to_contain_text("tcp 5432")
    expect(reach).not_to_contain_text(mesh.name("ci"))
    shot(page, "peer-detail")


def test_peer_going_offline_updates_the_page_without_reload(page: Page, mesh: MiniMesh) -> None:
    stream = mesh.stream("db")
    try:
        assert stream.got_map.wait(10), "the map stream did not start"
        with mesh.coord.client() as api:
            assert wait_until(lambda: api.get(f"/api/v1/peers/{mesh.id('db')}").json()["connected"])
        login(page, mesh.coord.admin_token)
        row = page.locator(f'tr[data-peer="{mesh.id("db")}"]')
        expect(row.locator('[data-role="status-text"]')).to_have_text("online")
        expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
        page.evaluate("window.__noReload = 'still here'")
        online_before = int(page.locator("#online-count").inner_text())
        shot(page, "live-before-offline")
    finally:
        stream.close()
    with mesh.coord.client() as api:
        assert wait_until(lambda: not api.get(f"/api/v1/peers/{mesh.id('db')}").json()["connected"]), (
            "the coordinator still reports the peer connected after its stream closed (StreamHub.stream must"
            " mark it disconnected even when the stream ends by cancellation)"
        )
    expect(row.locator('[data-role="status-text"]')).to_have_text("offline", timeout=10_000)
    expect(row).to_have_attribute("data-online", "0")
    assert page.evaluate("window.__noReload") == "still here", "the page was reloaded"
    assert int(page.locator("#online-count").inner_text()) == online_before - 1
    assert int(page.locator("body").get_attribute("data-live-updates") or "0") >= 1
    shot(page, "live-after-offline")
    # ... and back online, again without reload
    again = mesh.stream("db")
    try:
        expect(row.locator('[data-role="status-text"]')).to_have_text("online", timeout=10_000)
        assert page.evaluate("window.__noReload") == "still here"
    finally:
        again.close()


def test_mesh_view_shows_pairs_and_follows_reports_live(page: Page, mesh: MiniMesh) -> None:
    mesh.report("db", [{"peer_id": mesh.id("dev"), "path": "relayed", "latency_ms": 40.0}])
    login(page, mesh.coord.admin_token, start="/dashboard/mesh")
    expect(page.get_by_role("heading", name="Mesh")).to_be_visible()
    cell = page.locator(f'td[data-row="{mesh.id("db")}"][data-col="{mesh.id("dev")}"]')
    expect(cell).to_have_attribute("data-path", "relayed")
    blocked = page.locator(f'td[data-row="{mesh.id("db")}"][data-col="{mesh.id("ci")}"]')
    expect(blocked).to_have_attribute("data-path", "blocked")
    expect(page.locator(f'tr[data-from="{mesh.id("db")}"][data-to="{mesh.id("dev")}"]')).to_contain_text("relayed")
    page.evaluate("window.__noReload = 1")
    time.sleep(0.15)  # the state report rate limit of the test coordinator is 0.1 s
    mesh.report("db", [{"peer_id": mesh.id("dev"), "path": "direct", "latency_ms": 2.0}])
    expect(cell).to_have_attribute("data-path", "direct", timeout=10_000)
    diagonal = page.locator(f'td[data-row="{mesh.id("db")}"][data-col="{mesh.id("db")}"]')
    expect(diagonal).to_have_attribute("data-path", "self")
    expect(page.locator('line[data-a][data-b][class~="edge-direct"]').first).to_be_attached()
    assert page.evaluate("window.__noReload") == 1
    shot(page, "mesh")


def test_access_page_shows_who_can_reach_whom(page: Page, mesh: MiniMesh) -> None:
    login(page, mesh.coord.admin_token, start="/dashboard/access")
    expect(page.locator("#groups-table")).to_contain_text(mesh.groups["db"])
    expect(page.locator("#policies-table")).to_contain_text("tcp 5432")
    page.get_by_label("Peer").select_option(mesh.id("db"))
    page.get_by_role("button", name="Show").click()
    table = page.locator("#reach-table")
    expect(table).to_contain_text(mesh.name("dev"))
    expect(table).not_to_contain_text(mesh.name("ci"))
    row = table.locator("tr", has_text=mesh.name("dev"))
    # db may be reached by dev on tcp/5432 (inbound column), and opens nothing itself
    expect(row.locator("td").nth(2)).to_contain_text("tcp 5432")
    expect(row.locator("td").nth(1)).to_have_text("—")
    shot(page, "access")
    page.get_by_label("Peer").select_option(mesh.id("ci"))
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#reach-none")).to_be_visible()


def test_access_page_shows_routes_who_uses_them_and_who_forwards(page: Page, mesh: MiniMesh) -> None:
    api = mesh.api
    route = uniq("lan")
    prefix = f"198.19.{random.randint(0, 255)}.0/24"
    r = api.post(
        "/api/v1/routes", json={"name": route, "prefix": prefix, "routers": [{"peer": mesh.name("ci"), "metric": 10}]}
    )
    assert r.status_code == 201, r.text
    policy = uniq("dev-lan")
    body = {
        "name": policy,
        "protocol": "tcp",
        "ports": ["443"],
        "sources": {"groups": [mesh.groups["dev"]]},
        "destinations": {"routes": [route]},
    }
    assert api.post("/api/v1/policies", json=body).status_code == 201
    try:
        login(page, mesh.coord.admin_token, start="/dashboard/access")
        expect(page.locator("#routes-table")).to_contain_text(prefix)
        expect(page.locator("#policies-table").locator("tr", has_text=policy)).to_contain_text(f"route {route}")
        page.get_by_label("Peer").select_option(mesh.id("dev"))
        page.get_by_role("button", name="Show").click()
        uses = page.locator("#uses-table").locator("tr", has_text=route)
        expect(uses).to_contain_text(prefix)
        expect(uses).to_contain_text(f"{mesh.name('ci')} (metric 10)")
        expect(uses).to_contain_text("tcp 443")
        page.get_by_label("Peer").select_option(mesh.id("ci"))
        page.get_by_role("button", name="Show").click()
        expect(page.locator("#forwards-table").locator("tr", has_text=route)).to_contain_text(
            f"{mesh.name('dev')}: tcp 443"
        )
        page.get_by_label("Peer").select_option(mesh.id("db"))
        page.get_by_role("button", name="Show").click()
        expect(page.locator("#uses-table")).to_have_count(0)
    finally:
        pid = api.get("/api/v1/policies", params={"name": policy}).json()["items"][0]["id"]
        api.delete(f"/api/v1/policies/{pid}")
        rid = api.get("/api/v1/routes", params={"name": route}).json()["items"][0]["id"]
        api.delete(f"/api/v1/routes/{rid}")


# ----- setup keys, read-only, audit -------------------------------------------------------------------
def test_create_and_revoke_a_setup_key(page: Page, mesh: MiniMesh) -> None:
    login(page, mesh.coord.admin_token, start="/dashboard/setup-keys")
    name = uniq("ui-key")
    page.get_by_label("Name").fill(name)
    page.get_by_role("checkbox", name=re.compile("^Reusable")).check()
    page.get_by_label("Usage limit").fill("5")
    page.get_by_label("Expires after").select_option(label="1 day")
    page.get_by_label("Auto groups").select_option(mesh.groups["dev"])
    page.get_by_role("button", name="Create setup key").click()
    created = page.locator("[data-role=new-key]")
    expect(created).to_be_visible()
    clear = created.input_value()
    assert clear.startswith("ssk_")
    row = page.locator(f'tr[data-key="{name}"]')
    expect(row.locator('[data-role="state"]')).to_have_text("valid")
    expect(row).to_contain_text(mesh.groups["dev"])
    shot(page, "setup-key-created")
    # the key shown once really enrolls a peer, into its auto group
    enrolled = sealed_enroll(mesh.coord.url, {"setup_key": clear, "hostname": uniq("ui")})
    assert enrolled.status_code == 200, enrolled.text
    assert enrolled.json()["peer"]["groups"] == [mesh.groups["dev"]]
    # reloading does not show the key again
    page.goto("/dashboard/setup-keys")
    expect(page.locator("[data-role=new-key]")).to_have_count(0)
    assert clear not in page.content()
    page.get_by_role("button", name=f"Revoke setup key {name}").click()
    expect(page.get_by_role("status").filter(has_text="revoked")).to_be_visible()
    expect(page.locator(f'tr[data-key="{name}"] [data-role="state"]')).to_have_text("revoked")
    with mesh.coord.client() as api:
        key = next(
            k for k in api.get("/api/v1/setup-keys", params={"limit": 1000}).json()["items"] if k["name"] == name
        )
    assert key["revoked"] is True and key["usage_limit"] == 5 and key["reusable"] is True
    shot(page, "setup-key-revoked")
    # both changes are in the audit log, attributed to the dashboard user
    page.goto(f"/dashboard/audit?action=setup_key.*&target_id={key['id']}")
    rows = page.locator("#audit-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("setup_key.revoke")
    expect(rows.nth(1)).to_contain_text("setup_key.create")
    expect(rows.nth(0)).to_contain_text("admin")
    shot(page, "audit")


def test_read_only_token_sees_no_write_actions_and_the_server_refuses_them(
    page: Page, context: BrowserContext, mesh: MiniMesh
) -> None:
    token = api_token(mesh.coord, "read")
    login(page, token["token"], start="/dashboard/setup-keys")
    expect(page.locator("header .badge")).to_have_text("read-only")
    expect(page.locator("#read-only-note")).to_be_visible()
    expect(page.locator("#create-key-form")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("^Revoke"))).to_have_count(0)
    shot(page, "setup-keys-read-only")
    csrf = page.locator('input[name="csrf"]').first.input_value()
    name = uniq("sneaky")
    r = context.request.post(
        mesh.coord.url + "/dashboard/setup-keys", form={"csrf": csrf, "name": name}, max_redirects=0
    )
    assert r.status == 403
    with mesh.coord.client() as api:
        keys = api.get("/api/v1/setup-keys", params={"limit": 1000}).json()["items"]
        assert not [k for k in keys if k["name"] == name]
        victim = next(k for k in keys if not k["revoked"])
    r = context.request.post(
        f"{mesh.coord.url}/dashboard/setup-keys/{victim['id']}/revoke", form={"csrf": csrf}, max_redirects=0
    )
    assert r.status == 403
    with mesh.coord.client() as api:
        assert api.get(f"/api/v1/setup-keys/{victim['id']}").json()["revoked"] is False


def test_writes_need_the_csrf_token(page: Page, context: BrowserContext, mesh: MiniMesh) -> None:
    login(page, mesh.coord.admin_token)
    name = uniq("csrf")
    r = context.request.post(
        mesh.coord.url + "/dashboard/setup-keys", form={"csrf": "forged", "name": name}, max_redirects=0
    )
    assert r.status == 400 and "CSRF" in r.text()
    r = context.request.post(mesh.coord.url + "/dashboard/setup-keys", form={"name": name}, max_redirects=0)
    assert r.status == 400
    with mesh.coord.client() as api:
        assert not [
            k for k in api.get("/api/v1/setup-keys", params={"limit": 1000}).json()["items"] if k["name"] == name
        ]


# ----- accessibility basics ---------------------------------------------------------------------------
CHECK_A11Y = (Path(__file__).parent / "a11y.js").read_text()


def test_accessibility_basics_on_every_page(page: Page, mesh: MiniMesh) -> None:
    page.goto("/dashboard/login")
    result = page.evaluate(CHECK_A11Y)
    assert result["problems"] == [], result
    login(page, mesh.coord.admin_token)
    for path in [*PAGES, f"/dashboard/access?peer={mesh.id('db')}", f"/dashboard/peers/{mesh.id('dev')}"]:
        page.goto(path)
        for details in page.locator("details").all()[:3]:
            details.locator("summary").click()  # open rows too: their tables and text count
        page.wait_for_load_state("networkidle")
        result = page.evaluate(CHECK_A11Y)
        assert result["problems"] == [], (path, result)
        assert result["checked"] >= 5, (path, result)
    # keyboard: the skip link is the first tab stop and leads to the main content
    page.goto("/dashboard/peers")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
