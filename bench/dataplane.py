"""Benchmark: the data plane through NATs. Direct and relayed throughput, latency, connect times.

Set-up (one NAT lab, see tests/fixtures/natlab.py): coordinator, signal and a real coturn on the
"public" segment 198.19.N.0/24; hosts behind their own NAT routers on 198.18.M.0/24.
- Throughput: agents `a`, `b` behind endpoint-independent (EIM) NATs (direct path), agents `c`,
  `d` behind symmetric NATs (relayed path through coturn and the agents' relay proxy). Baseline:
  a hand-configured wireguard-go tunnel between `a` and `b` through the same two NATs (each side's
  endpoint = the other router's WAN address, port preserved by EIM masquerade). iperf3 TCP, one
  stream, alternating agent/baseline per round. Printed: direct/baseline (goal >= 0.95),
  relayed/direct (goal >= 0.3), and the relay proxies' CPU time per packet.
- Latency: ping p50/p99 over the direct and the relayed tunnel (`--pings` echo requests each).
- Connect time, `--runs` runs each (fresh namespaces and routers per run, the agent's process start
  is t0, the first echo reply ends it): a new agent behind EIM to `a` (direct, goal p50 <= 1 s); a new
  agent behind symmetric NAT to `c` (relay fallback, goal p50 <= 3 s); and upgrade: two new agents
  behind symmetric NATs, relayed, then both NATs turn endpoint-independent: time until the path
  reads direct (goal <= 10 s).

Run as root from the repository root:
    PYTHONPATH=. .venv/bin/python bench/dataplane.py [--seconds 8] [--rounds 3] [--runs 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.connect import AgentRun, Bench, Pinger, keypair, loadavg, machine, pct, proc_cpu_s, spawn_agent, verdict
from bench.tunnel_throughput import IPERF_PORT, iperf
from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.coturn import CoturnProcess
from tests.fixtures.mesh import SignalProcess, wait_for
from tests.fixtures.natlab import NatHost, NatLab, Router
from tests.fixtures.netns import have_netns

HAND_PORT = 51900
HAND_IPS = ("100.127.0.1", "100.127.0.2")
GOALS = {"direct_ratio": 0.95, "relay_ratio": 0.3, "connect_direct": 1.0, "connect_relay": 3.0, "upgrade": 10.0}


class NatBench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lab = NatLab()
        self.coturn: CoturnProcess | None = None
        self.coord: CoordinatorProcess | None = None
        self.signal: SignalProcess | None = None
        self.bench: Bench | None = None
        self.agents: dict[str, AgentRun] = {}

    def start(self) -> None:
        self.lab.start()
        secret = secrets.token_urlsafe(24)
        self.coturn = CoturnProcess(self.workdir / "coturn", self.lab.public_gateway, secret=secret)
        # One allocation per agent and relayed peer; dozens of agents come and go here (coturn answers
        # "508 Cannot create socket" once its relay port range is used up).
        self.coturn.RELAY_PORT_COUNT = 400
        self.coturn.start()
        self.coord = CoordinatorProcess(
            workdir=self.workdir / "coordinator",
            config={
                "log": {"level": "warning"},
                "mesh": {"turn_servers": [self.coturn.turn_url]},
                "secrets": {"source": "config", "turn_secret": secret},
            },
            host=self.lab.public_gateway,
        )
        self.coord.start()
        self.signal = SignalProcess(self.workdir / "signal", self.lab.public_gateway, self.coord.url)
        self.signal.start()
        with self.coord.client() as api:
            api.patch("/api/v1/settings", json={"signal_url": self.signal.ws_url}).raise_for_status()
        self.bench = Bench(self.lab, self.coord, self.signal, self.workdir)  # type: ignore[arg-type]
        self.bench.policy("all", "dp", "dp")

    def close(self) -> None:
        for part in (self.signal, self.coord, self.coturn):
            if part is not None:
                part.stop()
        self.lab.close()

    def agent(self, name: str, kind: str) -> AgentRun:
        assert self.bench is not None
        router = self.lab.add_router(f"r{name}", kind)  # type: ignore[arg-type]
        host = self.lab.add_host(name, router)
        run = spawn_agent(
            self.bench,
            host,
            name,
            "dp",
            self.workdir / name,
            f"{self.lab.prefix}{name}"[:15],
            config={"log_level": "info"},
        )
        self.agents[name] = run
        return run

    def mesh_ip(self, run: AgentRun) -> str:
        wait_for(lambda: run.state() is not None, 30, what=f"{run.name} enrolled")
        return str(run.state()["mesh_ip"])  # type: ignore[index]

    def delete(self, run: AgentRun) -> None:
        assert self.bench is not None
        state = run.state()
        if state:
            self.bench.delete_peer(str(state["peer_id"]))

    def peer(self, run: AgentRun, name: str) -> dict[str, Any]:
        return next((p for p in run.status().get("peers", []) if p["name"] == name), {})


def first_reply(src: NatHost, dst_ip: str, timeout: float) -> float | None:
    pinger = Pinger(src.ns)
    try:
        return pinger.wait_reply(dst_ip, timeout)
    finally:
        pinger.close()


def hand_tunnel(lab: NatLab, hosts: list[NatHost], workdir: Path) -> None:
    """wireguard-go configured by hand between two NATed hosts: endpoint = the other router's WAN."""
    keys = [keypair(), keypair()]
    ifaces = [f"{lab.prefix}h{h.name}"[:15] for h in hosts]
    for i, host in enumerate(hosts):
        keyfile = workdir / f"hand{i}.key"
        keyfile.write_text(keys[i][0] + "\n")
        keyfile.chmod(0o600)
        host.popen(["env", "LOG_LEVEL=error", "wireguard-go", "-f", ifaces[i]], workdir / f"hand{i}.log")
        wait_for(Path(f"/var/run/wireguard/{ifaces[i]}.sock").exists, 5, interval=0.01, what="UAPI socket")
        host.exec("wg", "set", ifaces[i], "private-key", str(keyfile), "listen-port", str(HAND_PORT))
        host.exec("ip", "addr", "add", f"{HAND_IPS[i]}/24", "dev", ifaces[i])
        host.exec("ip", "link", "set", ifaces[i], "up")
    for i, host in enumerate(hosts):
        other = hosts[1 - i].router
        assert other is not None
        host.exec(
            "wg",
            "set",
            ifaces[i],
            "peer",
            keys[1 - i][1],
            "allowed-ips",
            f"{HAND_IPS[1 - i]}/32",
            "endpoint",
            f"{other.wan_ip}:{HAND_PORT}",
            "persistent-keepalive",
            "5",
        )


