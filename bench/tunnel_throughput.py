"""Benchmark: TCP throughput through an agent-managed tunnel, against a hand-configured wireguard-go tunnel.

Set-up: NetLab bridge + coordinator + signal (see bench/connect.py), two namespaces `a` and `b`,
two real agents (`starling up --foreground`, group `tp`, policy tp <-> tp) that set up their
wireguard-go tunnel themselves. In the SAME two namespaces, a second, hand-configured wireguard-go
tunnel (`wireguard-go -f`, `wg set`, `ip addr`, `ip link set up`: listen port 51900, overlay
100.127.0.1/.2, wireguard-go's default MTU 1420) is the baseline.

iperf3 TCP (one stream, `--seconds` s, default 10) from `a` to `b` over each tunnel, alternating
(agent first in odd rounds, baseline first in even rounds), `--rounds` rounds (default 3). Printed:
each measurement, the medians, and median(agent) / median(baseline). The agent's MTU is 1280 and a
hand-configured interface gets 1420, so a third, control measurement (off with --no-mtu-control)
runs the same hand-configured tunnel at MTU 1280: it tells the MTU's share of any gap from the rest.
The agents' own CPU time during their iperf3 runs is printed too (Python must stay off the data path).

Run as root from the repository root:
    PYTHONPATH=. .venv/bin/python bench/tunnel_throughput.py [--seconds 10] [--rounds 3] [--json FILE]
Goal: ratio >= 0.95, printed as MET / MISSED. Everything is removed at the end, also after failures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.connect import (
    AgentRun,
    Bench,
    Pinger,
    bench_lab,
    keypair,
    loadavg,
    machine,
    proc_cpu_s,
    spawn_agent,
    verdict,
)
from tests.fixtures.mesh import wait_for
from tests.fixtures.netns import Host

GOAL_RATIO = 0.95
BASE_PORT = 51900
BASE_IPS = ("100.127.0.1", "100.127.0.2")
IPERF_PORT = 5201


def hand_tunnel(bench: Bench, hosts: list[Host], ifaces: list[str], workdir: Path) -> None:
    """The baseline: wireguard-go configured by hand with wg and ip, in both namespaces."""
    keys = [keypair(), keypair()]
    for i, host in enumerate(hosts):
        keyfile = workdir / f"hand{i}.key"
        keyfile.write_text(keys[i][0] + "\n")
        keyfile.chmod(0o600)
        host.popen(["env", "LOG_LEVEL=error", "wireguard-go", "-f", ifaces[i]], workdir / f"hand{i}.log")
        sock = Path(f"/var/run/wireguard/{ifaces[i]}.sock")
        wait_for(sock.exists, 5, interval=0.01, what=f"{ifaces[i]} UAPI socket")
        host.exec("wg", "set", ifaces[i], "private-key", str(keyfile), "listen-port", str(BASE_PORT))
    for i, host in enumerate(hosts):
        other = hosts[1 - i]
        host.exec("wg", "set", ifaces[i], "peer", keys[1 - i][1], "allowed-ips", f"{BASE_IPS[1 - i]}/32",
                  "endpoint", f"{other.ip}:{BASE_PORT}", "persistent-keepalive", "25")
        host.exec("ip", "addr", "add", f"{BASE_IPS[i]}/24", "dev", ifaces[i])
        host.exec("ip", "link", "set", ifaces[i], "up")


def set_mtu(hosts: list[Host], ifaces: list[str], mtu: int) -> None:
    for host, iface in zip(hosts, ifaces, strict=True):
        host.exec("ip", "link", "set", "dev", iface, "mtu", str(mtu))


def link_mtu(host: Host, iface: str) -> int:
    out = host.exec("ip", "-o", "link", "show", iface).stdout.split()
    return int(out[out.index("mtu") + 1])


def iperf(client: Host, dst: str, seconds: float) -> dict[str, Any]:
    last = ""
    for _ in range(3):  # the server may still be finishing the previous test
        r = client.exec("iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                        check=False, timeout=seconds + 30)
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            doc = {"error": r.stderr or r.stdout}
        if "error" not in doc:
            end = doc["end"]
            return {"mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
                    "sent_mbit_s": end["sum_sent"]["bits_per_second"] / 1e6,
                    "retransmits": end["sum_sent"].get("retransmits"),
                    "cpu_host_pct": end.get("cpu_utilization_percent", {}).get("host_total"),
                    "cpu_remote_pct": end.get("cpu_utilization_percent", {}).get("remote_total")}
        last = str(doc["error"])
        time.sleep(1)
    raise RuntimeError(f"iperf3 to {dst} failed: {last}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration per measurement (default 10)")
    ap.add_argument("--rounds", "--runs", dest="rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--no-mtu-control", action="store_true", help="skip the hand-configured MTU 1280 runs")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (agent logs)")
    args = ap.parse_args(argv)
    for tool in ("wireguard-go", "wg", "iperf3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, kernel {info['kernel']}, "
          f"wireguard-go {info['wireguard_go']}, load {info['loadavg_start']}")
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-tput-"))
    results: dict[str, list[dict[str, Any]]] = {"agent": [], "baseline": [], "baseline_mtu1280": []}
    try:
        with bench_lab(workdir) as bench:
            bench.policy("tp-tp", "tp", "tp")
            p = bench.lab.prefix
            hosts = [bench.add_host("a"), bench.add_host("b")]
            agents: list[AgentRun] = []
            for host in hosts:
                name = host.name
                agents.append(spawn_agent(bench, host, name, "tp", workdir / name, f"{p}{name}"[:15]))
            wait_for(lambda: all(a.state() for a in agents), 30, what="agents enrolled")
            agent_dst = agents[1].state()["mesh_ip"]  # type: ignore[index]
            pinger = Pinger(hosts[0].ns)
            try:
                if pinger.wait_reply(agent_dst, 30) is None:
                    raise RuntimeError("agent tunnel a -> b does not ping:\n" + agents[0].log_tail())
                hand_ifaces = [f"{p}h{h.name}"[:15] for h in hosts]
                hand_tunnel(bench, hosts, hand_ifaces, workdir)
                if pinger.wait_reply(BASE_IPS[1], 10) is None:
                    raise RuntimeError("hand-configured tunnel a -> b does not ping")
            finally:
                pinger.close()
            def peer_b() -> dict[str, Any]:
                return next((pe for pe in agents[0].status().get("peers", []) if pe["name"] == "b"), {})

            with contextlib.suppress(AssertionError):
                wait_for(lambda: peer_b().get("path") == "direct", 10, interval=0.5, what="path direct")
            peer = peer_b()
            agent_mtu = link_mtu(hosts[0], agents[0].interface)
            hand_mtu = link_mtu(hosts[0], hand_ifaces[0])
            print(f"agent tunnel: {agent_dst}, path {peer.get('path')}, endpoint {peer.get('endpoint')}, "
                  f"MTU {agent_mtu};  hand tunnel: {BASE_IPS[1]}, MTU {hand_mtu}")
            hosts[1].popen(["iperf3", "-s", "-p", str(IPERF_PORT)], workdir / "iperf3-server.log")
            time.sleep(0.5)
            agent_pids = [a.proc.pid for a in agents]

            def measure(kind: str, rnd: int) -> None:
                if kind == "agent":
                    dst = agent_dst
                else:
                    set_mtu(hosts, hand_ifaces, 1280 if kind == "baseline_mtu1280" else hand_mtu)
                    dst = BASE_IPS[1]
                cpu0 = [proc_cpu_s(pid) for pid in agent_pids]
                res = iperf(hosts[0], dst, args.seconds)
                cpu = [proc_cpu_s(pid) - c for pid, c in zip(agent_pids, cpu0, strict=True)]
                res.update({"round": rnd, "agents_cpu_s": round(sum(cpu), 3), "loadavg": loadavg()})
                results[kind].append(res)
                print(f"round {rnd} {kind:17} {res['mbit_s']:7.1f} Mbit/s  retransmits {res['retransmits']}  "
                      f"agent processes' CPU {sum(cpu):.2f} s  load {res['loadavg']}", flush=True)

            kinds = ["agent", "baseline"] + ([] if args.no_mtu_control else ["baseline_mtu1280"])
            for rnd in range(1, args.rounds + 1):
                order = kinds if rnd % 2 else [kinds[1], kinds[0], *kinds[2:]]
                for kind in order:
                    measure(kind, rnd)
            set_mtu(hosts, hand_ifaces, hand_mtu)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {k: statistics.median(r["mbit_s"] for r in v) for k, v in results.items() if v}
    ratio = med["agent"] / med["baseline"]
    print()
    print(f"iperf3 TCP a -> b, {args.seconds:g} s each, {args.rounds} rounds (Mbit/s, receiver side)")
    print(f"{'round':8}{'agent':>12}{'baseline':>12}{'ratio':>9}" +
          ("" if args.no_mtu_control else f"{'base@1280':>12}{'agent/b1280':>13}"))
    for i in range(args.rounds):
        a, b = results["agent"][i]["mbit_s"], results["baseline"][i]["mbit_s"]
        line = f"{i + 1:<8}{a:12.1f}{b:12.1f}{a / b:9.3f}"
        if not args.no_mtu_control:
            c = results["baseline_mtu1280"][i]["mbit_s"]
            line += f"{c:12.1f}{a / c:13.3f}"
        print(line)
    line = f"{'median':8}{med['agent']:12.1f}{med['baseline']:12.1f}{ratio:9.3f}"
    if not args.no_mtu_control:
        line += f"{med['baseline_mtu1280']:12.1f}{med['agent'] / med['baseline_mtu1280']:13.3f}"
    print(line)
    print(f"\nGoal median(agent) / median(baseline) >= {GOAL_RATIO}: {ratio:.3f}  {verdict(ratio >= GOAL_RATIO)}")
    if args.json:
        doc = {"bench": "tunnel_throughput", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "loadavg_end": loadavg(), "results": results, "median_mbit_s": med, "ratio": ratio,
               "mtu": {"agent": agent_mtu, "baseline": hand_mtu},
               "goal": verdict(ratio >= GOAL_RATIO)}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
