"""Benchmark: rotating the WireGuard keys of N simulated peers in Vault + coordinator.

Starts a real OpenBao (dev server, loopback) and a real `starling-coordinator serve` (SQLite), enrolls
N peers in one group with a policy between all of them (each key change is pushed into N-1 maps),
writes each peer's first key to Vault, then times, side by side:

  floor       Vault only: a new key version per peer (check-and-set on the current version)
  rotation    what rotate_keys.yml + the agent do per peer, agents simulated: new version in Vault
              (CAS), the agent's read of the latest version, `prepare` and `commit` on the coordinator
              with the peer's own credential (pushes the key to every neighbour's map)
  re-enroll   the crude alternative without rotation support: delete the peer and enroll a new key
              with a fresh setup key (the peer also loses its mesh IP and its place in policies)

each for all N peers one after the other (batch 1) and with --parallel concurrent peers (a batch).
Prints seconds and ratios; writes bench/results/rotation.json.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/rotation.py [--peers 100] [--parallel 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from starling_proto.seal import seal
from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.enroll import sealed_enroll
from tests.fixtures.openbao import dev_server
from tests.fixtures.vault_mesh import MOUNT, VaultPeers, key_path

REPO = Path(__file__).resolve().parents[1]


def run_all(fn: Callable[[int], None], n: int, parallel: int) -> float:
    started = time.perf_counter()
    if parallel <= 1:
        for i in range(n):
            fn(i)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(fn, range(n)))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=10)
    args = ap.parse_args()
    n = args.peers
    with tempfile.TemporaryDirectory(prefix="starling-bench-rot-") as tmp:
        workdir = Path(tmp)
        with dev_server(workdir / "bao") as bao:
            vault = VaultPeers(bao, workdir)
            coord = CoordinatorProcess(workdir=workdir / "coordinator", config={})
            coord.start()
            try:
                results = bench(coord, vault, n, args.parallel)
            finally:
                coord.stop()
    out = REPO / "bench" / "results" / "rotation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def bench(coord: CoordinatorProcess, vault: VaultPeers, n: int, parallel: int) -> dict[str, Any]:
    api = coord.client()
    api.post("/api/v1/groups", json={"name": "bench"})
    api.post(
        "/api/v1/policies",
        json={"name": "bench", "sources": {"groups": ["bench"]}, "destinations": {"groups": ["bench"]}},
    )
    setup = api.post("/api/v1/setup-keys", json={"name": "bench", "reusable": True, "auto_groups": ["bench"]}).json()[
        "key"
    ]
    peers: list[dict[str, Any]] = []
    for i in range(n):
        name = f"p{i:04d}"
        vault.write_key(name, cas=0)
        _, data = vault.current(name)
        private = X25519PrivateKey.from_private_bytes(base64.b64decode(data["private_key"]))
        r = sealed_enroll(coord.url, {"setup_key": setup, "hostname": name, "name": name}, private_key=private)
        assert r.status_code == 200, r.text
        peers.append(
            {
                "name": name,
                "credential": r.json()["credential"],
                "id": r.json()["peer"]["id"],
                "public": data["public_key"],
                "private": private,
            }
        )
    client = vault.client
    http = httpx.Client(base_url=coord.url, timeout=30, limits=httpx.Limits(max_connections=parallel + 2))

    def floor(i: int) -> None:
        vault.write_key(peers[i]["name"])

    def rotate(i: int) -> None:
        peer = peers[i]
        version, new_public = vault.write_key(peer["name"])  # the playbook's wireguard_key task
        latest = client.secrets.kv.v2.read_secret_version(  # the agent's key source
            path=key_path(peer["name"]), mount_point=MOUNT, raise_on_deleted_version=True
        )
        assert latest["data"]["data"]["public_key"] == new_public
        new_private = X25519PrivateKey.from_private_bytes(base64.b64decode(latest["data"]["data"]["private_key"]))
        headers = {"Authorization": f"Bearer {peer['credential']}"}
        payload = {"version": version, "source": "vault"}
        for phase in ("prepare", "commit"):  # one shared client: an agent keeps its connection too
            ch = http.post("/api/v1/challenge").json()  # each step is sealed with both keys over a fresh challenge
            wire, _ = seal(
                "rotate", [peer["private"], new_private], ch["coordinator_public_key"], ch["challenge"],
                {**payload, "phase": phase},
            )
            r = http.post("/api/v1/peer/key", json=wire, headers=headers)
            assert r.status_code == 200, r.text
        peer["public"], peer["private"] = new_public, new_private

    def reenroll(i: int) -> None:
        peer = peers[i]
        name = f"re-{peer['name']}-{time.monotonic_ns()}"
        key = api.post("/api/v1/setup-keys", json={"name": name, "auto_groups": ["bench"]}).json()["key"]
        assert api.delete(f"/api/v1/peers/{peer['id']}").status_code == 204
        private = X25519PrivateKey.generate()
        r = sealed_enroll(
            coord.url, {"setup_key": key, "hostname": peer["name"], "name": peer["name"]}, private_key=private,
            client=http,
        )
        assert r.status_code == 200, r.text
        peer["id"], peer["credential"], peer["public"] = r.json()["peer"]["id"], r.json()["credential"], r.public_key
        peer["private"] = private

    results: dict[str, Any] = {"peers": n, "parallel": parallel}
    for label, par in (("serial", 1), ("batch", parallel)):
        times = {
            "floor_s": run_all(floor, n, par),
            "rotation_s": run_all(rotate, n, par),
            "reenroll_s": run_all(reenroll, n, par),
        }
        times["rotation_over_floor"] = times["rotation_s"] / times["floor_s"]
        times["rotation_over_reenroll"] = times["rotation_s"] / times["reenroll_s"]
        times["rotation_ms_per_peer"] = 1000 * times["rotation_s"] / n
        results[label] = {k: round(v, 3) for k, v in times.items()}
        print(label, results[label], flush=True)
    # Every neighbour's map holds the final keys.
    doc = httpx.get(
        coord.url + "/api/v1/peer/map", headers={"Authorization": f"Bearer {peers[0]['credential']}"}
    ).json()
    keys = {p["name"]: p["public_key"] for p in doc["peers"]}
    assert all(keys[p["name"]] == p["public"] for p in peers[1:]), "a map does not hold the rotated key"
    api.close()
    http.close()
    return results


if __name__ == "__main__":
    main()