def ping_stats(src: NatHost, dst: str, count: int) -> dict[str, float]:
    out = src.exec("ping", "-n", "-c", str(count), "-i", "0.02", "-W", "1", dst, check=False, timeout=count + 30).stdout
    times = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    if not times:
        raise RuntimeError(f"no ping replies from {dst}")
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "replies": len(times)}


def relay_packets(runs: list[AgentRun]) -> int:
    total = 0
    for run in runs:
        for peer in run.status().get("peers", []):
            proxy = peer.get("proxy") or {}
            total += int(proxy.get("to_peer_packets", 0)) + int(proxy.get("from_peer_packets", 0))
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="iperf3 duration per measurement (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    ap.add_argument("--pings", type=int, default=200, help="echo requests per latency measurement (default 200)")
    ap.add_argument("--runs", type=int, default=10, help="connect-time runs of each kind (default 10)")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    args = ap.parse_args(argv)
    if not have_netns():
        raise SystemExit("needs root, iproute2 and /dev/net/tun")
    for tool in ("wireguard-go", "wg", "iperf3", "turnserver", "nft"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, kernel {info['kernel']}, "
        f"load {info['loadavg_start']}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-dataplane-"))
    nb = NatBench(workdir)
    res: dict[str, Any] = {"machine": info, "throughput": {"agent_direct": [], "baseline": [], "agent_relayed": []}}
    try:
        nb.start()
        a, b, c, d = nb.agent("a", "eim"), nb.agent("b", "eim"), nb.agent("c", "symmetric"), nb.agent("d", "symmetric")
        ip = {r.name: nb.mesh_ip(r) for r in (a, b, c, d)}
        for src, dst in ((a, b), (c, d)):
            if first_reply(src.host, ip[dst.name], 40) is None:  # type: ignore[arg-type]
                raise RuntimeError(f"{src.name} -> {dst.name} does not ping:\n{src.log_tail()}")
        wait_for(lambda: nb.peer(a, "b").get("path") == "direct", 15, interval=0.5, what="a-b direct")
        wait_for(lambda: nb.peer(c, "d").get("path") == "relayed", 15, interval=0.5, what="c-d relayed")
        hand_tunnel(nb.lab, [a.host, b.host], workdir)  # type: ignore[list-item]
        # Like for like: the baseline runs at the agent interface's MTU (1280), so the ratio measures
        # the data path, not the MTU choice (bench/tunnel_throughput.py shows the MTU's own share).
        agent_mtu = a.host.exec("cat", f"/sys/class/net/{a.interface}/mtu").stdout.strip()
        for host in (a.host, b.host):
            host.exec("ip", "link", "set", "dev", f"{nb.lab.prefix}h{host.name}"[:15], "mtu", agent_mtu)
        if first_reply(a.host, HAND_IPS[1], 20) is None:  # type: ignore[arg-type]
            raise RuntimeError("the hand-configured tunnel through the NATs does not ping")
        print(
            f"paths: a-b {nb.peer(a, 'b').get('path')} via {nb.peer(a, 'b').get('endpoint')}, "
            f"c-d {nb.peer(c, 'd').get('path')} ({nb.peer(c, 'd').get('local_candidate')} -> "
            f"{nb.peer(c, 'd').get('remote_candidate')})",
            flush=True,
        )
        for host in (b.host, d.host):
            host.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], workdir / f"iperf-{host.name}.log")
        time.sleep(0.5)
        proxy_cpu: list[float] = []
        for rnd in range(1, args.rounds + 1):
            kinds = ["agent_direct", "baseline", "agent_relayed"]
            for kind in kinds if rnd % 2 else [kinds[1], kinds[0], kinds[2]]:
                src, dst = {"agent_direct": (a, ip["b"]), "baseline": (a, HAND_IPS[1]), "agent_relayed": (c, ip["d"])}[
                    kind
                ]
                cpu0 = [proc_cpu_s(r.proc.pid) for r in (c, d)]
                pk0 = relay_packets([c, d]) if kind == "agent_relayed" else 0
                r = iperf(src.host, dst, args.seconds)
                if kind == "agent_relayed":
                    cpu = sum(proc_cpu_s(x.proc.pid) - y for x, y in zip((c, d), cpu0, strict=True))
                    packets = max(1, relay_packets([c, d]) - pk0)
                    r.update({"proxy_cpu_s": round(cpu, 3), "proxy_packets": packets})
                    proxy_cpu.append(cpu / packets * 1e6)
                r["round"] = rnd
                res["throughput"][kind].append(r)
                print(f"round {rnd} {kind:14} {r['mbit_s']:7.1f} Mbit/s  load {loadavg()}", flush=True)
        med = {k: statistics.median(x["mbit_s"] for x in v) for k, v in res["throughput"].items()}
        res["latency"] = {
            "direct": ping_stats(a.host, ip["b"], args.pings),
            "relayed": ping_stats(c.host, ip["d"], args.pings),
        }  # type: ignore[arg-type]
        res["proxy_cpu_us_per_packet"] = statistics.median(proxy_cpu)

        # ----- connect times ------------------------------------------------------------------
        times: dict[str, list[float]] = {"direct": [], "relay": [], "upgrade": []}
        for i in range(args.runs):
            run = nb.agent(f"e{i}", "eim")
            got = first_reply(run.host, ip["a"], 30)  # type: ignore[arg-type]
            times["direct"].append(got - run.started if got else float("inf"))
            run = nb.agent(f"s{i}", "symmetric")
            got = first_reply(run.host, ip["c"], 30)  # type: ignore[arg-type]
            times["relay"].append(got - run.started if got else float("inf"))
            print(
                f"connect run {i + 1}: direct {times['direct'][-1]:.2f} s, relay {times['relay'][-1]:.2f} s", flush=True
            )
            for name in (f"e{i}", f"s{i}"):  # gone for good: out of everyone's map
                nb.agents[name].proc.terminate()
                nb.delete(nb.agents[name])
        for i in range(max(1, args.runs // 2)):
            x, y = nb.agent(f"ux{i}", "symmetric"), nb.agent(f"uy{i}", "symmetric")
            try:
                first_reply(x.host, nb.mesh_ip(y), 40)  # type: ignore[arg-type]
                wait_for(lambda x=x, y=y: nb.peer(x, y.name).get("path") == "relayed", 30, interval=0.3, what="relayed")
                started = time.monotonic()
                for name in (x.name, y.name):
                    router: Router = nb.lab.router(f"r{name}")
                    router.set_kind("eim")
                wait_for(
                    lambda x=x, y=y: (st := nb.peer(x, y.name)).get("path") == "direct" and not st.get("proxied"),
                    60,
                    interval=0.2,
                    what="upgrade",
                )
                times["upgrade"].append(time.monotonic() - started)
                print(f"upgrade run {i + 1}: {times['upgrade'][-1]:.1f} s", flush=True)
            except AssertionError as exc:  # a failed run counts as a miss; the run goes on
                times["upgrade"].append(float("inf"))
                print(f"upgrade run {i + 1}: FAILED ({exc}); {x.name} sees {nb.peer(x, y.name)}", flush=True)
            for run in (x, y):
                run.proc.terminate()
                nb.delete(run)
        res["connect"] = {k: {"p50": pct(v, 50), "max": max(v), "runs": v} for k, v in times.items()}
    finally:
        nb.close()
        shutil.rmtree(workdir, ignore_errors=True)

    direct_ratio = med["agent_direct"] / med["baseline"]
    relay_ratio = med["agent_relayed"] / med["agent_direct"]
    lat = res["latency"]
    con = res["connect"]
    print(
        f"\niperf3 TCP, median Mbit/s: agent direct {med['agent_direct']:.1f}, "
        f"hand-configured wireguard-go {med['baseline']:.1f}, agent relayed {med['agent_relayed']:.1f}"
    )
    ok_direct, ok_relay = direct_ratio >= GOALS["direct_ratio"], relay_ratio >= GOALS["relay_ratio"]
    print(f"direct / baseline = {direct_ratio:.3f} (goal >= {GOALS['direct_ratio']}) {verdict(ok_direct)}")
    print(f"relayed / direct  = {relay_ratio:.3f} (goal >= {GOALS['relay_ratio']}) {verdict(ok_relay)}")
    print(f"relay proxy CPU: {res['proxy_cpu_us_per_packet']:.1f} us per packet (both agents, both directions)")
    print(
        f"ping direct p50 {lat['direct']['p50_ms']:.3f} ms p99 {lat['direct']['p99_ms']:.3f} ms; "
        f"relayed p50 {lat['relayed']['p50_ms']:.3f} ms p99 {lat['relayed']['p99_ms']:.3f} ms; "
        f"added p50 {lat['relayed']['p50_ms'] - lat['direct']['p50_ms']:.3f} ms"
    )
    for kind, goal in (("direct", "connect_direct"), ("relay", "connect_relay"), ("upgrade", "upgrade")):
        p50 = con[kind]["p50"]
        print(
            f"{kind:8} p50 {p50:.2f} s, max {con[kind]['max']:.2f} s over {len(con[kind]['runs'])} runs "
            f"(goal p50 <= {GOALS[goal]:g} s) {verdict(p50 <= GOALS[goal])}"
        )
    res.update({"direct_ratio": direct_ratio, "relay_ratio": relay_ratio, "medians": med})
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
