"""The starling.mesh.coordinator inventory plugin through `ansible-inventory --list` against a real coordinator:
golden JSON (volatile fields stripped), pagination, caching on and off, untrusted coordinator strings."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ansible.conftest import BIN, HERE, ansible_env, enroll_peer
from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.sse import SseReader

GOLDEN = HERE / "golden" / "inventory.json"
VOLATILE = {"starling_id", "starling_public_key", "starling_last_seen"}
EVIL = "{{ lookup('ansible.builtin.pipe', 'echo PWNED') }}"


@pytest.fixture(scope="module")
def mesh(coordinator: CoordinatorProcess) -> Iterator[dict[str, Any]]:
    """Four peers in groups web/db/ops-team, one connected with a state report, one with a hostile OS string."""
    with coordinator.client() as api:
        for g in ("web", "db", "ops-team"):
            assert api.post("/api/v1/groups", json={"name": g}).status_code == 201
        peers = {
            "web-1": enroll_peer(coordinator, api, "web-1.example.org", "debian-12", "0.1.0"),
            "web-2": enroll_peer(coordinator, api, "web-2.example.org", "debian-12", "0.1.1"),
            "db-1": enroll_peer(coordinator, api, "db-1.example.org", "ubuntu-24.04", "0.1.0"),
            "evil": enroll_peer(coordinator, api, "evil.example.org", EVIL, "0.1.0"),
        }
        groups = {"web-1": ["web"], "web-2": ["web", "ops-team"], "db-1": ["db", "ops-team"], "evil": []}
        for name, peer in peers.items():
            assert api.patch(f"/api/v1/peers/{peer['id']}", json={"groups": groups[name]}).status_code == 200
        # web-1 reports on web-2 and db-1: they must be in its map (reports about other peers are refused).
        policy = {"name": "inventory-web", "sources": {"groups": ["web"]}, "destinations": {"groups": ["web", "db"]}}
        assert api.post("/api/v1/policies", json=policy).status_code == 201
        # routes: web-1 routes an office LAN directly (metric 10) and db-1/web-2 through ops-team; db-1 is an exit
        # node that evil uses
        office = {
            "name": "office-lan",
            "prefix": "198.18.40.0/24",
            "routers": [{"group": "ops-team", "metric": 100}, {"peer": "web-1", "metric": 10}],
        }
        internet = {"name": "internet", "prefix": "0.0.0.0/0", "routers": [{"peer": "db-1"}], "masquerade": True}
        for route in (office, internet):
            assert api.post("/api/v1/routes", json=route).status_code == 201, route
        assert api.patch(f"/api/v1/peers/{peers['evil']['id']}", json={"exit_node": "db-1"}).status_code == 200
    stream = SseReader(coordinator.url + "/api/v1/peer/stream", peers["web-1"]["credential"])
    stream.next(timeout=10)  # first map: web-1 is connected now
    report = {
        "connections": [
            {"peer_id": peers["web-2"]["id"], "path": "direct", "rx_bytes": 1, "tx_bytes": 2, "latency_ms": 1.25},
            {"peer_id": peers["db-1"]["id"], "path": "relayed", "rx_bytes": 0, "tx_bytes": 0},
        ]
    }
    r = httpx.post(
        coordinator.url + "/api/v1/peer/state",
        json=report,
        headers={"Authorization": f"Bearer {peers['web-1']['credential']}"},
        timeout=10,
    )
    assert r.status_code in (200, 204), r.text
    try:
        yield peers
    finally:
        stream.close()


def plain(value: Any) -> Any:
    """A value of `ansible-inventory --list` without the 2.19 untrusted-string envelope."""
    if isinstance(value, dict) and set(value) == {"__ansible_unsafe"}:
        return value["__ansible_unsafe"]
    return value


def write_config(path: Path, **options: Any) -> Path:
    path.write_text(yaml.safe_dump({"plugin": "starling.mesh.coordinator", **options}))
    return path


def inventory(
    collections_path: Path,
    tmp_path: Path,
    config: Path,
    *args: str,
    token: str,
    url: str,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    proc = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(config), "--list", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ansible_env(collections_path, tmp_path / "home", STARLING_URL=url, STARLING_TOKEN=token, **(env or {})),
    )
    assert proc.returncode == 0, proc.stderr
    assert "[WARNING]" not in proc.stderr, proc.stderr
    return dict(json.loads(proc.stdout))


def strip(data: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for hv in out.get("_meta", {}).get("hostvars", {}).values():
        for key in VOLATILE:
            assert key in hv
            hv[key] = "<volatile>"
    for name, group in out.items():
        for key in ("hosts", "children"):
            if name != "_meta" and key in group:
                group[key] = sorted(group[key])
    return out


BASE = {
    "keyed_groups": [{"key": "starling_os", "prefix": "os"}],
    "groups": {"stale": "not starling_online"},
    "compose": {"os_upper": "starling_os | upper", "agent_major": "starling_version.split('.')[0]"},
}


def test_list_matches_golden(
    collections_path: Path, tmp_path: Path, coordinator: CoordinatorProcess, mesh: dict[str, Any]
) -> None:
    config = write_config(tmp_path / "mesh.coordinator.yml", **BASE)
    got = strip(inventory(collections_path, tmp_path, config, token=coordinator.admin_token, url=coordinator.url))
    if os.environ.get("STARLING_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())
    hostvars = got["_meta"]["hostvars"]
    assert [(plain(r["name"]), r["metric"]) for r in hostvars["web-2"]["starling_routes"]] == [("office-lan", 100)]
    assert [(plain(r["name"]), r["exit_node"]) for r in hostvars["db-1"]["starling_routes"]] == [
        ("internet", True),
        ("office-lan", False),
    ]
    assert plain(hostvars["evil"]["starling_exit_node"]) == "db-1" and hostvars["evil"]["starling_routes"] == []
    # the same with 2 peers per page (pagination followed), DNS names as hostnames, a read-only token
    ro = httpx.post(
        coordinator.url + "/api/v1/tokens",
        json={"name": "inv-ro", "scope": "read"},
        headers={"Authorization": f"Bearer {coordinator.admin_token}"},
    ).json()["token"]
    paged = write_config(tmp_path / "paged.coordinator.yaml", page_size=2, **BASE)
    assert strip(inventory(collections_path, tmp_path, paged, token=ro, url=coordinator.url)) == got
    dns = write_config(tmp_path / "dns.coordinator.yml", hostname="dns_name", ansible_host="none", group_prefix="mesh_")
    data = inventory(collections_path, tmp_path, dns, token=ro, url=coordinator.url)
    assert sorted(data["mesh_web"]["hosts"]) == ["web-1.starling.internal", "web-2.starling.internal"]
    assert "ansible_host" not in data["_meta"]["hostvars"]["web-1.starling.internal"]


def test_coordinator_strings_are_not_templated(
    collections_path: Path, tmp_path: Path, coordinator: CoordinatorProcess, mesh: dict[str, Any]
) -> None:
    config = write_config(tmp_path / "mesh.coordinator.yml", **BASE)
    play = tmp_path / "play.yml"
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "evil",
                    "gather_facts": False,
                    "tasks": [
                        {"name": "show", "ansible.builtin.debug": {"msg": "os={{ starling_os }} upper={{ os_upper }}"}}
                    ],
                }
            ]
        )
    )
    record = tmp_path / "record.json"
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(config), str(play)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ansible_env(
            collections_path,
            tmp_path / "home",
            STARLING_URL=coordinator.url,
            STARLING_TOKEN=coordinator.admin_token,
            STARLING_RECORD_FILE=str(record),
        ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = json.loads(record.read_text())[0]["result"]["msg"]
    assert msg == f"os={EVIL} upper={EVIL.upper()}"


@pytest.mark.slow
def test_cache_on_and_off(
    collections_path: Path, tmp_path: Path, coordinator: CoordinatorProcess, mesh: dict[str, Any]
) -> None:
    cache_dir = tmp_path / "cache"
    cached = {
        "cache": True,
        "cache_plugin": "ansible.builtin.jsonfile",
        "cache_connection": str(cache_dir),
        "cache_timeout": 3600,
    }
    config = write_config(tmp_path / "mesh.coordinator.yml", **BASE, **cached)
    run = lambda cfg, *a, token=coordinator.admin_token: inventory(  # noqa: E731
        collections_path, tmp_path, cfg, *a, token=token, url=coordinator.url
    )
    first = run(config)
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and coordinator.admin_token not in files[0].read_text()
    raw = json.loads(files[0].read_text())
    if isinstance(raw, dict) and "__payload__" in raw:  # ansible-core 2.19 jsonfile envelope
        raw = json.loads(raw["__payload__"])
    # raw API data is cached: peers and routes
    assert {p["name"] for p in raw["peers"]} == set(mesh)
    assert {r["name"] for r in raw["routes"]} == {"office-lan", "internet"}

    with coordinator.client() as api:
        api.post("/api/v1/groups", json={"name": "late"})
        api.patch(f"/api/v1/peers/{mesh['evil']['id']}", json={"groups": ["late"]})
    try:
        assert strip(run(config)) == strip(first)  # served from the cache
        # compose and groups are applied again on each run, also from the cache
        recomposed = write_config(tmp_path / "mesh.coordinator.yml", **{**BASE, "compose": {"flag": "'x'"}}, **cached)
        data = run(recomposed)
        assert (
            plain(data["_meta"]["hostvars"]["evil"]["flag"]) == "x"
            and "os_upper" not in data["_meta"]["hostvars"]["evil"]
        )
        assert "late" not in data
        # another token is another cache key: fetched fresh
        ro = httpx.post(
            coordinator.url + "/api/v1/tokens",
            json={"name": "inv-ro2", "scope": "read"},
            headers={"Authorization": f"Bearer {coordinator.admin_token}"},
        ).json()["token"]
        assert run(config, token=ro)["late"]["hosts"] == ["evil"]
        assert len(list(cache_dir.iterdir())) == 2
        # --flush-cache refreshes
        assert run(config, "--flush-cache")["late"]["hosts"] == ["evil"]
        # cache off: always live, nothing written
        time.sleep(0.01)
        live_cfg = write_config(tmp_path / "live.coordinator.yml", **BASE)
        assert run(live_cfg)["late"]["hosts"] == ["evil"]
        assert len(list(cache_dir.iterdir())) == 2
    finally:
        with coordinator.client() as api:
            api.patch(f"/api/v1/peers/{mesh['evil']['id']}", json={"groups": []})


def test_bad_token_and_url_fail_clearly(
    collections_path: Path, tmp_path: Path, coordinator: CoordinatorProcess
) -> None:
    config = write_config(tmp_path / "mesh.coordinator.yml")
    for token, url, expected in (
        ("sat_bad", coordinator.url, "authentication failed (401)"),
        ("sat_bad", "http://127.0.0.1:9", "cannot reach the coordinator"),
    ):
        proc = subprocess.run(
            [str(BIN / "ansible-inventory"), "-i", str(config), "--list"],
            capture_output=True,
            text=True,
            timeout=120,
            env=ansible_env(
                collections_path,
                tmp_path / "home",
                STARLING_URL=url,
                STARLING_TOKEN=token,
                ANSIBLE_INVENTORY_UNPARSED_FAILED="True",
            ),
        )
        assert proc.returncode != 0
        assert expected in proc.stderr, proc.stderr
        assert "sat_bad" not in proc.stderr
