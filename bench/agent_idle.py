"""Benchmark: an idle agent's memory and CPU with 100 peers in its map, against the same agent with 1.

Set-up: NetLab bridge + coordinator + signal (see bench/connect.py), groups `idle` (the agent) and
`fleet` (fake peers), a bidirectional policy idle <-> fleet. One fake peer is enrolled through the
API with a random X25519 key, then one real agent (`starling up --foreground`, default config:
log_level info, report_interval 5 s) starts in a namespace. The fake peers never connect: the agent
keeps one WireGuard peer per map peer and re-offers candidates through signal with its backoff.

Baseline: the agent with 1 peer in its map. It is left alone `--settle` s (default 35 s: the offer
backoff to a peer that never answers is 1, 2, 4, 8, 16 s, then 30 s, so after ~31 s it is in its
steady state), then measured over `--seconds` (default 60) of idling. Then 99 more fake peers are
enrolled (100 in its map), the same settle time passes, and the same measurement is taken.

Measured for the agent's Python process (`ip netns exec` execs, so Popen.pid is the python pid) and,
separately, its wireguard-go process: RSS (VmRSS from /proc/PID/status at the start and the end of the
window, the highest of samples every second, and VmHWM), CPU % of one core over the window
(utime + stime from /proc/PID/stat), threads. Printed side by side with ratios (100 peers / 1 peer).

Run as root from the repository root:
    PYTHONPATH=. .venv/bin/python bench/agent_idle.py [--seconds 60] [--settle 35] [--peers 100] [--json FILE]
No goal is set for this one; nothing asserts. Everything is removed at the end, also after failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.connect import (
    AgentRun,
    Bench,
    bench_lab,
    loadavg,
    machine,
    netns_pids,
    proc_comm,
    proc_status,
    spawn_agent,
)
from tests.fixtures.mesh import wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int, children: bool = False) -> int:
    """utime + stime of the process (or, children=True, cutime + cstime: its exited, waited-for children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14]) if children else int(fields[11]) + int(fields[12])


def measure(pids: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    """RSS and CPU of each process over `seconds` of wall time (sampled every second)."""
    start_ticks = {k: cpu_ticks(p) for k, p in pids.items()}
    start_child = {k: cpu_ticks(p, children=True) for k, p in pids.items()}
    start_status = {k: proc_status(p) for k, p in pids.items()}
    peak = {k: s.get("VmRSS", 0) for k, s in start_status.items()}
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - started))))
        for k, p in pids.items():
            peak[k] = max(peak[k], proc_status(p).get("VmRSS", 0))
    wall = time.monotonic() - started
    out: dict[str, dict[str, float]] = {}
    for k, p in pids.items():
        end = proc_status(p)
        ticks = cpu_ticks(p) - start_ticks[k]
        child_ticks = cpu_ticks(p, children=True) - start_child[k]
        out[k] = {"rss_start_mb": start_status[k].get("VmRSS", 0) / 1024, "rss_end_mb": end.get("VmRSS", 0) / 1024,
                  "rss_peak_mb": peak[k] / 1024, "hwm_mb": end.get("VmHWM", 0) / 1024,
                  "threads": end.get("Threads", 0), "cpu_s": ticks / CLK_TCK,
                  "cpu_pct": 100.0 * ticks / CLK_TCK / wall, "wall_s": wall,
                  "exited_children_cpu_pct": 100.0 * child_ticks / CLK_TCK / wall}
    return out


def initiations(log: Path) -> tuple[int, int]:
    """Handshake initiations in wireguard-go's debug log so far: (sent, failed for lack of an endpoint)."""
    if not log.exists():
        return 0, 0
    text = log.read_text(errors="replace")
    return text.count("Sending handshake initiation"), text.count("no known endpoint")


def enroll_fakes(bench: Bench, start: int, count: int) -> list[str]:
    def one(i: int) -> str:
        with httpx.Client() as client:
            return str(bench.enroll_fake("fleet", f"fake-{i:03d}", client)["peer"]["id"])

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(start, start + count)))


