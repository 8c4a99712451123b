"""Benchmark: `ansible-inventory --list` with the starling.mesh.coordinator plugin against 10k peers.

Starts a real `starling-coordinator serve` (SQLite, loopback), stops it after its first start (schema and
secrets exist then), seeds N peers straight into its database (bulk SQL insert: enrolling 10k peers through
the API is not what is measured here), and starts it again. Then it times:

  floor     a plain httpx script fetching every page of GET /api/v1/peers (limit 1000): the API's own cost
  startup   `ansible-inventory -i localhost, --list` (ansible's fixed start-up cost, no plugin)
  cold      `ansible-inventory -i bench.coordinator.yml --list` with an empty cache (fetch + build + print)
  cached    the same again, served from the jsonfile cache (no request to the coordinator)
  no-cache  the same with caching off
  graph     `--graph` from the cache: the inventory is built but 10k hosts' variables are not resolved and
            printed (ansible-inventory --list spends most of its time there, outside the plugin)

Each is the median of --repeat runs. Goals (issue 6): cold <= 3 s, cached <= 0.5 s; both are also printed
less the start-up cost. Run from the repository root:
    PYTHONPATH=. .venv/bin/python bench/inventory.py [--peers 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import create_engine, insert, select

from coordinator.store.models import Group, MeshSettings, Peer, PeerGroup
from tests.fixtures.coordinator import CoordinatorProcess

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GOAL_COLD, GOAL_CACHED = 3.0, 0.5
GROUPS = 20


def seed(db_url: str, peers: int) -> None:
    """Insert `peers` peers (each in 1-2 of GROUPS groups, some with connection reports) in one transaction."""
    engine = create_engine(db_url)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        prefix = conn.execute(select(MeshSettings.mesh_prefix)).scalar_one()
        base = int.from_bytes(bytes(int(x) for x in prefix.split("/")[0].split(".")), "big")
        group_ids = [secrets.token_hex(12) for _ in range(GROUPS)]
        conn.execute(
            insert(Group),
            [
                {"id": gid, "name": f"team-{i:02d}", "description": "", "created_at": now}
                for i, gid in enumerate(group_ids)
            ],
        )
        rows, links = [], []
        for i in range(peers):
            ip = base + i + 1
            pid = secrets.token_hex(12)
            connections = (
                [{"peer_id": "x", "path": ("direct", "relayed", "idle")[i % 3], "rx_bytes": 0, "tx_bytes": 0}]
                if i % 4 == 0
                else []
            )
            rows.append(
                {
                    "id": pid,
                    "name": f"peer-{i:05d}",
                    "public_key": base64.b64encode(os.urandom(32)).decode(),
                    "mesh_ip": ".".join(str((ip >> s) & 255) for s in (24, 16, 8, 0)),
                    "hostname": f"peer-{i:05d}.example.org",
                    "os": ("debian-12", "ubuntu-24.04", "fedora-41")[i % 3],
                    "agent_version": f"0.{i % 4}.0",
                    "approved": True,
                    "ephemeral": False,
                    "connected": i % 5 != 0,
                    "last_seen": now,
                    "created_at": now,
                    "credential_hash": secrets.token_hex(32),
                    "setup_key_id": None,
                    "connections": connections,
                    "connections_reported_at": now if connections else None,
                }
            )
            links.append({"peer_id": pid, "group_id": group_ids[i % GROUPS]})
            if i % 3 == 0:
                links.append({"peer_id": pid, "group_id": group_ids[(i + 7) % GROUPS]})
        conn.execute(insert(Peer), rows)
        conn.execute(insert(PeerGroup), links)
    engine.dispose()


def median_time(cmd: list[str], env: dict[str, str], repeat: int, before: Any = None) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeat):
        if before:
            before()
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
    return statistics.median(times), out


def httpx_floor(url: str, token: str, repeat: int) -> tuple[float, int]:
    times, count = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            items: list[Any] = []
            params: dict[str, Any] = {"limit": 1000}
            while True:
                page = client.get("/api/v1/peers", params=params).json()
                items.extend(page["items"])
                if not page["next_cursor"]:
                    break
                params["cursor"] = page["next_cursor"]
        times.append(time.perf_counter() - started)
        count = len(items)
    return statistics.median(times), count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="starling-bench-inventory-"))
    coord = CoordinatorProcess(workdir=work / "coordinator", config={"log": {"level": "warning"}})
    try:
        coord.start()
        coord.stop()
        started = time.perf_counter()
        seed(f"sqlite:///{(work / 'coordinator' / 'state' / 'coordinator.db').resolve()}", args.peers)
        seeded = time.perf_counter() - started
        coord.start(timeout=300)

        colls = work / "collections" / "ansible_collections" / "starling"
        colls.mkdir(parents=True)
        (colls / "mesh").symlink_to(REPO)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(
            ANSIBLE_HOME=str(work / "home"),
            ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
            ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
            ANSIBLE_LOCALHOST_WARNING="False",
            STARLING_URL=coord.url,
            STARLING_TOKEN=coord.admin_token,
            PATH=f"{BIN}:{env.get('PATH', '')}",
        )
        cache_dir = work / "cache"
        cached_cfg = work / "bench.coordinator.yml"
        cached_cfg.write_text(
            yaml.safe_dump(
                {
                    "plugin": "starling.mesh.coordinator",
                    "cache": True,
                    "cache_plugin": "ansible.builtin.jsonfile",
                    "cache_connection": str(cache_dir),
                    "cache_timeout": 3600,
                }
            )
        )
        live_cfg = work / "live.coordinator.yml"
        live_cfg.write_text(yaml.safe_dump({"plugin": "starling.mesh.coordinator"}))
        inv = str(BIN / "ansible-inventory")

        floor, count = httpx_floor(coord.url, coord.admin_token, args.repeat)
        startup, _ = median_time([inv, "-i", "localhost,", "--list"], env, args.repeat)
        cold, out = median_time(
            [inv, "-i", str(cached_cfg), "--list"],
            env,
            args.repeat,
            before=lambda: shutil.rmtree(cache_dir, ignore_errors=True),
        )
        hosts = len(json.loads(out)["_meta"]["hostvars"])
        cached, _ = median_time([inv, "-i", str(cached_cfg), "--list"], env, args.repeat)
        live, _ = median_time([inv, "-i", str(live_cfg), "--list"], env, args.repeat)
        # --graph builds the same inventory but does not resolve and print 10k hosts' variables (what
        # ansible-playbook does at start-up): the plugin's share, without --list's own per-host cost
        graph_cached, _ = median_time([inv, "-i", str(cached_cfg), "--graph"], env, args.repeat)
        graph_startup, _ = median_time([inv, "-i", "localhost,", "--graph"], env, args.repeat)
    finally:
        coord.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def verdict(value: float, goal: float) -> str:
        return "MET" if value <= goal else "MISSED"

    print(
        f"starling.mesh.coordinator inventory bench: {args.peers} peers seeded in {seeded:.1f} s; "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"median of {args.repeat}"
    )
    print(f"  floor: httpx, all pages ({count} peers)        {floor:7.3f} s")
    print(f"  ansible-inventory start-up (localhost,)       {startup:7.3f} s")
    print(
        f"  cold  (empty cache, {hosts} hosts)         {cold:7.3f} s   x{cold / floor:.1f} floor; "
        f"goal <= {GOAL_COLD} s: {verdict(cold, GOAL_COLD)}; less start-up {cold - startup:.3f} s"
    )
    print(
        f"  cached                                        {cached:7.3f} s   x{cached / floor:.1f} floor; "
        f"goal <= {GOAL_CACHED} s: {verdict(cached, GOAL_CACHED)}; less start-up {cached - startup:.3f} s "
        f"({verdict(cached - startup, GOAL_CACHED)})"
    )
    print(f"  no cache                                      {live:7.3f} s   x{live / floor:.1f} floor")
    print(
        f"  cached, --graph (no per-host vars dump)       {graph_cached:7.3f} s   less start-up "
        f"{graph_cached - graph_startup:.3f} s ({verdict(graph_cached - graph_startup, GOAL_CACHED)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
