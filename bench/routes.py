"""Benchmark: network routes (issue 16). Routed throughput, failover time, map size and apply time.

1. **Throughput** (real agents in namespaces, the layout of tests/integration/test_routes.py): clients
   `c1` (group staff), routing peers `gw1` (metric 10) and `gw2` (metric 20) for the "clinic" LAN
   198.19.N.0/24 (masquerade on, the default), where a plain namespace `lanhost` (.10, no agent) sits.
   iperf3 TCP, one stream, a fixed `--size` (default 300 MB) from c1, alternating per round:
   *routed* to the LAN host through gw1 (decrypt, forward, masquerade, out the LAN veth), and *direct*
   to gw1's own mesh IP (the same tunnel, no forwarding). Printed: each transfer, the medians, and
   median(routed) / median(direct) (goal >= 0.8).
2. **Failover** (`--failover-runs`, default 10): continuous ping from c1 to the LAN host every 0.1 s;
   after 2 s gw1's underlay goes down (`ip link set eth0 down` in its namespace). Lost pings x 0.1 s
   is the outage (goal p50 and max <= 5 s); the longest run of consecutive lost pings is printed too.
   Then gw1 comes back, and the run waits for the fail-back to gw1 (after FAILBACK_HOLD), with a
   second ping running to count any loss during the fail-back.
3. **Map size and apply time with `--routes` routes** (default 500). Coordinator, in-process (as
   bench/network_map.py): a seeded mesh of `--peers` peers (default 1,000; 200 groups, 500 policies)
   plus 500 routes (/24s in 198.18.0.0/15, each routed by one routing peer `gw` with metric 10 and a
   second one with metric 20) and 100 policies from a 50-peer staff group to 5 routes each. A client
   of those routes gets 500 route entries and 500 route rules; `gw` forwards all 500 (500 forward
   rules, masquerade). Baseline: the same mesh without routes and route policies, the same two peers.
   Printed: MeshGraph.load, map bytes, MapRenderer.full cold/warm, ratios to the baseline.
   Agent, inside a fresh namespace (`rb<hex>`, real nft, a wireguard-go device as the mesh interface):
   parse (json + contract + NetworkMap), firewall compile, Firewall.apply first (guard -> ruleset) and
   again (same map: no change), WireGuard allowed IPs of the active router (UAPI set_peer with 500
   prefixes), and KernelRoutes.apply of the 500-prefix RoutingPlan: first, again (must do 0 writes),
   remove; with `ip -batch` of the same 500 routes as a reference floor.

Run as root from the repository root:
    PYTHONPATH=. .venv/bin/python bench/routes.py [--quick] [--json FILE]
    PYTHONPATH=. .venv/bin/python bench/routes.py --rounds 5 --size 300M --failover-runs 10
`--quick`: 2 throughput rounds of 100 MB, 3 failover runs, 2 repetitions of the map measurements.
Nothing asserts on timings: goals are printed as MET / MISSED. Every namespace, process and socket
the bench creates is removed at the end, also after a failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from bench.connect import keypair, loadavg, machine, pct, sigterm_as_exit, verdict

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.8
GOAL_FAILOVER_S = 5.0
PING_INTERVAL = 0.1
IPERF_PORT = 5201
STAFF_SIZE = 50
ROUTE_POLICIES = 100


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed_ms(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


# ===== 1 + 2: the routed lab ======================================================================
@contextlib.contextmanager
def routed_lab(workdir: Path) -> Iterator[dict[str, Any]]:
    """c1 (staff), gw1/gw2 (gateways) as real agents; the clinic LAN with lanhost; route + policies."""
    from tests.fixtures.mesh import Mesh, control_plane
    from tests.fixtures.netns import netlab
    from tests.integration.test_routes import Segment, plain_host

    direct: dict[str, Any] = {  # c1 -> the routing peers' own mesh IPs: the direct measurement and its ping
        "name": "staff-gateways",
        "protocol": "tcp",
        "ports": [str(IPERF_PORT)],
        "sources": {"groups": ["staff"]},
        "destinations": {"groups": ["gateways"]},
    }
    with (
        netlab() as lab,
        control_plane(workdir, lab.gateway, groups=("staff", "gateways"), policies=(direct,)) as (coord, signal),
        contextlib.ExitStack() as stack,
    ):
        o = lab.octet
        lan = Segment(lab, "lan", f"198.19.{o}.0/24")
        stack.callback(lan.close)
        m = Mesh(lab, coord, signal, workdir)
        hosts = {name: lab.add_host(name) for name in ("gw1", "gw2", "c1")}
        lanhost = plain_host(lab, "lanhost")
        lan.attach(hosts["gw1"], f"198.19.{o}.2", "lan0")
        lan.attach(hosts["gw2"], f"198.19.{o}.3", "lan0")
        lan.attach(lanhost, f"198.19.{o}.10", "eth0")
        for name, group in (("gw1", "gateways"), ("gw2", "gateways"), ("c1", "staff")):
            m.start_agent(name, [group], host=hosts[name], config={"log_level": "info"})
        with m.api() as api:
            body: dict[str, Any] = {
                "name": "clinic-lan",
                "prefix": f"198.19.{o}.0/24",
                "routers": [{"peer": "gw1", "metric": 10}, {"peer": "gw2", "metric": 20}],
            }
            r = api.post("/api/v1/routes", json=body)
            assert r.status_code == 201, r.text
            for proto, ports in (("icmp", []), ("tcp", [str(IPERF_PORT)])):
                body = {
                    "name": f"staff-clinic-{proto}",
                    "protocol": proto,
                    "ports": ports,
                    "sources": {"groups": ["staff"]},
                    "destinations": {"routes": ["clinic-lan"]},
                }
                r = api.post("/api/v1/policies", json=body)
                assert r.status_code == 201, r.text
        yield {"mesh": m, "lan": f"198.19.{o}", "lanhost": lanhost, "hosts": hosts, "workdir": workdir}


def clinic(mesh: Any) -> dict[str, Any]:
    routes = mesh.agents["c1"].status().get("routing", {}).get("routes", [])
    return next((r for r in routes if r.get("name") == "clinic-lan"), {})


def routers_up(state: dict[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in state.get("routers", []):
        out[str(r.get("name") or r.get("peer") or r.get("peer_id"))] = bool(r.get("up"))
    return out


def stable_on_gw1(mesh: Any) -> bool:
    state = clinic(mesh)
    up = routers_up(state)
    return state.get("active_router") == "gw1" and len(up) == 2 and all(up.values())


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.3) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None


def iperf_bytes(client: Any, dst: str, size: str) -> dict[str, Any]:
    last = ""
    for _ in range(3):  # the server may still be finishing the previous test
        r = client.exec("iperf3", "-c", dst, "-p", str(IPERF_PORT), "-n", size, "-J", check=False, timeout=300)
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            doc = {"error": r.stderr or r.stdout}
        if "error" not in doc:
            end = doc["end"]
            return {
                "mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
                "seconds": end["sum_received"]["seconds"],
                "retransmits": end["sum_sent"].get("retransmits"),
            }
        last = str(doc["error"])
        time.sleep(1)
    raise RuntimeError(f"iperf3 to {dst} failed: {last}")


def throughput(lab: dict[str, Any], rounds: int, size: str) -> dict[str, Any]:
    m, hosts = lab["mesh"], lab["hosts"]
    lan_ip, gw1_ip = f"{lab['lan']}.10", m.agents["gw1"].mesh_ip
    c1 = hosts["c1"]
    for host in (hosts["gw1"], lab["lanhost"]):
        host.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], lab["workdir"] / f"iperf-{host.name}.log")
    time.sleep(0.5)
    res: dict[str, list[dict[str, Any]]] = {"routed": [], "direct": []}
    for rnd in range(1, rounds + 1):
        for kind in ("routed", "direct") if rnd % 2 else ("direct", "routed"):
            state = clinic(m)
            r = iperf_bytes(c1, lan_ip if kind == "routed" else gw1_ip, size)
            r.update({"round": rnd, "active_router": state.get("active_router"), "loadavg": loadavg()})
            res[kind].append(r)
            print(
                f"round {rnd} {kind:7} {r['mbit_s']:7.1f} Mbit/s ({size} in {r['seconds']:.2f} s, "
                f"retransmits {r['retransmits']}, via {r['active_router'] if kind == 'routed' else 'gw1 itself'})  "
                f"load {r['loadavg']}",
                flush=True,
            )
    med = {k: median([x["mbit_s"] for x in v]) for k, v in res.items()}
    return {"runs": res, "median_mbit_s": med, "ratio": med["routed"] / med["direct"]}


SEQ = re.compile(r"icmp_seq=(\d+)")


def ping_popen(host: Any, dst: str, deadline: float | None = None) -> subprocess.Popen[str]:
    cmd = ["ip", "netns", "exec", host.ns, "ping", "-n", "-i", str(PING_INTERVAL), "-W", "1"]
    cmd += ["-w", str(int(deadline))] if deadline else []
    return subprocess.Popen([*cmd, dst], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ping_losses(out: str, after_seq: int = 0) -> dict[str, Any]:
    """Lost pings (not counting a trailing run cut off by the deadline or SIGINT if it is short), the
    longest run of consecutive losses, and whether replies came back after the last loss."""
    got = {int(s) for line in out.splitlines() if "bytes from" in line for s in SEQ.findall(line)}
    sent_m = re.search(r"(\d+) packets transmitted", out)
    if sent_m is None and not got:
        raise RuntimeError(f"ping gave no result:\n{out[-2000:]}")
    sent = int(sent_m.group(1)) if sent_m else max(got, default=0)
    last = max(got, default=0)
    tail = sent - last
    recovered = tail <= 2  # at most 0.2 s without an answer when ping stopped: still in flight
    horizon = sent if not recovered else last
    lost = [s for s in range(after_seq + 1, horizon + 1) if s not in got]
    longest = run = 0
    for s in range(after_seq + 1, horizon + 1):
        run = run + 1 if s not in got else 0
        longest = max(longest, run)
    return {"sent": sent, "received": len(got), "lost": len(lost), "longest": longest, "recovered": recovered}


def failover(lab: dict[str, Any], runs: int, cut_at: float, window: float) -> list[dict[str, Any]]:
    m, hosts = lab["mesh"], lab["hosts"]
    lan_ip = f"{lab['lan']}.10"
    c1 = hosts["c1"]
    results: list[dict[str, Any]] = []
    for i in range(1, runs + 1):
        ready = wait_until(lambda: stable_on_gw1(m), 90)
        if ready is None:
            print(f"failover run {i}: gw1 not active with both routers up after 90 s: {clinic(m)}", flush=True)
            results.append({"run": i, "outage_s": float("inf"), "error": "not ready"})
            continue
        ping = ping_popen(c1, lan_ip, window)
        try:
            time.sleep(cut_at)
            hosts["gw1"].exec("ip", "link", "set", "eth0", "down")  # gw1 gone from the underlay
            cut_seq = int(cut_at / PING_INTERVAL)  # pings before this were sent while gw1 was up
            out, _ = ping.communicate(timeout=window + 15)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait(5)
        after = clinic(m)
        loss = ping_losses(out, after_seq=max(0, cut_seq - 5))
        outage = loss["lost"] * PING_INTERVAL if loss["recovered"] else float("inf")
        # gw1 back: count losses while traffic moves back to it after the hold time
        hosts["gw1"].exec("ip", "link", "set", "eth0", "up")
        ping2 = ping_popen(c1, lan_ip)
        try:
            back = wait_until(lambda: clinic(m).get("active_router") == "gw1", 90)
            time.sleep(1.5)
        finally:
            ping2.send_signal(2)
            try:
                out2, _ = ping2.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                ping2.kill()
                out2, _ = ping2.communicate(timeout=5)
        loss2 = ping_losses(out2)
        row = {
            "run": i,
            "outage_s": round(outage, 2),
            "lost": loss["lost"],
            "longest_gap_s": round(loss["longest"] * PING_INTERVAL, 2),
            "sent": loss["sent"],
            "taken_over_by": after.get("active_router"),
            "failback_s": round(back, 1) if back is not None else None,
            "failback_lost": loss2["lost"],
            "loadavg": loadavg(),
        }
        results.append(row)
        print(
            f"failover run {i:2}: {row['lost']:3} of {row['sent']} pings lost = {outage:.1f} s outage "
            f"(longest gap {row['longest_gap_s']:.1f} s), now via {row['taken_over_by']}; gw1 back: fail-back after "
            f"{row['failback_s']} s, {row['failback_lost']} pings lost during it; load {row['loadavg']}",
            flush=True,
        )
    return results


# ===== 3: map size and apply time =================================================================
def route_prefix(i: int) -> str:
    return f"198.{18 + i // 256}.{i % 256}.0/24"  # 512 /24s in 198.18.0.0/15


def build_graph(peers: int, routes: int, with_routes: bool) -> tuple[Any, str, str]:
    """The network_map mesh plus a staff group (client = first member) and a routing peer `gw`."""
    import dataclasses

    from bench.network_map import SETTINGS, build_mesh
    from coordinator.engine.graph import MeshGraph, PolicyNode, RouteNode

    mesh = build_mesh(peers)
    groups = {**mesh.groups, "gstaff": "staff", "ggw": "gateways"}
    nodes = []
    for i, p in enumerate(mesh.peers):
        extra = {"gstaff"} if i < STAFF_SIZE else {"ggw"} if i == STAFF_SIZE else set()
        nodes.append(dataclasses.replace(p, groups=p.groups | extra))
    client, gw = nodes[0].id, nodes[STAFF_SIZE].id
    seconds = [n.id for n in nodes[STAFF_SIZE + 1 : STAFF_SIZE + 21]]  # 20 second routing peers
    policies, route_nodes = list(mesh.policies), []
    if with_routes:
        for i in range(routes):
            route_nodes.append(
                RouteNode(
                    id=f"rt{i:04d}",
                    name=f"lan-{i:04d}",
                    prefix=route_prefix(i),
                    masquerade=True,
                    enabled=True,
                    peers={seconds[i % len(seconds)]: 20},
                    groups={"ggw": 10},
                )
            )
        per = max(1, routes // ROUTE_POLICIES)
        for k in range(0, routes, per):
            policies.append(
                PolicyNode(
                    id=f"rpol{k:04d}",
                    name=f"staff-lans-{k:04d}",
                    enabled=True,
                    protocol="tcp",
                    ports=((443, 443), (8000 + k, 8000 + k)),
                    bidirectional=False,
                    src_groups=frozenset({"gstaff"}),
                    src_peers=frozenset(),
                    dst_groups=frozenset(),
                    dst_peers=frozenset(),
                    dst_routes=frozenset(f"rt{j:04d}" for j in range(k, min(routes, k + per))),
                )
            )
    graph = MeshGraph()
    graph.load(SETTINGS, groups, policies, nodes, 1, route_nodes)
    return graph, client, gw


def coordinator_side(peers: int, routes: int, reps: int) -> dict[str, Any]:
    from coordinator.engine.views import MapRenderer

    out: dict[str, Any] = {}
    maps: dict[str, str] = {}
    for with_routes in (True, False):
        kind = "routes" if with_routes else "base"
        loads = []
        for _ in range(max(2, reps // 2)):
            gc.collect()
            graph, client, gw = build_graph(peers, routes, with_routes)
            loads.append(graph.last_stats.seconds * 1000)  # recompute(None) inside load: every map
        for who, pid in (("client", client), ("router", gw)):
            state = graph.maps[pid]
            cold, warm = [], []
            for _ in range(reps * 5):
                gc.collect()
                renderer = MapRenderer(graph)
                cold.append(timed_ms(partial(renderer.full, pid, ())))
                warm.append(timed_ms(partial(renderer.full, pid, ())))
            text = MapRenderer(graph).full(pid, ())
            maps[f"{who}_{kind}"] = text
            out[f"{who}_{kind}"] = {
                "bytes": len(text.encode()),
                "peers": bin(state.reach).count("1"),
                "rules": len(state.rules),
                "routes": len(state.routes),
                "forward": len(state.forward),
                "render_cold_ms": median(cold),
                "render_warm_ms": median(warm),
            }
        out[f"load_{kind}_ms"] = median(loads)
    out["maps"] = maps
    return out


def inner_agent(path: Path, iface: str, reps: int) -> dict[str, Any]:
    """Runs inside the bench namespace: nft, netlink and the wireguard-go device are all local."""
    from agent.firewall import Firewall, compile_firewall
    from agent.netmap import NetworkMap
    from agent.routing import KernelRoutes, RoutingPlan
    from agent.wg.backend import PeerConfig
    from agent.wg.userspace import UserspaceBackend
    from starling_proto.netmap import parse_map_message

    maps: dict[str, str] = json.loads(path.read_text())
    out: dict[str, Any] = {}
    wg = UserspaceBackend(iface)
    priv, _ = keypair()
    wg.up(priv, 51820)
    subprocess.run(["ip", "addr", "add", "100.64.0.1/10", "dev", iface], check=True)
    try:
        for kind, text in maps.items():
            r: dict[str, Any] = {}

            def parse(t: str = text) -> NetworkMap:
                nm = NetworkMap()
                nm.apply(parse_map_message(json.loads(t)))
                return nm

            nm = parse()
            r["parse_ms"] = median([timed_ms(parse) for _ in range(reps * 5)])
            section, forward = nm.firewall(), nm.forward
            model = compile_firewall(section, iface, forward)
            r.update(fw_rules=model.rule_count, fw_elements=model.element_count, fw_nat=len(model.nat))
            compile_ms = []
            for _ in range(reps * 5):
                started = time.perf_counter()
                compile_firewall(section, iface, forward)
                compile_ms.append((time.perf_counter() - started) * 1000)
            r["compile_ms"] = median(compile_ms)
            first, again, changed = [], [], []
            for _ in range(reps):
                fw = Firewall(iface, monitor=False)
                fw.install_guard()
                first.append(fw.apply(section, forward).duration_ms)
                res = fw.apply(section, forward)
                again.append(res.duration_ms)
                changed.append(res.changed)
                fw.remove()
            r.update(nft_first_ms=median(first), nft_again_ms=median(again), nft_again_changed=any(changed))
            # The active routing peer's allowed IPs on a client (what PeerLink.set_routing gives WireGuard).
            prefixes = tuple(e.prefix for e in nm.routes)
            peer_key = keypair()[1]
            cfg = PeerConfig(peer_key, ("100.64.0.2/32", *prefixes), None, 0)  # no endpoint: nothing is sent
            wg_ms = []
            for _ in range(reps * 3):
                wg_ms.append(timed_ms(partial(wg.set_peer, cfg)))
                wg.remove_peer(peer_key)
            r.update(wg_allowed_ips=len(cfg.allowed_ips), wg_set_peer_ms=median(wg_ms))
            if kind.startswith("client"):
                plan = RoutingPlan(iface, prefixes)
                kfirst, kagain, kremove, wfirst, wagain = [], [], [], [], []
                for _ in range(reps):
                    table = KernelRoutes(iface)
                    started = time.perf_counter()
                    rep = table.apply(plan)
                    kfirst.append((time.perf_counter() - started) * 1000)
                    wfirst.append(rep.writes)
                    installed = len(rep.installed)
                    started = time.perf_counter()
                    rep = table.apply(plan)
                    kagain.append((time.perf_counter() - started) * 1000)
                    wagain.append(rep.writes)
                    kremove.append(timed_ms(table.remove))
                r.update(
                    kr_prefixes=len(prefixes),
                    kr_installed=installed,
                    kr_first_ms=median(kfirst),
                    kr_first_writes=max(wfirst),
                    kr_again_ms=median(kagain),
                    kr_again_writes=max(wagain),
                    kr_remove_ms=median(kremove),
                )
                if prefixes:  # reference floor: iproute2 writing the same routes in one batch
                    batch = "".join(f"route replace {p} dev {iface} proto 83\n" for p in prefixes)
                    delete = "".join(f"route del {p} dev {iface} proto 83\n" for p in prefixes)
                    ref = []
                    for _ in range(reps):
                        started = time.perf_counter()
                        subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
                        ref.append((time.perf_counter() - started) * 1000)
                        subprocess.run(["ip", "-batch", "-"], input=delete, text=True, check=True)
                    r["ip_batch_ms"] = median(ref)
            out[kind] = r
    finally:
        wg.down()
    return out


def agent_side(maps: dict[str, str], reps: int, workdir: Path) -> dict[str, Any]:
    prefix = "rb" + secrets.token_hex(2)
    ns, iface = f"{prefix}-a", f"{prefix}m"
    path = workdir / "maps.json"
    path.write_text(json.dumps(maps))
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", str(path), "--inner-iface", iface]
        cmd += ["--reps", str(reps)]
        r = subprocess.run(
            ["ip", "netns", "exec", ns, *cmd],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if r.returncode != 0:
            raise RuntimeError(f"agent-side bench failed:\n{r.stderr[-3000:]}")
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        Path(f"/var/run/wireguard/{iface}.sock").unlink(missing_ok=True)


# ===== report =====================================================================================
def report_map(coord: dict[str, Any], agent: dict[str, Any], routes: int, peers: int) -> None:
    print(f"\nMap with {routes} routes, mesh of {peers} peers (baseline: the same mesh and peers without routes)")
    print(
        f"MeshGraph.load (all {peers} maps): {coord['load_routes_ms']:.1f} ms with routes, "
        f"{coord['load_base_ms']:.1f} ms without ({coord['load_routes_ms'] / coord['load_base_ms']:.2f}x)"
    )
    head = f"{'':34}{'client':>12}{'base':>10}{'ratio':>8}{'router':>12}{'base':>10}{'ratio':>8}"
    print(head)

    def line(label: str, key: str, src: dict[str, Any], fmt: str = "{:.2f}") -> None:
        cells = []
        for who in ("client", "router"):
            a, b = src.get(f"{who}_routes", {}).get(key), src.get(f"{who}_base", {}).get(key)
            if a is None:
                cells.append(f"{'-':>12}{'-':>10}{'':>8}")
                continue
            ratio = f"{a / b:8.2f}" if isinstance(b, (int, float)) and b else f"{'':>8}"
            cells.append(f"{fmt.format(a):>12}{fmt.format(b):>10}{ratio}")
        print(f"{label:34}" + "".join(cells))

    for who in ("client", "router"):
        coord[f"{who}_routes"]["entries"] = coord[f"{who}_routes"]["routes"] + coord[f"{who}_routes"]["forward"]
        coord[f"{who}_base"]["entries"] = coord[f"{who}_base"]["routes"] + coord[f"{who}_base"]["forward"]
    line("route + forward entries", "entries", coord, "{}")
    line("firewall rules in the map", "rules", coord, "{}")
    line("peers in the map", "peers", coord, "{}")
    line("map bytes", "bytes", coord, "{:,}")
    line("render cold (MapRenderer.full) ms", "render_cold_ms", coord)
    line("render warm ms", "render_warm_ms", coord)
    print("agent, in a namespace:")
    line("parse (json+contract+NetworkMap) ms", "parse_ms", agent)
    line("nft rules", "fw_rules", agent, "{}")
    line("nft set elements", "fw_elements", agent, "{}")
    line("firewall compile ms", "compile_ms", agent)
    line("Firewall.apply first (guard->map) ms", "nft_first_ms", agent)
    line("Firewall.apply again (same map) ms", "nft_again_ms", agent)
    line("WireGuard set_peer, allowed IPs", "wg_allowed_ips", agent, "{}")
    line("WireGuard set_peer ms", "wg_set_peer_ms", agent)
    c = agent["client_routes"]
    b = agent["client_base"]
    print(
        f"KernelRoutes.apply, {c['kr_prefixes']} prefixes ({c['kr_installed']} installed): "
        f"first {c['kr_first_ms']:.1f} ms "
        f"({c['kr_first_writes']} writes), again {c['kr_again_ms']:.1f} ms ({c['kr_again_writes']} writes"
        f"{', as it should' if c['kr_again_writes'] == 0 else ': SHOULD BE 0'}), remove {c['kr_remove_ms']:.1f} ms; "
        f"empty plan: first {b['kr_first_ms']:.1f} ms, again {b['kr_again_ms']:.1f} ms; "
        f"reference `ip -batch` of the same routes: {c['ip_batch_ms']:.1f} ms"
    )
    for who in ("client", "router"):
        if agent[f"{who}_routes"]["nft_again_changed"]:
            print(f"NOTE: re-applying the same {who} map changed the nft ruleset (expected no change)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 100M, 3 failover runs, 2 map repetitions")
    ap.add_argument("--rounds", type=int, help="throughput rounds, each routed + direct (default 5; 0: skip)")
    ap.add_argument("--size", help="bytes per iperf3 transfer (iperf3 -n; default 300M)")
    ap.add_argument("--failover-runs", type=int, help="failover runs (default 10; 0: skip)")
    ap.add_argument("--window", type=float, default=14.0, help="seconds of ping per failover run (default 14)")
    ap.add_argument("--routes", type=int, default=500, help="routes in the map measurement (default 500, max 512)")
    ap.add_argument("--peers", type=int, default=1000, help="mesh size for the map measurement (default 1000)")
    ap.add_argument("--reps", type=int, help="repetitions of the map measurements (default 5)")
    ap.add_argument("--skip-dataplane", action="store_true", help="only the map measurements")
    ap.add_argument("--skip-map", action="store_true", help="only throughput and failover")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--inner-iface", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        print(json.dumps(inner_agent(args.inner, args.inner_iface, args.reps or 5)))
        return 0
    defaults = (
        {"rounds": 2, "size": "100M", "failover_runs": 3, "reps": 2}
        if args.quick
        else {"rounds": 5, "size": "300M", "failover_runs": 10, "reps": 5}
    )
    for key, value in defaults.items():  # explicit options win over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 < args.routes <= 512:
        raise SystemExit("--routes must be 1..512 (/24s inside 198.18.0.0/15)")
    from tests.fixtures.netns import have_netns

    if not have_netns():
        raise SystemExit("needs root, iproute2 and /dev/net/tun")
    for tool in ("wireguard-go", "wg", "iperf3", "nft", "ping"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, kernel {info['kernel']}, "
        f"wireguard-go {info['wireguard_go']}, load {info['loadavg_start']}",
        flush=True,
    )
    res: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-routes-"))
    try:
        with sigterm_as_exit():
            if not args.skip_map:
                coord = coordinator_side(args.peers, args.routes, args.reps)
                maps = coord.pop("maps")
                print(f"coordinator side done (load {loadavg()})", flush=True)
                agent = agent_side(maps, args.reps, workdir)
                print(f"agent side done (load {loadavg()})", flush=True)
                res["map"] = {"coordinator": coord, "agent": agent}
                report_map(coord, agent, args.routes, args.peers)
            if not args.skip_dataplane:
                print(flush=True)
                with routed_lab(workdir / "lab") as lab:
                    m = lab["mesh"]
                    c1 = m.agents["c1"]
                    ok = wait_until(lambda: c1.host.ping(f"{lab['lan']}.10"), 60)
                    if ok is None:
                        raise RuntimeError("c1 does not reach the LAN host through the route")
                    wait_until(lambda: m.agents["c1"].host.ping(m.agents["gw1"].mesh_ip), 30)
                    state = clinic(m)
                    print(f"route up: active {state.get('active_router')}, routers {routers_up(state)}", flush=True)
                    if args.rounds > 0:
                        res["throughput"] = throughput(lab, args.rounds, args.size)
                    if args.failover_runs > 0:
                        res["failover"] = failover(lab, args.failover_runs, 2.0, args.window)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    res["loadavg_end"] = loadavg()
    if "throughput" in res:
        t = res["throughput"]
        print(f"\niperf3 TCP c1 -> ..., {args.size} per transfer, {args.rounds} rounds (Mbit/s, receiver side)")
        print(f"{'round':8}{'routed':>10}{'direct':>10}{'ratio':>8}")
        for a, b in zip(t["runs"]["routed"], t["runs"]["direct"], strict=True):
            print(f"{a['round']:<8}{a['mbit_s']:10.1f}{b['mbit_s']:10.1f}{a['mbit_s'] / b['mbit_s']:8.3f}")
        med = t["median_mbit_s"]
        print(f"{'median':8}{med['routed']:10.1f}{med['direct']:10.1f}{t['ratio']:8.3f}")
        print(f"Goal routed / direct >= {GOAL_RATIO}: {t['ratio']:.3f}  {verdict(t['ratio'] >= GOAL_RATIO)}")
    if "failover" in res:
        outages = [r["outage_s"] for r in res["failover"]]
        p50, worst = pct(outages, 50), max(outages)
        res["failover_summary"] = {"p50_s": p50, "max_s": worst, "runs": len(outages)}
        print(
            f"Failover over {len(outages)} runs: outage p50 {p50:.1f} s, max {worst:.1f} s "
            f"(all: {', '.join(f'{x:.1f}' for x in outages)})"
        )
        ok = p50 <= GOAL_FAILOVER_S and worst <= GOAL_FAILOVER_S
        print(f"Goal p50 and max <= {GOAL_FAILOVER_S:g} s: {verdict(ok)}")
        fb = [r.get("failback_s") for r in res["failover"] if r.get("failback_s") is not None]
        lost_fb = sum(r.get("failback_lost", 0) for r in res["failover"])
        if fb:
            print(f"Fail-back after gw1 returned: {min(fb):.1f}-{max(fb):.1f} s (hold 10 s), {lost_fb} pings lost")
    print(f"load at the end: {res['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
