"""Benchmark: network-map computation of the coordinator's MeshGraph against a plain-Python baseline.

For each mesh size (seeded random: 200 groups, 500 policies, every peer in 1-3 groups) it measures,
with the baseline side by side and the ratio baseline/ours:

* full computation of every peer's map (`MeshGraph.load`, and `recompute(None)` with cold caches);
  the baseline is the obvious per-peer, per-policy implementation over Python sets of peer ids,
  and both are checked to give the same reach, rules and rule sets for 50 sampled peers;
* incremental updates: one policy's ports change, one peer joins (median of 20, different each time);
* rendering (`MapRenderer.full`) of 1,000 maps against building a dict and `json.dumps` it;
* memory: VmRSS of a fresh child process before and after building the graph.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/network_map.py [--quick] [--json FILE]
Prints results, never asserts on timings (goals are printed as MET / MISSED next to the numbers).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.engine.graph import MeshGraph, PeerNode, PolicyNode, Rule, SettingsNode
from coordinator.engine.views import MapRenderer

SEED = 42
GROUPS = 200
POLICIES = 500
VERIFY_SAMPLE = 50
INCREMENTAL_REPS = 20
RENDER_SAMPLE = 1000
BASELINE_FULL_MAX = 5000  # above this, the baseline runs on a sample of peers and is extrapolated
BASELINE_SAMPLE = 1000

GOAL_FULL_S = 1.0  # all maps of the 10k mesh
GOAL_MS_PER_1K = 50.0  # one change, per 1,000 affected peers
GOAL_RSS_MB = 500.0  # process RSS with the 10k mesh built

SETTINGS = SettingsNode(
    mesh_prefix="100.64.0.0/16", dns_domain="starling.internal", turn_servers=(), credential_ttl=3600
)


# ----- inputs -----------------------------------------------------------------------------------
@dataclass
class Mesh:
    groups: dict[str, str]
    policies: list[PolicyNode]
    peers: list[PeerNode]


def mesh_ip(index: int) -> str:
    n = index + 1
    return f"100.64.{n >> 8}.{n & 255}"


def random_ports(rng: random.Random) -> tuple[tuple[int, int], ...]:
    ports: set[tuple[int, int]] = set()
    for _ in range(rng.randint(1, 3)):
        start = rng.randint(1, 65000)
        ports.add((start, start) if rng.random() < 0.7 else (start, start + rng.randint(1, 500)))
    return tuple(sorted(ports))


def random_policy(rng: random.Random, index: int, group_ids: list[str]) -> PolicyNode:
    protocol = rng.choice(("tcp", "tcp", "udp", "any"))
    return PolicyNode(
        id=f"pol{index:04d}",
        name=f"policy-{index:04d}",
        enabled=True,
        protocol=protocol,
        ports=random_ports(rng) if protocol != "any" else (),
        bidirectional=rng.random() < 0.2,
        src_groups=frozenset(rng.sample(group_ids, rng.randint(1, 2))),
        src_peers=frozenset(),
        dst_groups=frozenset(rng.sample(group_ids, rng.randint(1, 2))),
        dst_peers=frozenset(),
    )


def random_peer(rng: random.Random, index: int, group_ids: list[str], prefix: str = "p") -> PeerNode:
    return PeerNode(
        id=f"{prefix}{index:06d}",
        name=f"{prefix}eer-{index:06d}",
        public_key=base64.b64encode(rng.randbytes(32)).decode(),
        mesh_ip=mesh_ip(index),
        approved=True,
        groups=frozenset(rng.sample(group_ids, rng.randint(1, 3))),
    )


def build_mesh(size: int, seed: int = SEED) -> Mesh:
    rng = random.Random(seed * 1_000_003 + size)
    group_ids = [f"g{i:03d}" for i in range(GROUPS)]
    groups = {gid: f"group-{gid}" for gid in group_ids}
    policies = [random_policy(rng, i, group_ids) for i in range(POLICIES)]
    peers = [random_peer(rng, i, group_ids) for i in range(size)]
    return Mesh(groups, policies, peers)


# ----- baseline: the obvious implementation ------------------------------------------------------
MapResult = tuple[set[str], tuple[Rule, ...], dict[str, set[str]]]


class Baseline:
    """Per peer, per policy, Python sets of peer ids: what straightforward control-plane code does.

    Member sets of each policy side are built once (set unions of group members); then for every
    peer, every policy is checked, and the other side's member set is unioned into the reach.
    """

    def __init__(self, peers: list[PeerNode], policies: list[PolicyNode]) -> None:
        self.peers = peers
        self.policies = [p for p in policies if p.enabled]
        members: dict[str, set[str]] = {}
        for peer in peers:
            for gid in peer.groups:
                members.setdefault(gid, set()).add(peer.id)
        self.approved = {p.id for p in peers if p.approved}
        self.sides: dict[str, tuple[set[str], set[str], set[str], set[str]]] = {}
        for pol in self.policies:
            src = set(pol.src_peers).union(*(members.get(g, ()) for g in pol.src_groups))
            dst = set(pol.dst_peers).union(*(members.get(g, ()) for g in pol.dst_groups))
            self.sides[pol.id] = (src, dst, src & self.approved, dst & self.approved)

    def peer_map(self, peer: PeerNode) -> MapResult:
        if not peer.approved:
            return set(), (), {}
        pid = peer.id
        reach: set[str] = set()
        rules: set[Rule] = set()
        sets: dict[str, set[str]] = {}
        for pol in self.policies:
            src, dst, src_ok, dst_ok = self.sides[pol.id]
            if pid in src:
                reach |= dst
                name = pol.id + ":dst"
                sets[name] = dst_ok
                rules.add(Rule(pol.id, "out", pol.protocol, pol.ports, name))
                if pol.bidirectional:
                    rules.add(Rule(pol.id, "in", pol.protocol, pol.ports, name))
            if pid in dst:
                reach |= src
                name = pol.id + ":src"
                sets[name] = src_ok
                rules.add(Rule(pol.id, "in", pol.protocol, pol.ports, name))
                if pol.bidirectional:
                    rules.add(Rule(pol.id, "out", pol.protocol, pol.ports, name))
        reach &= self.approved
        reach.discard(pid)
        return reach, tuple(sorted(rules)), sets


def baseline_all(
    peers: list[PeerNode], policies: list[PolicyNode], targets: Iterable[PeerNode]
) -> dict[str, MapResult]:
    base = Baseline(peers, policies)
    return {p.id: base.peer_map(p) for p in targets}


def baseline_render(peer: PeerNode, result: MapResult, by_id: dict[str, PeerNode], serial: int) -> str:
    """The same document as MapRenderer.full, built the obvious way: a dict, then json.dumps."""
    reach, rules, sets = result
    domain = SETTINGS.dns_domain

    def entry(node: PeerNode) -> dict[str, Any]:
        return {
            "id": node.id,
            "name": node.name,
            "public_key": node.public_key,
            "mesh_ip": node.mesh_ip,
            "allowed_ips": [node.mesh_ip + "/32"],
            "dns_name": f"{node.name}.{domain}",
        }

    me = entry(peer)
    me.update(mesh_prefix=SETTINGS.mesh_prefix, approved=peer.approved)
    doc = {
        "type": "map",
        "version": 1,
        "serial": serial,
        "peer": me,
        "dns": {"domain": domain},
        "relays": [],
        "routes": [],
        "peers": [entry(by_id[pid]) for pid in reach],
        "firewall": {
            "default_action": "drop",
            "rules": [
                {
                    "policy_id": r.policy_id,
                    "direction": r.direction,
                    "action": "accept",
                    "protocol": r.protocol,
                    "ports": [list(p) for p in r.ports],
                    "peer_set": r.peer_set,
                }
                for r in rules
            ],
            "sets": {name: [by_id[pid].mesh_ip for pid in members] for name, members in sets.items()},
        },
    }
    return json.dumps(doc, separators=(",", ":"))


COMPARED_KEYS = ("type", "serial", "peer", "dns", "peers", "firewall")  # the bulk of a map; small head fields
# added later (e.g. signal) do not change the cost comparison, so they are left out of the check


def normalized(doc: dict[str, Any]) -> dict[str, Any]:
    out = {key: doc[key] for key in COMPARED_KEYS}
    out["peers"] = sorted(doc["peers"], key=lambda e: e["id"])
    out["firewall"]["sets"] = {k: sorted(v) for k, v in doc["firewall"]["sets"].items()}
    return out


# ----- helpers ----------------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def best_of(n: int, fn: Callable[[], Any]) -> float:
    """Fastest of n runs; the garbage collector stays on, but each run starts from a fresh collection."""
    times = []
    for _ in range(n):
        gc.collect()
        times.append(timed(fn))
    return min(times)


def verdict(value: float, goal: float) -> str:
    return f"goal <= {goal:g}: {'MET' if value <= goal else 'MISSED'}"


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms" if seconds < 10 else f"{seconds:9.2f} s "


class VerificationError(AssertionError):
    pass


def verify(graph: MeshGraph, reference: dict[str, MapResult]) -> None:
    """Our maps must equal the baseline's for every sampled peer: reach, rules and rule-set members."""
    for pid, (reach, rules, sets) in reference.items():
        state = graph.maps[pid]
        ours_reach = graph.peers_in(state.reach)
        ours_sets = {name: graph.peers_in(mask) for name, mask in state.sets.items()}
        if ours_reach != reach:
            raise VerificationError(
                f"peer {pid}: reach differs (ours {len(ours_reach)}, baseline {len(reach)}, "
                f"only ours {sorted(ours_reach - reach)[:5]}, only baseline {sorted(reach - ours_reach)[:5]})"
            )
        if state.rules != rules:
            raise VerificationError(f"peer {pid}: rules differ:\n ours {state.rules[:3]}\n base {rules[:3]}")
        if ours_sets != sets:
            raise VerificationError(f"peer {pid}: rule sets differ: {sorted(ours_sets)} vs {sorted(sets)}")


