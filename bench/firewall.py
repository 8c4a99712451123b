"""Benchmark: the agent firewall (agent/firewall) on real nftables, in network namespaces.

Workload: one peer's map with `--peers` peers (default 1,000) in `--groups` groups (each peer in 3),
and `--rules` rules (default 200: half as many bidirectional policies, each an "in" and an "out"
rule on the set of the other side's group; tcp/udp with ports, icmp, any). `--heavy` makes every
set hold every peer (the worst case for element counts).

Measured inside a fresh namespace (nft runs natively there), median of `--repeat` runs:
* full apply: guard -> complete ruleset (`Firewall.apply`, validation included);
* incremental: one peer joins its group (it appears in every set that names the group), and leaves;
* drift: a quiet `check_drift()` with `nft monitor` vs a full listing (the polling fallback), and
  the repair after `nft delete table inet starling`.
Baseline, side by side: the naive approach, one nft rule per (rule x peer) with addresses inline and
the whole table rebuilt for every change (`nft -f` of the full text).
Unless --no-iperf: iperf3 TCP throughput across a veth pair between two namespaces, alternating
firewall off, "off + conntrack" (a foreign table that uses conntrack, as on Docker/k3s hosts) and on
(both ends enforcing the big map plus the rule that admits iperf3), goal ratio on/off >= 0.97; also
iperf3's own CPU-seconds per GB, steadier than throughput on a shared machine. --only-iperf skips
the rest. The naive baseline is skipped above 60k rules (--heavy).

Run from the repository root, as root:
    PYTHONPATH=. .venv/bin/python bench/firewall.py [--quick] [--heavy | --distinct] [--json FILE]
    PYTHONPATH=. .venv/bin/python bench/firewall.py --only-iperf --iperf-rounds 10 --iperf-seconds 3
Goals (printed MET / MISSED): full apply <= 200 ms, incremental <= 50 ms, iperf3 ratio >= 0.97.
Namespaces are named fwb<hex>-*, and deleted at the end, also after a failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.firewall import Firewall, compile_firewall, full_build
from agent.firewall.nft import Monitor, Nft

IFACE = "mesh0"
GOAL_FULL_MS, GOAL_INCR_MS, GOAL_RATIO = 200.0, 50.0, 0.97
NAIVE_MAX_RULES = 60_000


def ip_of(i: int) -> str:
    n = i + 2  # 100.64.0.1 is this peer
    return f"100.64.{n // 250}.{n % 250 + 1}"


def fw_rule(pid: str, direction: str, proto: str, ports: list[list[int]], peer_set: str) -> dict[str, Any]:
    keys = ("policy_id", "direction", "action", "protocol", "ports", "peer_set")
    return dict(zip(keys, (pid, direction, "accept", proto, ports, peer_set), strict=True))


def workload(peers: int, rules: int, groups: int, heavy: bool, distinct: bool = False) -> dict[str, Any]:
    rng = random.Random(1)
    members: dict[int, set[str]] = {g: set() for g in range(groups)}
    for i in range(peers):
        for g in rng.sample(range(groups), 3):
            members[g].add(ip_of(i))
    everyone = [ip_of(i) for i in range(peers)]
    fw_rules, sets, group_of = [], {}, {}
    for p in range(rules // 2):
        pid = secrets.token_hex(12)
        g = rng.randrange(groups)
        name = f"{pid}:{rng.choice(['src', 'dst'])}"
        size = len(members[g])
        sets[name] = everyone if heavy else sorted(rng.sample(everyone, size) if distinct else members[g])
        group_of[name] = g
        proto = ("tcp", "udp", "icmp", "any")[p % 4]
        ports = [[p * 10 + 1000, p * 10 + 1000]] if proto in ("tcp", "udp") else []
        if proto == "tcp" and p % 8 == 0:
            ports.append([20000 + p, 20100 + p])
        fw_rules += [fw_rule(pid, direction, proto, ports, name) for direction in ("in", "out")]
    return {"default_action": "drop", "rules": fw_rules, "sets": sets, "_group_of": group_of}


def public(fw_map: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fw_map.items() if not k.startswith("_")}


def with_peer(fw_map: dict[str, Any], ip: str, group: int | None) -> dict[str, Any]:
    """The map after a peer joins `group` (None: every set, as in --heavy where sets hold everyone)."""
    sets = {
        n: ([*ips, ip] if group is None or fw_map["_group_of"][n] == group else ips)
        for n, ips in fw_map["sets"].items()
    }
    return {**public(fw_map), "sets": sets}


def naive_text(fw_map: dict[str, Any]) -> tuple[str, int]:
    """One rule per (rule x peer), rebuilt whole: what a per-peer iptables-style agent does."""
    chains: dict[str, list[str]] = {"in": [], "out": []}
    for r in fw_map["rules"]:
        field = "saddr" if r["direction"] == "in" else "daddr"
        match = ""
        if r["ports"]:
            items = [str(a) if a == b else f"{a}-{b}" for a, b in r["ports"]]
            match = f" {r['protocol']} dport {{ {', '.join(items)} }}"
        elif r["protocol"] != "any":
            match = f" meta l4proto {r['protocol']}"
        chains[r["direction"]] += [f"ip {field} {ip}{match} accept" for ip in fw_map["sets"][r["peer_set"]]]
    lines = ["add table inet naive", "delete table inet naive", "table inet naive {"]
    for direction, hook, key in (("in", "input", "iifname"), ("out", "output", "oifname")):
        lines += [
            f"chain {hook} {{",
            f"type filter hook {hook} priority filter; policy accept;",
            f'{key} != "{IFACE}" accept',
            "ct state established,related accept",
            *chains[direction],
            "drop",
            "}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n", len(chains["in"]) + len(chains["out"])


def timed_nft(text: str) -> float:
    started = time.perf_counter()
    subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)
    return (time.perf_counter() - started) * 1000


def inner(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the benchmark namespace: every nft call is native."""
    fw_map = workload(args.peers, args.rules, args.groups, args.heavy, args.distinct)
    model = compile_firewall(public(fw_map), IFACE)
    out: dict[str, Any] = {"rules": model.rule_count, "sets": len(model.sets), "elements": model.element_count}
    out.update(map_sets=len(fw_map["sets"]), map_elements=sum(map(len, fw_map["sets"].values())))
    started = time.perf_counter()
    for _ in range(args.repeat):
        compile_firewall(public(fw_map), IFACE)
    out["validate_ms"] = (time.perf_counter() - started) * 1000 / args.repeat
    fw = Firewall(IFACE)
    full = []
    for _ in range(args.repeat):
        fw.remove()
        fw.install_guard()
        full.append(fw.apply(public(fw_map)).duration_ms)
    out["full_ms"] = full
    nft, rebuild = Nft(), []
    for _ in range(args.repeat):
        t = time.perf_counter()
        nft.apply(full_build(model).commands)
        rebuild.append((time.perf_counter() - t) * 1000)
    out["rebuild_ms"] = rebuild
    fw.remove()
    fw.install_guard()
    fw.apply(public(fw_map))
    joiner, group = ip_of(args.peers + 5), 0
    grown = with_peer(fw_map, joiner, None if args.heavy else group)
    added, removed, touched = [], [], 0
    for _ in range(args.repeat):
        result = fw.apply(grown)
        added.append(result.duration_ms)
        touched = result.elements_added
        removed.append(fw.apply(public(fw_map)).duration_ms)
    joined_sets = sum(1 for g in fw_map["_group_of"].values() if g == group or args.heavy)
    out.update(incr_add_ms=added, incr_remove_ms=removed, joiner_elements=touched, joiner_sets=joined_sets)
    time.sleep(Monitor.WARMUP + 0.5)  # past the monitor's warm-up: quiet checks trust it
    fw.check_drift()
    quiet = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        fw.check_drift()
        quiet.append((time.perf_counter() - t) * 1000)
    poll = Firewall(IFACE, monitor=False)
    poll.install_guard()
    poll.apply(public(fw_map))
    polled = []
    for _ in range(max(3, args.repeat // 2)):
        t = time.perf_counter()
        poll.check_drift()
        polled.append((time.perf_counter() - t) * 1000)
    repair = []
    for _ in range(max(3, args.repeat // 2)):
        subprocess.run(["nft", "delete", "table", "inet", "starling"], check=True)
        t = time.perf_counter()
        assert poll.check_drift()
        repair.append((time.perf_counter() - t) * 1000)
    out.update(quiet_check_ms=quiet, poll_check_ms=polled, repair_ms=repair)
    fw.close()
    poll.remove()
    text, naive_rules = naive_text(public(fw_map))
    text2, _ = naive_text(grown)
    runs = 1 if args.quick else 2  # the naive rebuild takes seconds
    out["naive_rules"] = naive_rules
    if naive_rules > NAIVE_MAX_RULES:  # minutes per rebuild: not worth waiting for
        out["naive_full_ms"] = out["naive_incr_ms"] = [float("nan")]
        return out
    out["naive_full_ms"] = [timed_nft(text) for _ in range(runs)]
    out["naive_incr_ms"] = [timed_nft(text2 if i % 2 == 0 else text) for i in range(runs)]
    subprocess.run(["nft", "delete", "table", "inet", "naive"], check=False)
    return out


# ----- namespaces and iperf3 ----------------------------------------------------------------------
def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=1800)


def iperf(
    prefix: str, seconds: int, firewalls: list[Firewall] | None, fw_map: dict[str, Any], cpu: list[float]
) -> float:
    """Gbit/s; appends to `cpu` the CPU-seconds both iperf3 ends spent per GB (less load-sensitive)."""
    a, b = f"{prefix}-a", f"{prefix}-b"
    server = subprocess.Popen(
        ["ip", "netns", "exec", b, "iperf3", "-s", "-1", "-B", "100.64.0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        if firewalls:
            for fw, peer in zip(firewalls, ("100.64.0.2", "100.64.0.1"), strict=True):
                m = public(fw_map)
                extra = [fw_rule("iperf", d, "tcp", [[5201, 5201]], "iperf") for d in ("in", "out")]
                m = {**m, "sets": {**m["sets"], "iperf": [peer]}, "rules": [*m["rules"], *extra]}
                fw.apply(m)
        out = sh("ip", "netns", "exec", a, "iperf3", "-J", "-c", "100.64.0.2", "-t", str(seconds))
        end = json.loads(out.stdout)["end"]
        usage = end["cpu_utilization_percent"]
        gigabytes = end["sum_received"]["bytes"] / 1e9
        cpu.append((usage["host_total"] + usage["remote_total"]) / 100 * seconds / gigabytes)
        return float(end["sum_received"]["bits_per_second"]) / 1e9
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(5)


def run_iperf(prefix: str, args: argparse.Namespace, fw_map: dict[str, Any]) -> dict[str, Any]:
    a, b = f"{prefix}-a", f"{prefix}-b"
    sh("ip", "netns", "add", b)
    sh("ip", "link", "add", f"{prefix}m0", "netns", a, "type", "veth", "peer", "name", f"{prefix}m1", "netns", b)
    for ns, dev, ip in ((a, f"{prefix}m0", "100.64.0.1"), (b, f"{prefix}m1", "100.64.0.2")):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    fws = [
        Firewall(f"{prefix}m0", nft=["ip", "netns", "exec", a, "nft"]),
        Firewall(f"{prefix}m1", nft=["ip", "netns", "exec", b, "nft"]),
    ]
    off: list[float] = []
    off_ct: list[float] = []
    on: list[float] = []
    cpu: dict[str, list[float]] = {"off": [], "off_ct": [], "on": []}
    # "off + conntrack": another table that uses conntrack (as Docker or k3s do) but filters nothing,
    # to separate the cost of conntrack itself (which our table turns on) from our rules.
    ct_table = "\n".join(
        [
            "table inet bench_ct {",
            "chain c {",
            "type filter hook input priority 10; policy accept;",
            'iifname "lo" ct state established accept',
            "}",
            "}",
            "",
        ]
    )
    try:
        for _ in range(args.iperf_rounds):
            for fw in fws:
                fw.remove()
            off.append(iperf(prefix, args.iperf_seconds, None, fw_map, cpu["off"]))
            for ns in (a, b):
                subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ct_table, text=True, check=True)
            off_ct.append(iperf(prefix, args.iperf_seconds, None, fw_map, cpu["off_ct"]))
            for ns in (a, b):
                sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "bench_ct")
            for fw in fws:
                fw.install_guard()
            on.append(iperf(prefix, args.iperf_seconds, fws, fw_map, cpu["on"]))
    finally:
        for fw in fws:
            fw.close()
    return {
        "iperf_off_gbps": off,
        "iperf_off_ct_gbps": off_ct,
        "iperf_on_gbps": on,
        "cpu_s_per_gb": cpu,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    med = statistics.median
    if "full_ms" not in r:
        return report_iperf(r, args)

    def goal(value: float, limit: float, smaller: bool = True) -> str:
        return "MET" if (value <= limit if smaller else value >= limit) else "MISSED"

    full, incr = med(r["full_ms"]), med(r["incr_add_ms"] + r["incr_remove_ms"])
    nfull, nincr = med(r["naive_full_ms"]), med(r["naive_incr_ms"])
    kind = " (heavy: every set holds every peer)" if args.heavy else ""
    kind += " (distinct: no two sets equal)" if args.distinct else ""
    print(f"\nFirewall: {args.peers:,} peers, {r['rules']} rules{kind}; median of {args.repeat}")
    print(
        f"  map: {r['map_sets']} sets, {r['map_elements']:,} addresses -> installed: {r['sets']} nft sets "
        f"(equal sets shared), {r['elements']:,} elements"
    )
    print(f"{'':46}{'starling':>10}{'naive':>12}{'ratio':>9}   goal")
    naive_full = f"{nfull:12.1f}{nfull / full:8.1f}x" if nfull == nfull else f"{'skipped':>12}{'':9}"
    naive_incr = f"{nincr:12.1f}{nincr / incr:8.1f}x" if nincr == nincr else f"{'skipped':>12}{'':9}"
    print(
        f"{'full apply (guard -> ruleset), ms':46}{full:10.1f}{naive_full}"
        f"   <= {GOAL_FULL_MS:.0f} ms {goal(full, GOAL_FULL_MS)}"
    )
    label = f"incremental (a peer joins {r['joiner_sets']} map sets), ms"
    print(f"{label:46}{incr:10.1f}{naive_incr}   <= {GOAL_INCR_MS:.0f} ms {goal(incr, GOAL_INCR_MS)}")
    print(f"{'nft rules in the table':46}{r['rules'] + 7:10,}{r['naive_rules'] + 8:12,}")
    p95 = sorted(r["incr_add_ms"])[int(0.95 * (len(r["incr_add_ms"]) - 1))]
    print(
        f"  validation+compilation {r['validate_ms']:.1f} ms; incremental = {r['joiner_elements']} element add, "
        f"p95 {p95:.1f} ms; full rebuild (atomic table replace, one batch) {med(r['rebuild_ms']):.1f} ms"
    )
    print(
        f"drift check while quiet: {med(r['quiet_check_ms']):.2f} ms with nft monitor, "
        f"{med(r['poll_check_ms']):.1f} ms polling (full listing); "
        f"repair after `nft delete table`: {med(r['repair_ms']):.1f} ms (listing, rebuild, re-check)"
    )
    report_iperf(r, args)


def report_iperf(r: dict[str, Any], args: argparse.Namespace) -> None:
    med = statistics.median
    if "iperf_on_gbps" in r:
        off, off_ct, on = med(r["iperf_off_gbps"]), med(r["iperf_off_ct_gbps"]), med(r["iperf_on_gbps"])
        verdict = "MET" if on / off >= GOAL_RATIO else "MISSED"
        print(
            f"iperf3 TCP over veth, {args.iperf_rounds} x {args.iperf_seconds} s, medians: off {off:.2f} Gbit/s, "
            f"off + conntrack {off_ct:.2f}, on {on:.2f}; ratio on/off {on / off:.3f} (goal >= {GOAL_RATIO}) "
            f"{verdict}, on/(off + conntrack) {on / off_ct:.3f}"
        )
        print(
            f"  runs: off {_gbps(r['iperf_off_gbps'])}; off + conntrack {_gbps(r['iperf_off_ct_gbps'])}; "
            f"on {_gbps(r['iperf_on_gbps'])}"
        )
        c = {k: med(v) for k, v in r["cpu_s_per_gb"].items()}
        print(
            f"  iperf3 CPU-seconds per GB moved (both ends, medians): off {c['off']:.3f}, "
            f"off + conntrack {c['off_ct']:.3f}, on {c['on']:.3f}; throughput-equivalent ratio "
            f"off/on {c['off'] / c['on']:.3f}, (off + conntrack)/on {c['off_ct'] / c['on']:.3f}"
        )


def _gbps(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--heavy", action="store_true", help="every set holds every peer")
    parser.add_argument("--distinct", action="store_true", help="every set a different random sample (no sharing)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, no iperf3")
    parser.add_argument("--no-iperf", action="store_true")
    parser.add_argument("--only-iperf", action="store_true", help="skip the apply/drift/naive measurements")
    parser.add_argument("--iperf-seconds", type=int, default=4)
    parser.add_argument("--iperf-rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.no_iperf = 3, True
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    if os.geteuid() != 0 or not shutil.which("nft"):
        print("bench/firewall.py needs root and nftables (it creates network namespaces)", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    prefix = "fwb" + secrets.token_hex(2)
    try:
        sh("ip", "netns", "add", f"{prefix}-a")
        cmd = [
            "ip",
            "netns",
            "exec",
            f"{prefix}-a",
            sys.executable,
            __file__,
            "--inner",
            "--peers",
            str(args.peers),
            "--rules",
            str(args.rules),
            "--groups",
            str(args.groups),
            "--repeat",
            str(args.repeat),
        ]
        cmd += ["--heavy"] * args.heavy + ["--distinct"] * args.distinct + ["--quick"] * args.quick
        results = {} if args.only_iperf else json.loads(sh(*cmd).stdout)
        if not args.no_iperf and shutil.which("iperf3"):
            fw_map = workload(args.peers, args.rules, args.groups, args.heavy, args.distinct)
            results.update(run_iperf(prefix, args, fw_map))
        report(results, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        for side in ("a", "b"):
            sh("ip", "netns", "del", f"{prefix}-{side}", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
