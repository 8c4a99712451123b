"""Benchmark: the dashboard's page render time with 1,000 peers, and what open dashboards cost the map streams.

Starts a real coordinator with the dashboard installed (`starling-coordinator serve`, SQLite,
loopback), enrolls N peers over the API (groups `fleet` and `hub`, policy fleet -> hub, as in
bench/fanout.py) and has every peer report 5 connections (POST /api/v1/peer/state).

1. Live-update impact. Opens N map streams (GET /api/v1/peer/stream) and times the delivery of W
   writes to all of them (bench/fanout.py's stream phase), while K peers keep sending state reports
   (so the dashboards have something to push). Run twice, side by side:
   (a) baseline: 0 dashboards open; (b) D dashboards with an open live stream (GET /dashboard/events).
   Printed: map-stream delivery p50/p95/max in both, the ratio, server CPU, and how fast the
   dashboards saw the state reports (report sent -> dashboard event received).
2. Page render. GET /dashboard/peers (all N peers on one page) R times: server time from the
   `Server-Timing` header (db = store query, render = Jinja2, app = whole handler) and client wall
   time; goal p95 server time <= 300 ms. Baseline, side by side: GET /api/v1/peers?limit=1000 (the
   JSON API, which builds pydantic PeerOut models) and the mesh page.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/dashboard.py [--peers 1000] [--dashboards 50]
No timing asserts. Client and server share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.fanout import (
    Setup,
    ms,
    proc_cpu_s,
    proc_rss_mb,
    raise_fd_limit,
    set_up,
    stream_phase,
    summary,
    terminate_on_sigterm,
)
from tests.browser.server import DashboardCoordinator, running_dashboard

GOAL_PAGE_P95_S = 0.300
REPORT_CONNECTIONS = 5


# ----- seeding ------------------------------------------------------------------------------------
def report_body(rng: random.Random, peer_ids: list[str], own: str, count: int) -> dict[str, Any]:
    others = rng.sample([p for p in peer_ids if p != own], k=min(count, len(peer_ids) - 1))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "connections": [
            {
                "peer_id": o,
                "path": rng.choice(("direct", "direct", "direct", "relayed", "connecting")),
                "endpoint": f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}:51820",
                "latency_ms": round(rng.uniform(0.5, 80), 1),
                "last_handshake": now,
                "rx_bytes": rng.randrange(1 << 30),
                "tx_bytes": rng.randrange(1 << 30),
            }
            for o in others
        ]
    }


def report_all(coord: DashboardCoordinator, setup: Setup) -> float:
    ids = [p["peer"]["id"] for p in setup.peers]
    creds = [p["credential"] for p in setup.peers]

    def batch(part: range) -> None:
        rng = random.Random(part.start)
        with httpx.Client(base_url=coord.url, timeout=60) as client:
            for i in part:
                r = client.post(
                    "/api/v1/peer/state",
                    json=report_body(rng, ids, ids[i], REPORT_CONNECTIONS),
                    headers={"Authorization": f"Bearer {creds[i]}"},
                )
                r.raise_for_status()

    started = time.perf_counter()
    step = -(-len(ids) // 8)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(batch, [range(i, min(i + step, len(ids))) for i in range(0, len(ids), step)]))
    return time.perf_counter() - started


def login_cookie(coord: DashboardCoordinator) -> str:
    with httpx.Client(base_url=coord.url, timeout=30) as s:
        page = s.get("/dashboard/login")
        nonce = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert nonce is not None
        r = s.post("/dashboard/login", data={"csrf": nonce.group(1), "token": coord.admin_token, "next": ""})
        if r.status_code != 303:
            raise RuntimeError(f"dashboard login failed: {r.status_code}")
        value = s.cookies.get("starling_session")
        assert value
        return str(value)


# ----- dashboard live streams ---------------------------------------------------------------------
@dataclass
class Dash:
    arrivals: list[tuple[float, set[str]]] = field(default_factory=list)
    bytes: int = 0
    status: int = 0
    error: str = ""
    writer: asyncio.StreamWriter | None = None


async def read_dashboard(d: Dash, host: str, port: int, cookie: str) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
        d.writer = writer
        writer.write(
            (
                f"GET /dashboard/events HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: starling_session={cookie}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
        )
        d.status = int((await reader.readline()).split()[1])
        while await reader.readline() not in (b"\r\n", b""):
            pass
        buf = ""
        while True:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunk = (await reader.readexactly(size + 2))[:-2]
            now = time.perf_counter()
            d.bytes += len(chunk)
            buf += chunk.decode()
            while "\n\n" in buf:
                raw, buf = buf.split("\n\n", 1)
                kind, payload = "", ""
                for ln in raw.split("\n"):
                    if ln.startswith("event: "):
                        kind = ln[7:]
                    elif ln.startswith("data: "):
                        payload = ln[6:]
                if kind == "peers":
                    d.arrivals.append((now, {p["id"] for p in json.loads(payload)["peers"]}))
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        d.error = f"{type(exc).__name__}: {exc}"


async def report_load(
    coord: DashboardCoordinator, setup: Setup, reporters: int, stop: asyncio.Event, sent: list[tuple[float, str]]
) -> None:
    """`reporters` peers each send a state report every second until `stop`."""
    ids = [p["peer"]["id"] for p in setup.peers]
    chosen = setup.peers[:reporters]
    rng = random.Random(11)
    async with httpx.AsyncClient(base_url=coord.url, timeout=30) as client:

        async def one(p: dict[str, Any], phase: float) -> None:
            await asyncio.sleep(phase)
            while not stop.is_set():
                t = time.perf_counter()
                r = await client.post(
                    "/api/v1/peer/state",
                    json=report_body(rng, ids, p["peer"]["id"], REPORT_CONNECTIONS),
                    headers={"Authorization": f"Bearer {p['credential']}"},
                )
                if r.status_code == 204:
                    sent.append((t, p["peer"]["id"]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)

        await asyncio.gather(*(one(p, i / max(1, reporters)) for i, p in enumerate(chosen)))


def report_latencies(dashes: list[Dash], sent: list[tuple[float, str]]) -> list[float]:
    """For each report and each dashboard: time until the dashboard got an event naming that peer."""
    out: list[float] = []
    for d in dashes:
        per_peer: dict[str, list[float]] = {}
        for at, ids in d.arrivals:
            for pid in ids:
                per_peer.setdefault(pid, []).append(at)
        for t, pid in sent:
            times = per_peer.get(pid, [])
            k = bisect_left(times, t)
            if k < len(times):
                out.append(times[k] - t)
    return out


async def impact_phase(
    coord: DashboardCoordinator, setup: Setup, dashboards: int, reporters: int, writes: int, cookie: str
) -> dict[str, Any]:
    pid = coord.process.pid if coord.process else 0
    # Start each phase from other policy ports than its first write sets (else that write changes nothing).
    with coord.client() as api:
        api.patch(f"/api/v1/policies/{setup.policy_id}", json={"ports": [443, 30_000 + dashboards]}).raise_for_status()
    await asyncio.sleep(0.5)
    dashes = [Dash() for _ in range(dashboards)]
    tasks = [asyncio.create_task(read_dashboard(d, coord.host, coord.port, cookie)) for d in dashes]
    await asyncio.sleep(1.5 if dashboards else 0.1)
    stop = asyncio.Event()
    sent: list[tuple[float, str]] = []
    load = asyncio.create_task(report_load(coord, setup, reporters, stop, sent))
    await asyncio.sleep(2.0)
    cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
    results: dict[str, Any] = {}
    await stream_phase(coord, setup, writes, results)
    elapsed = time.perf_counter() - t0
    cpu = proc_cpu_s(pid) - cpu0
    stop.set()
    await load
    await asyncio.sleep(1.5)  # the last reports reach the dashboards
    lat = report_latencies(dashes, sent)
    # reports sent once every map stream was open (not during the 1,000-agent connect burst)
    calm_from = t0 + results["connect"]["all_s"] + 1.0
    calm = report_latencies(dashes, [(t, pid) for t, pid in sent if t >= calm_from])
    for d in dashes:
        if d.writer is not None:
            d.writer.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = [d.error for d in dashes if d.error and "Cancelled" not in d.error]
    out = {
        "dashboards": dashboards,
        "dashboards_ok": sum(1 for d in dashes if d.status == 200),
        "dashboard_errors": errors[:3],
        "reports_sent": len(sent),
        "dashboard_events": sum(len(d.arrivals) for d in dashes),
        "dashboard_bytes": sum(d.bytes for d in dashes),
        "report_to_dashboard": summary(lat),
        "report_to_dashboard_steady": summary(calm),
        "stream": results["stream_overall"],
        "writes": results["writes"],
        "connect": results["connect"],
        "server_cpu_s": cpu,
        "elapsed_s": elapsed,
        "server_rss_mb": proc_rss_mb(pid),
    }
    return out


# ----- page timing --------------------------------------------------------------------------------
def server_timing(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        with contextlib.suppress(ValueError):
            out[name] = float(rest) / 1000
    return out


def time_pages(coord: DashboardCoordinator, cookie: str, runs: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with httpx.Client(base_url=coord.url, timeout=60, cookies={"starling_session": cookie}) as s:
        for path, key in (("/dashboard/peers", "peers_page"), ("/dashboard/mesh", "mesh_page")):
            s.get(path).raise_for_status()  # warm-up (template compilation)
            server: dict[str, list[float]] = {}
            wall: list[float] = []
            size = 0
            rows = 0
            for _ in range(runs):
                t = time.perf_counter()
                r = s.get(path)
                wall.append(time.perf_counter() - t)
                r.raise_for_status()
                size = len(r.content)
                rows = r.text.count('<tr data-peer="')
                for name, sec in server_timing(r.headers.get("server-timing", "")).items():
                    server.setdefault(name, []).append(sec)
            res[key] = {
                "bytes": size,
                "peer_rows": rows,
                "wall": summary(wall),
                **{f"server_{k}": summary(v) for k, v in server.items()},
            }
    with httpx.Client(base_url=coord.url, timeout=60, headers={"Authorization": f"Bearer {coord.admin_token}"}) as a:
        a.get("/api/v1/peers", params={"limit": 1000}).raise_for_status()
        wall = []
        for _ in range(runs):
            t = time.perf_counter()
            r = a.get("/api/v1/peers", params={"limit": 1000})
            wall.append(time.perf_counter() - t)
            r.raise_for_status()
        res["api_peers"] = {"bytes": len(r.content), "items": len(r.json()["items"]), "wall": summary(wall)}
    return res


# ----- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--peers", type=int, default=1000, help="peers to enroll (all on one dashboard page)")
    ap.add_argument("--dashboards", type=int, default=50, help="open dashboard live streams in phase (b)")
    ap.add_argument("--reporters", type=int, default=20, help="peers sending a state report every second")
    ap.add_argument("--writes", type=int, default=5, help="map writes per phase")
    ap.add_argument("--page-runs", type=int, default=30, help="timed GETs per page")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the coordinator's temp dir (for its log)")
    args = ap.parse_args(argv)
    raise_fd_limit(2 * args.peers + 2 * args.dashboards + 256)
    print(
        f"dashboard benchmark: {args.peers:,} peers, {args.dashboards} dashboards, {args.reporters} reporters,"
        f" {args.writes} writes/phase; Python {platform.python_version()}, {os.cpu_count()} CPUs;"
        " client and coordinator share the machine"
    )
    results: dict[str, Any] = {"benchmark": "dashboard", **{k: v for k, v in vars(args).items() if k != "json"}}
    results.pop("keep", None)
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-dashboard-"))
    config = {"log": {"level": "warning"}, "limits": {"state_report_interval": 0.2}}
    try:
        with terminate_on_sigterm(), running_dashboard(workdir / uuid.uuid4().hex[:8], config) as coord:
            print(f"coordinator + dashboard: {coord.url} (pid {coord.process.pid if coord.process else '?'})")
            setup, enroll_s = set_up(coord, args.peers)
            rep_s = report_all(coord, setup)
            print(
                f"enrolled {len(setup.peers):,} peers in {enroll_s:.1f} s; each reported"
                f" {REPORT_CONNECTIONS} connections ({rep_s:.1f} s)"
            )
            cookie = login_cookie(coord)

            print(f"\n1. live-update impact: map-stream delivery with 0 vs {args.dashboards} open dashboards")
            print("(a) baseline, no dashboard open")
            base = asyncio.run(impact_phase(coord, setup, 0, args.reporters, args.writes, cookie))
            print(f"(b) {args.dashboards} dashboards open (GET /dashboard/events)")
            dash = asyncio.run(impact_phase(coord, setup, args.dashboards, args.reporters, args.writes, cookie))
            results["impact"] = {"baseline": base, "dashboards": dash}
            b, d = base["stream"], dash["stream"]
            rl = dash["report_to_dashboard"]
            rs = dash["report_to_dashboard_steady"]
            print(f"\n  {'':34s} {'0 dashboards':>14s} {f'{args.dashboards} dashboards':>14s}  ratio")
            for q in ("p50", "p95", "max"):
                print(f"  map-stream delivery {q:14s} {ms(b[q]):>14s} {ms(d[q]):>14s}  {d[q] / b[q]:5.2f} x")
            print(
                f"  server CPU during the phase      {base['server_cpu_s']:>12.2f} s {dash['server_cpu_s']:>12.2f} s"
                f"  ({base['elapsed_s']:.1f} s / {dash['elapsed_s']:.1f} s wall)"
            )
            print(
                f"  dashboards: {dash['dashboards_ok']}/{args.dashboards} connected, {dash['dashboard_events']:,}"
                f" events, {dash['dashboard_bytes'] / 1e6:.1f} MB pushed; state report -> dashboard event:"
                f" p50 {ms(rl['p50'])} p95 {ms(rl['p95'])} max {ms(rl['max'])} (n={rl['n']:,});"
                f" after the streams' connect burst: p50 {ms(rs['p50'])} p95 {ms(rs['p95'])} max {ms(rs['max'])}"
            )

            print(f"\n2. page render with {args.peers:,} peers ({args.page_runs} GETs each, after one warm-up)")
            pages = time_pages(coord, cookie, args.page_runs)
            results["pages"] = pages
            for key in ("peers_page", "mesh_page"):
                p = pages[key]
                app = p.get("server_app", summary([]))
                db = p.get("server_db", summary([]))
                render = p.get("server_render", summary([]))
                print(
                    f"  {key:10s} server p50 {ms(app['p50'])} p95 {ms(app['p95'])} max {ms(app['max'])}"
                    f" (db p95 {ms(db['p95']).strip()}, render p95 {ms(render['p95']).strip()});"
                    f" client p95 {ms(p['wall']['p95'])}; {p['bytes'] / 1e6:.2f} MB, {p['peer_rows']} peer rows"
                )
            api = pages["api_peers"]
            print(
                f"  baseline GET /api/v1/peers?limit=1000 (JSON, PeerOut models): client p50 {ms(api['wall']['p50'])}"
                f" p95 {ms(api['wall']['p95'])}; {api['bytes'] / 1e6:.2f} MB, {api['items']} items"
            )
            peers_p95 = pages["peers_page"].get("server_app", summary([]))["p95"]
            verdict = "MET" if peers_p95 <= GOAL_PAGE_P95_S else "MISSED"
            results["goal_page_p95_met"] = verdict == "MET"
            print(f"  goal: peers page p95 server time <= {GOAL_PAGE_P95_S * 1000:.0f} ms: {verdict}")
            results["server_rss_mb"] = proc_rss_mb(coord.process.pid if coord.process else 0)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