# ----- one mesh size ----------------------------------------------------------------------------
ROW = "  {:9s} {:42s} {:>12s}"


def row(who: str, what: str, seconds: float, note: str = "") -> None:
    print(ROW.format(who, what, fmt_s(seconds)) + (f"   {note}" if note else ""))


@dataclass
class SizeRun:
    """State shared by the measurements of one mesh size."""

    size: int
    reps: int
    mesh: Mesh
    graph: MeshGraph
    rng: random.Random
    revision: int = 1
    base_per_peer: float = 0.0
    base_all: float = 0.0

    def next_revision(self) -> int:
        self.revision += 1
        return self.revision


def measure_full(run: SizeRun) -> dict[str, Any]:
    mesh, graph, size, reps = run.mesh, run.graph, run.size, run.reps
    ours_reps = reps + 2 if reps > 1 else 1  # ours is cheap: a few more runs against noisy neighbours
    t_load = best_of(ours_reps, lambda: graph.load(SETTINGS, mesh.groups, mesh.policies, mesh.peers, 1))

    def recompute_all() -> None:
        graph._invalidate()
        graph.recompute(None, run.next_revision())

    t_full = best_of(ours_reps, recompute_all)
    reach_sizes = [graph.maps[p.id].reach.bit_count() for p in mesh.peers]
    verify(graph, baseline_all(mesh.peers, mesh.policies, run.rng.sample(mesh.peers, VERIFY_SAMPLE)))

    gc.collect()
    if size <= BASELINE_FULL_MAX:
        t_base = best_of(reps, lambda: baseline_all(mesh.peers, mesh.policies, mesh.peers))
        note = f"all {size:,} peers, best of {reps}"
    else:
        part = run.rng.sample(mesh.peers, BASELINE_SAMPLE)
        t_setup = best_of(reps, lambda: Baseline(mesh.peers, mesh.policies))
        t_part = best_of(reps, lambda: baseline_all(mesh.peers, mesh.policies, part))
        t_base = t_setup + (t_part - t_setup) / BASELINE_SAMPLE * size
        note = f"EXTRAPOLATED from {BASELINE_SAMPLE:,} random peers, best of {reps}"
    run.base_all, run.base_per_peer = t_base, t_base / size
    goal = verdict(t_full, GOAL_FULL_S) if size >= 10_000 else ""
    print(f"full computation of every map (ours best of {ours_reps}, baseline best of {reps}):")
    row("ours", "MeshGraph.load (index + compute)", t_load)
    row("ours", "_invalidate() + recompute(None)", t_full, goal)
    row("baseline", "per-peer x per-policy Python sets", t_base, note)
    print(f"  {'ratio':9s} {'baseline / ours (recompute)':42s} {t_base / t_full:10.1f} x")
    print(f"  maps: avg {statistics.fmean(reach_sizes):,.0f} peers reachable per peer (max {max(reach_sizes):,});"
          f" {VERIFY_SAMPLE} sampled peers have identical reach, rules and sets in both")
    return {"load_s": t_load, "recompute_all_s": t_full, "baseline_s": t_base,
            "baseline_extrapolated": size > BASELINE_FULL_MAX, "ratio": t_base / t_full,
            "avg_reach": statistics.fmean(reach_sizes), "max_reach": max(reach_sizes), "verified_peers": VERIFY_SAMPLE}


