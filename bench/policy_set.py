"""Benchmark: check-mode plan time of starling.mesh.policy_set for a mesh with 500 policies.

Starts a real `starling-coordinator serve` (SQLite, loopback), creates 50 groups and 500 policies through the
API, then declares a changed set (50 policies with other ports, 25 removed, 25 new, 20 reachability
assertions) and times, median of --repeat runs:

  floor      httpx: GET all groups and policies (what any plan must read)
  plan       the module's logic in-process (validate, read state, check references, reachability diff,
             assertions, plan), through the real coordinator client, in check mode
  baseline   `ansible-playbook` running starling.mesh.mesh_info (groups + policies): ansible's own cost of
             one module task that reads the same data
  playbook   `ansible-playbook --check --diff` running starling.mesh.policy_set on the declared set

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/policy_set.py [--policies 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.ansible import collection_loader
from tests.fixtures.coordinator import CoordinatorProcess

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GROUPS = 50


def policy(i: int, groups: int, variant: int = 0) -> dict[str, Any]:
    proto = ("tcp", "udp", "any", "icmp")[i % 4]
    body: dict[str, Any] = {
        "name": f"pol-{i:04d}",
        "protocol": proto,
        "sources": {"groups": [f"grp-{i % groups:02d}"]},
        "destinations": {"groups": [f"grp-{(i * 7 + 3) % groups:02d}", f"grp-{(i + 1) % groups:02d}"]},
        "bidirectional": i % 5 == 0,
    }
    if proto in ("tcp", "udp"):
        body["ports"] = [1000 + i + variant, f"{20000 + i}-{20010 + i + variant}"]
    return body


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.policies

    work = Path(tempfile.mkdtemp(prefix="starling-bench-policy-set-"))
    coord = CoordinatorProcess(workdir=work / "coordinator", config={"log": {"level": "warning"}})
    try:
        coord.start()
        headers = {"Authorization": f"Bearer {coord.admin_token}"}
        with httpx.Client(base_url=coord.url, headers=headers, timeout=60) as api:
            for g in range(GROUPS):
                api.post("/api/v1/groups", json={"name": f"grp-{g:02d}"}).raise_for_status()

        def create(i: int) -> None:
            httpx.post(
                coord.url + "/api/v1/policies", json=policy(i, GROUPS), headers=headers, timeout=60
            ).raise_for_status()

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        created = time.perf_counter() - started

        declared = [policy(i, GROUPS, variant=1 if i % 10 == 0 else 0) for i in range(25, n + 25)]
        groups = [{"name": f"grp-{g:02d}"} for g in range(GROUPS)]
        expect = [
            {"from": f"grp-{i % GROUPS:02d}", "to": f"grp-{(i * 3) % GROUPS:02d}", "allowed": True, "protocol": "any"}
            for i in range(20)
        ]
        for e in expect:  # make every assertion hold, so the plan is complete
            e["allowed"] = any(
                (e["from"] in p["sources"]["groups"] and e["to"] in p["destinations"]["groups"])
                or (
                    p.get("bidirectional")
                    and e["to"] in p["sources"]["groups"]
                    and e["from"] in p["destinations"]["groups"]
                )
                for p in declared
            )

        def floor() -> int:
            with httpx.Client(base_url=coord.url, headers=headers, timeout=60) as api:
                pols = api.get("/api/v1/policies", params={"limit": 1000}).json()["items"]
                grps = api.get("/api/v1/groups", params={"limit": 1000}).json()["items"]
            return len(pols) + len(grps)

        floor_t, _ = timed(floor, args.repeat)

        collection_loader.install()
        from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorClient
        from ansible_collections.starling.mesh.plugins.modules.policy_set import PolicySet

        class Module:
            check_mode = True

            def __init__(self) -> None:
                self.client = CoordinatorClient(coord.url, coord.admin_token)
                self.params = {
                    "groups": [{**g, "description": "", "peers": None} for g in groups],
                    "policies": declared,
                    "expect": expect,
                    "exclusive": True,
                }

            def fail_json(self, **kw: Any) -> None:
                raise SystemExit(f"policy_set failed: {kw['msg']}")

        plan_t, result = timed(lambda: PolicySet(Module()).run(), args.repeat)

        colls = work / "collections" / "ansible_collections" / "starling"
        colls.mkdir(parents=True)
        (colls / "mesh").symlink_to(REPO)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(
            ANSIBLE_HOME=str(work / "home"),
            ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
            ANSIBLE_LOCALHOST_WARNING="False",
            ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
            ANSIBLE_PYTHON_INTERPRETER=sys.executable,
            STARLING_URL=coord.url,
            STARLING_TOKEN=coord.admin_token,
            PATH=f"{BIN}:{env.get('PATH', '')}",
        )
        data = work / "data.yml"
        data.write_text(yaml.safe_dump({"bench_groups": groups, "bench_policies": declared, "bench_expect": expect}))

        def play(task: dict[str, Any], *extra: str) -> Callable[[], None]:
            path = work / f"play-{next(iter(task))}.yml"
            path.write_text(
                yaml.safe_dump(
                    [
                        {
                            "hosts": "localhost",
                            "connection": "local",
                            "gather_facts": False,
                            "vars_files": [str(data)],
                            "tasks": [task],
                        }
                    ]
                )
            )

            def run() -> None:
                proc = subprocess.run(
                    [str(BIN / "ansible-playbook"), "-i", "localhost,", str(path), *extra],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=600,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"ansible-playbook failed:\n{proc.stdout[-3000:]}")

            return run

        base_t, _ = timed(play({"starling.mesh.mesh_info": {"gather": ["groups", "policies"]}}), args.repeat)
        play_t, _ = timed(
            play(
                {
                    "starling.mesh.policy_set": {
                        "groups": "{{ bench_groups }}",
                        "policies": "{{ bench_policies }}",
                        "expect": "{{ bench_expect }}",
                    }
                },
                "--check",
                "--diff",
            ),
            args.repeat,
        )
    finally:
        coord.stop()
        shutil.rmtree(work, ignore_errors=True)

    s = result["summary"]
    reach = result["reachability"]
    print(
        f"starling.mesh.policy_set bench: {n} policies, {GROUPS} groups (created in {created:.1f} s); "
        f"plan: {s['create']} create, {s['update']} update, {s['delete']} delete; reachability "
        f"+{len(reach['gained'])} / -{len(reach['lost'])} entries; {len(expect)} assertions; "
        f"{os.cpu_count()} CPUs; median of {args.repeat}"
    )
    print(f"  floor: httpx GET groups + policies           {floor_t:7.3f} s")
    print(f"  plan in-process (check mode)                 {plan_t:7.3f} s   x{plan_t / floor_t:.1f} floor")
    print(f"  baseline: ansible-playbook mesh_info         {base_t:7.3f} s")
    print(f"  ansible-playbook policy_set --check --diff   {play_t:7.3f} s   x{play_t / base_t:.2f} baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