def wait_peers(agent: AgentRun, count: int, timeout: float = 60) -> None:
    def ok() -> bool:
        st = agent.status()
        return len(st.get("peers", [])) == count and bool(st.get("signal", {}).get("connected"))

    wait_for(ok, timeout, interval=0.5, what=f"agent map with {count} peers and signal connected")
    wait_for(lambda: len(agent.host.exec("wg", "show", agent.interface, "peers").stdout.split()) == count,
             timeout, interval=0.5, what=f"{count} WireGuard peers")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement window (default 60)")
    ap.add_argument("--settle", type=float, default=35.0, help="idle time before each window (default 35)")
    ap.add_argument("--peers", type=int, default=100, help="peers in the map for the main case (default 100)")
    ap.add_argument("--runs", type=int, default=1, help="measurement windows per case (default 1)")
    ap.add_argument("--wg-log-level", default="",
                    help="WG_LOG_LEVEL for the agent's wireguard-go; with `debug` the handshake initiations "
                         "wireguard-go sends in each window are counted (diagnosis; logging costs some CPU)")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (agent log)")
    args = ap.parse_args(argv)
    if shutil.which("wireguard-go") is None:
        raise SystemExit("wireguard-go is not installed")
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, kernel {info['kernel']}, "
          f"wireguard-go {info['wireguard_go']}, load {info['loadavg_start']}")
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-idle-"))
    cases: dict[str, list[dict[str, dict[str, float]]]] = {}
    try:
        with bench_lab(workdir) as bench:
            bench.policy("idle-fleet", "idle", "fleet")
            enroll_fakes(bench, 0, 1)
            host = bench.add_host("idle")
            env = {"WG_LOG_LEVEL": args.wg_log_level} if args.wg_log_level else None
            agent = spawn_agent(bench, host, "idle", "idle", workdir / "idle", f"{bench.lab.prefix}idle", env=env)
            wg_log = agent.state_dir / "logs" / f"wireguard-go-{agent.interface}.log"
            wait_peers(agent, 1)
            wg_pid = agent.wireguard_go_pid()
            if wg_pid is None:
                raise RuntimeError("no wireguard-go process in the agent's namespace")
            pids = {"agent": agent.proc.pid, "wireguard-go": wg_pid}
            for pid in netns_pids(host.ns):  # other long-lived helpers of the agent (e.g. `nft monitor`)
                if pid not in pids.values():
                    pids[f"{proc_comm(pid)}[{pid}]"] = pid
            print("measured processes: " + ", ".join(f"{k} pid {p} ({proc_comm(p)})" for k, p in pids.items()))
            for label, count in (("1 peer", 1), (f"{args.peers} peers", args.peers)):
                if count > 1:
                    enroll_fakes(bench, 1, count - 1)
                    wait_peers(agent, count)
                print(f"{label}: map ready, settling {args.settle:g} s", flush=True)
                time.sleep(args.settle)
                cases[label] = []
                for i in range(args.runs):
                    print(f"{label}: measuring {args.seconds:g} s (load {loadavg()})", flush=True)
                    before = initiations(wg_log)
                    m = measure(pids, args.seconds)
                    if args.wg_log_level:
                        sent, failed = (a - b for a, b in zip(initiations(wg_log), before, strict=True))
                        m["wireguard-go"]["initiations_per_s"] = sent / m["wireguard-go"]["wall_s"]
                        m["wireguard-go"]["no_endpoint_per_s"] = failed / m["wireguard-go"]["wall_s"]
                        print(f"  wireguard-go sent {sent} handshake initiations ({failed} failed: no endpoint)")
                    m["loadavg"] = {"end": loadavg()}  # type: ignore[dict-item]
                    cases[label].append(m)
                    for k in pids:
                        print(f"  window {i + 1} {k:18} RSS {m[k]['rss_end_mb']:6.1f} MB  CPU {m[k]['cpu_pct']:5.2f} %"
                              f"  (+ exited children {m[k]['exited_children_cpu_pct']:.2f} %)")
            status = agent.status()
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    base_label, main_label = "1 peer", f"{args.peers} peers"

    def avg(label: str, proc: str, key: str) -> float:
        vals = [w[proc][key] for w in cases[label]]
        return sum(vals) / len(vals)

    print()
    print(f"Idle agent over {args.seconds:g} s windows (after {args.settle:g} s settling); CPU in % of one core")
    print(f"{'':34}{base_label:>12}{main_label:>12}{'ratio':>9}")
    rows = [("agent (python) RSS end, MB", "agent", "rss_end_mb"),
            ("agent exited children CPU %", "agent", "exited_children_cpu_pct"),
            ("agent (python) RSS peak, MB", "agent", "rss_peak_mb"),
            ("agent (python) VmHWM, MB", "agent", "hwm_mb"), ("agent (python) CPU %", "agent", "cpu_pct"),
            ("agent (python) threads", "agent", "threads"),
            ("wireguard-go RSS end, MB", "wireguard-go", "rss_end_mb"),
            ("wireguard-go RSS peak, MB", "wireguard-go", "rss_peak_mb"),
            ("wireguard-go CPU %", "wireguard-go", "cpu_pct"), ("wireguard-go threads", "wireguard-go", "threads")]
    extra = [k for k in cases[base_label][0] if k not in ("agent", "wireguard-go", "loadavg")]
    for k in extra:
        if all(k in w for w in cases[main_label]):
            rows += [(f"{k} RSS end, MB", k, "rss_end_mb"), (f"{k} CPU %", k, "cpu_pct")]
    table: dict[str, dict[str, float]] = {}
    for title, proc, key in rows:
        base_v, main_v = avg(base_label, proc, key), avg(main_label, proc, key)
        ratio = main_v / base_v if base_v else float("nan")
        table[title] = {"base": base_v, "main": main_v, "ratio": ratio}
        print(f"{title:34}{base_v:12.2f}{main_v:12.2f}{ratio:8.2f}x")
    print(f"\nagent status at the end: {len(status.get('peers', []))} peers in map, "
          f"{sum(1 for pe in status.get('peers', []) if pe['path'] == 'connecting')} connecting")
    if args.json:
        doc = {"bench": "agent_idle", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "loadavg_end": loadavg(), "cases": cases, "table": table}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