def measure_incremental(run: SizeRun) -> dict[str, Any]:
    graph, rng = run.graph, run.rng
    policy_runs: list[tuple[float, int, int]] = []
    candidates = [p for p in run.mesh.policies if p.protocol in ("tcp", "udp")]
    for pol in rng.sample(candidates, INCREMENTAL_REPS):
        new_ports = tuple(sorted({*pol.ports[1:], (pol.ports[0][0] % 65000 + 1,) * 2}))
        changed_pol = dataclasses.replace(pol, ports=new_ports)
        revision = run.next_revision()
        started = time.perf_counter()
        affected = graph.upsert_policy(changed_pol)
        changed = graph.recompute(affected, revision)
        policy_runs.append((time.perf_counter() - started, len(affected), len(changed)))
    join_runs: list[tuple[float, int, int]] = []
    group_ids = list(run.mesh.groups)
    for i in range(INCREMENTAL_REPS):
        node = random_peer(rng, run.size + i, group_ids, prefix="j")
        revision = run.next_revision()
        started = time.perf_counter()
        affected = graph.upsert_peer(node, revision)
        changed = graph.recompute(affected, revision)
        join_runs.append((time.perf_counter() - started, len(affected), len(changed)))
        graph.recompute(graph.remove_peer(node.id), run.next_revision())  # untimed: back to the same mesh
    # The incremental path must agree with the reference too (the policies now carry new ports).
    verify(graph, baseline_all(run.mesh.peers, list(graph.policies.values()),
                               rng.sample(run.mesh.peers, VERIFY_SAMPLE)))

    out: dict[str, Any] = {}
    print(f"incremental update (median of {INCREMENTAL_REPS}, a different policy / peer each time;"
          f" {VERIFY_SAMPLE} more sampled peers verified against the baseline afterwards):")
    for label, key, runs in (("policy ports change", "policy_change", policy_runs),
                             ("one peer joins", "peer_join", join_runs)):
        t_med = statistics.median(r[0] for r in runs)
        affected_med = statistics.median(r[1] for r in runs)
        changed_med = statistics.median(r[2] for r in runs)
        per_1k = statistics.median(r[0] * 1e6 / max(r[1], 1) for r in runs)
        base_affected = run.base_per_peer * affected_med
        row("ours", f"{label} (upsert + recompute)", t_med,
            f"{affected_med:,.0f} affected ({changed_med:,.0f} changed), {per_1k:.1f} ms per 1k affected"
            f"   {verdict(per_1k, GOAL_MS_PER_1K)}")
        row("baseline", "recompute the affected peers only", base_affected,
            f"per-peer cost x affected; ratio {base_affected / t_med:,.1f} x")
        row("baseline", "recompute every map (no incremental path)", run.base_all,
            f"ratio {run.base_all / t_med:,.0f} x")
        out[key] = {"median_s": t_med, "median_affected": affected_med, "median_changed": changed_med,
                    "ms_per_1k_affected": per_1k, "baseline_affected_s": base_affected,
                    "baseline_all_s": run.base_all,
                    "runs": [{"s": r[0], "affected": r[1], "changed": r[2]} for r in runs]}
    return out


