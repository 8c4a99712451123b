"""Make the README screenshot of the dashboard's peers page (docs/dashboard-screenshot.png).

    PYTHONPATH=. .venv/bin/python -m tests.browser.make_screenshot [OUTPUT.png]

Starts a coordinator with the dashboard on loopback, enrolls a small demo mesh over the API (real
X25519 keys), opens map streams for some peers (online), sends state reports (direct and relayed
paths), logs in with the admin token in Chromium and saves the peers page.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, PeerStream, login
from tests.browser.server import running_dashboard
from tests.fixtures.enroll import sealed_enroll

REPO = Path(__file__).resolve().parents[2]
HOSTS = [
    ("alice-laptop", "laptops", "macOS 14.5", True),
    ("bob-laptop", "laptops", "Windows 11", True),
    ("carol-laptop", "laptops", "Ubuntu 24.04", False),
    ("build-01", "ci", "Debian 12", True),
    ("build-02", "ci", "Debian 12", True),
    ("db-primary", "databases", "Debian 12", True),
    ("db-replica", "databases", "Debian 12", True),
    ("grafana", "servers", "Alpine 3.20", True),
    ("git", "servers", "Debian 12", True),
    ("nas", "servers", "TrueNAS 24.04", False),
]
POLICIES = [
    ("laptops-to-servers", "laptops", "servers", "tcp", [22, 443]),
    ("ci-to-git", "ci", "servers", "tcp", [22, 443]),
    ("app-to-db", "servers", "databases", "tcp", [5432]),
    ("laptops-to-db", "laptops", "databases", "tcp", [5432]),
]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else REPO / "docs" / "dashboard-screenshot.png"
    rng = random.Random(4)
    with (
        tempfile.TemporaryDirectory(prefix="starling-shot-") as tmp,
        running_dashboard(Path(tmp), {"limits": {"state_report_interval": 0}}, poll_interval=0.5) as coord,
    ):
        api = coord.client()
        for group in sorted({h[1] for h in HOSTS}):
            api.post("/api/v1/groups", json={"name": group}).raise_for_status()
        for name, src, dst, proto, ports in POLICIES:
            body = {
                "name": name,
                "protocol": proto,
                "ports": ports,
                "sources": {"groups": [src]},
                "destinations": {"groups": [dst]},
            }
            api.post("/api/v1/policies", json=body).raise_for_status()
        peers: dict[str, dict[str, object]] = {}
        for host, group, os_name, _ in HOSTS:
            key = api.post("/api/v1/setup-keys", json={"name": f"key-{host}", "auto_groups": [group]}).json()["key"]
            r = sealed_enroll(
                coord.url,
                {"setup_key": key, "hostname": f"{host}.corp.example", "os": os_name, "agent_version": "0.1.0"},
            )
            r.raise_for_status()
            peers[host] = r.json()
        streams = [PeerStream(coord.host, coord.port, str(peers[h]["credential"])) for h, *_, up in HOSTS if up]
        for s in streams:
            s.got_map.wait(10)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for host, _, _, up in HOSTS:
            if not up:
                continue
            me = peers[host]
            with httpx.Client(base_url=coord.url, headers={"Authorization": f"Bearer {me['credential']}"}) as pc:
                doc = pc.get("/api/v1/peer/map").json()
                conns = [
                    {
                        "peer_id": p["id"],
                        "path": rng.choice(["direct", "direct", "direct", "relayed"]),
                        "endpoint": f"198.19.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}:51820",
                        "latency_ms": round(rng.uniform(1.5, 45), 1),
                        "last_handshake": now,
                        "rx_bytes": rng.randrange(1 << 20, 1 << 32),
                        "tx_bytes": rng.randrange(1 << 20, 1 << 31),
                    }
                    for p in doc["peers"]
                    if next(h for h in HOSTS if h[0] == p["name"])[3]
                ]
                pc.post("/api/v1/peer/state", json={"connections": conns}).raise_for_status()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(base_url=coord.url, viewport={"width": 1440, "height": 800})
            login(page, coord.admin_token)
            row = page.locator("tr", has_text="db-primary")
            row.locator("summary").click()
            row.locator("table.conns").wait_for()
            page.locator("#live-status[data-state=live]").wait_for()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=False)
            browser.close()
        for s in streams:
            s.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