def measure_render(run: SizeRun) -> dict[str, Any]:
    graph, peers = run.graph, run.rng.sample(run.mesh.peers, min(RENDER_SAMPLE, run.size))
    renderer = MapRenderer(graph)
    started = time.perf_counter()
    sizes = [len(renderer.full(p.id, [])) for p in peers]
    t_cold = time.perf_counter() - started
    t_warm = timed(lambda: [renderer.full(p.id, []) for p in peers])
    base = Baseline(run.mesh.peers, list(graph.policies.values()))
    by_id = {p.id: p for p in run.mesh.peers}
    maps = {p.id: base.peer_map(p) for p in peers}
    serial = {p.id: graph.maps[p.id].serial for p in peers}
    t_base = timed(lambda: [baseline_render(p, maps[p.id], by_id, serial[p.id]) for p in peers])
    for p in peers[:20]:
        ours = normalized(json.loads(renderer.full(p.id, [])))
        if ours != normalized(json.loads(baseline_render(p, maps[p.id], by_id, serial[p.id]))):
            raise VerificationError(f"peer {p.id}: rendered map differs from the baseline rendering")
    n = len(peers)
    avg_bytes = statistics.fmean(sizes)
    avg_peers = statistics.fmean(graph.maps[p.id].reach.bit_count() for p in peers)
    print(f"rendering MapRenderer.full of {n:,} maps (avg {avg_bytes:,.0f} bytes, {avg_peers:,.0f} peers per map):")
    row("ours", "fresh renderer (cold entry/set caches)", t_cold, f"{t_cold / n * 1000:.2f} ms/map")
    row("ours", "same renderer again (warm caches)", t_warm, f"{t_warm / n * 1000:.2f} ms/map")
    row("baseline", "build a dict + json.dumps", t_base, f"{t_base / n * 1000:.2f} ms/map")
    print(f"  {'ratio':9s} {'baseline / ours (cold)':42s} {t_base / t_cold:10.1f} x"
          "   (20 maps verified equal after parsing)")
    return {"maps": n, "cold_s": t_cold, "warm_s": t_warm, "baseline_s": t_base, "ratio_cold": t_base / t_cold,
            "avg_bytes": avg_bytes, "avg_peers": avg_peers}


def bench_size(size: int, *, reps: int, memory: bool) -> dict[str, Any]:
    print(f"\n== {size:,} peers, {GROUPS} groups, {POLICIES} policies (seed {SEED}) ==")
    run = SizeRun(size=size, reps=reps, mesh=build_mesh(size), graph=MeshGraph(), rng=random.Random(SEED + size))
    out: dict[str, Any] = {"peers": size, "groups": GROUPS, "policies": POLICIES}
    out["full"] = measure_full(run)
    out["rss_mb_after_build"] = rss_mb()
    out["incremental"] = measure_incremental(run)
    out["render"] = measure_render(run)
    if memory:
        out["memory"] = memory_probe(size)
    return out


# ----- memory, in a fresh child process --------------------------------------------------------
def memory_child(size: int) -> None:
    gc.collect()
    before_inputs = rss_mb()
    mesh = build_mesh(size)
    gc.collect()
    before_graph = rss_mb()
    graph = MeshGraph()
    graph.load(SETTINGS, mesh.groups, mesh.policies, mesh.peers, 1)
    gc.collect()
    after_graph = rss_mb()
    renderer = MapRenderer(graph)
    for pid in list(graph.peers)[:RENDER_SAMPLE]:
        renderer.full(pid, [])
    gc.collect()
    after_render = rss_mb()
    print(json.dumps({
        "rss_before_inputs_mb": before_inputs, "rss_before_graph_mb": before_graph,
        "rss_after_graph_mb": after_graph, "rss_after_render_mb": after_render, "hwm_mb": rss_mb("VmHWM"),
    }))


def memory_probe(size: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--memory-child", str(size)],
                          capture_output=True, text=True, check=True, env=env, timeout=600)
    mem: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    graph_mb = mem["rss_after_graph_mb"] - mem["rss_before_inputs_mb"]
    compute_mb = mem["rss_after_graph_mb"] - mem["rss_before_graph_mb"]
    line = (f"memory (fresh process): RSS {mem['rss_after_graph_mb']:,.0f} MB with the graph built"
            f" (interpreter + imports {mem['rss_before_inputs_mb']:,.0f} MB); graph incl. peer/policy nodes"
            f" +{graph_mb:,.0f} MB, of which maps/indexes +{compute_mb:,.0f} MB;"
            f" after rendering {RENDER_SAMPLE:,} maps {mem['rss_after_render_mb']:,.0f} MB")
    if size >= 10_000:
        line += f"   {verdict(mem['rss_after_graph_mb'], GOAL_RSS_MB)} (MB)"
    print(line)
    return {**mem, "graph_mb": graph_mb, "maps_mb": compute_mb}


# ----- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,5000,10000", help="comma-separated mesh sizes (peers)")
    ap.add_argument("--quick", action="store_true", help="1,000 peers only, best of 1 (smoke test)")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    reps = 1 if args.quick else 3
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"network map benchmark: Python {platform.python_version()}, {os.cpu_count()} CPUs ({cpu})")
    print(f"goals: all 10k maps <= {GOAL_FULL_S:g} s; one change <= {GOAL_MS_PER_1K:g} ms per 1k affected peers;"
          f" RSS at 10k <= {GOAL_RSS_MB:g} MB")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "network_map", "python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu,
        "seed": SEED, "sizes": [bench_size(size, reps=reps, memory=not args.quick) for size in sizes],
    }
    results["rss_mb_end"] = rss_mb()
    results["hwm_mb_end"] = rss_mb("VmHWM")
    results["wall_s"] = time.perf_counter() - started
    print(f"\nthis process: VmRSS {results['rss_mb_end']:,.0f} MB, peak VmHWM {results['hwm_mb_end']:,.0f} MB"
          f" (all sizes and the baseline's sets); wall time {results['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
