"""Benchmark: delivery of one change to N connected peers over the SSE map stream, against polling.

Starts a real `starling-coordinator serve` (SQLite, loopback), creates groups `fleet` and `hub` and a
policy fleet -> hub, enrolls one hub peer and N fleet peers, then opens N concurrent
`GET /api/v1/peer/stream` connections from this one asyncio process (raw HTTP/1.1 over asyncio
sockets) and waits for every first `map` event. Each write changes every fleet peer's map (it
alternates: PATCH the policy's ports / enroll one more hub peer); the time from sending the write to
each stream's `delta` event is recorded. Printed: p50/p95/max per write and overall, streams reached.

Baseline, side by side: the same N peers polling `GET /api/v1/peer/map` every second (the
no-stream alternative). Printed are (a) the analytic latency of 1 s polling (uniform wait for the
next poll + one poll's response time), (b) the measured server cost of one poll round (N GETs), and
(c) unless --no-poll-sim, a real simulation: N pollers at 1 s with random phases, one write, and the
time until each poller sees the new serial.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/fanout.py [--peers 1000] [--writes 5]
No timing asserts; the goal (p95 <= 1 s) is printed as MET / MISSED. Client and server share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.fixtures.coordinator import CoordinatorProcess, running_coordinator
from tests.fixtures.enroll import sealed_enroll

GOAL_P95_S = 1.0
POLL_INTERVAL = 1.0
ENROLL_THREADS = 8


# ----- small helpers -----------------------------------------------------------------------------
def wg_public_key() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        nan = float("nan")
        return {"n": 0, "min": nan, "p50": nan, "p95": nan, "max": nan, "mean": nan}
    return {"n": len(values), "min": min(values), "p50": pct(values, 50), "p95": pct(values, 95),
            "max": max(values), "mean": statistics.fmean(values)}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raise_fd_limit(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ----- mesh set-up over the API ------------------------------------------------------------------
@dataclass
class Setup:
    policy_id: str
    hub_key: str
    fleet_key: str
    peers: list[dict[str, Any]] = field(default_factory=list)  # enroll responses of the fleet peers
    hubs: list[dict[str, Any]] = field(default_factory=list)


def enroll(url: str, key: str, hostname: str, client: httpx.Client | None = None) -> dict[str, Any]:
    """A sealed enrollment as the agent does it: challenge, X25519 seal, open the sealed reply."""
    r = sealed_enroll(url, {"setup_key": key, "hostname": hostname}, client=client, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"enroll {hostname}: {r.status_code} {r.text}")
    return dict(r.json())


def set_up(coord: CoordinatorProcess, peers: int) -> tuple[Setup, float]:
    with coord.client() as api:
        for name in ("fleet", "hub"):
            api.post("/api/v1/groups", json={"name": name}).raise_for_status()
        pol = api.post("/api/v1/policies", json={
            "name": "fleet-to-hub", "protocol": "tcp", "ports": [443],
            "sources": {"groups": ["fleet"]}, "destinations": {"groups": ["hub"]},
        })
        pol.raise_for_status()
        keys = {}
        for name in ("fleet", "hub"):
            r = api.post("/api/v1/setup-keys", json={"name": name, "reusable": True, "auto_groups": [name]})
            r.raise_for_status()
            keys[name] = r.json()["key"]
    setup = Setup(policy_id=pol.json()["id"], hub_key=keys["hub"], fleet_key=keys["fleet"])
    setup.hubs.append(enroll(coord.url, setup.hub_key, "hub-0"))

    def batch(indexes: range) -> list[dict[str, Any]]:
        with httpx.Client() as client:
            return [enroll(coord.url, setup.fleet_key, f"fleet-{i:05d}", client) for i in indexes]

    started = time.perf_counter()
    step = -(-peers // ENROLL_THREADS)
    with ThreadPoolExecutor(ENROLL_THREADS) as pool:
        for part in pool.map(batch, [range(i, min(i + step, peers)) for i in range(0, peers, step)]):
            setup.peers.extend(part)
    return setup, time.perf_counter() - started


# ----- SSE streams over raw asyncio sockets ------------------------------------------------------
@dataclass
class Event:
    at: float
    kind: str
    ident: str
    data: str


@dataclass
class Tracker:
    """Counts shared by all streams, so waiting for "all N" is O(1) and costs the client nothing."""

    maps: int = 0  # streams that got their first map
    armed: bool = False  # a write is in flight: the next delta of each stream is its delivery
    hits: int = 0  # streams that got their delivery since armed


@dataclass
class Stream:
    peer_id: str
    credential: str
    map_at: float | None = None
    hit: Event | None = None  # first delta (or full map) after the current write
    extra: int = 0  # further deltas after that one
    events: int = 0
    status: int = 0
    error: str = ""
    writer: asyncio.StreamWriter | None = None

    def on_event(self, event: Event, tracker: Tracker) -> None:
        self.events += 1
        if event.kind == "map" and self.map_at is None:
            self.map_at = event.at
            tracker.maps += 1
        elif tracker.armed and event.kind in ("delta", "map"):
            if self.hit is None:
                self.hit = event
                tracker.hits += 1
            else:
                self.extra += 1


def parse_event(raw: str) -> tuple[str, str, str] | None:
    kind, ident, data = "message", "", []
    for line in raw.split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "id":
            ident = value
        elif name == "data":
            data.append(value)
    return (kind, ident, "\n".join(data)) if data else None


async def read_stream(stream: Stream, host: str, port: int, tracker: Tracker) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        stream.writer = writer
        writer.write((f"GET /api/v1/peer/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Authorization: Bearer {stream.credential}\r\nAccept: text/event-stream\r\n\r\n").encode())
        status = await reader.readline()
        stream.status = int(status.split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        buf = ""
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            buf += data.decode()
            while "\n\n" in buf:
                raw, buf = buf.split("\n\n", 1)
                parsed = parse_event(raw)
                if parsed is not None:
                    stream.on_event(Event(now, *parsed), tracker)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"


async def wait_until(predicate: Callable[[], bool], within: float, step: float = 0.002) -> bool:
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


# ----- writes that change every fleet peer's map -------------------------------------------------
async def do_write(index: int, api: httpx.AsyncClient, coord: CoordinatorProcess, setup: Setup) -> tuple[str, Any]:
    """Write number `index`: even -> PATCH the policy's ports, odd -> enroll one more hub peer."""
    if index % 2 == 0:
        port = 10_000 + index
        r = await api.patch(f"/api/v1/policies/{setup.policy_id}", json={"ports": [443, port]})
        r.raise_for_status()
        return f"PATCH policy ports -> [443, {port}]", port
    r = await asyncio.to_thread(enroll, coord.url, setup.hub_key, f"hub-{index}")
    setup.hubs.append(r)
    return f"enroll hub peer {r['peer']['name']}", r["peer"]["name"]


def delta_matches(event: Event, expect: Any) -> bool:
    """The delta carries this write's change (new port in the rules, or the new hub peer)."""
    try:
        doc = json.loads(event.data)
    except ValueError:
        return False
    if isinstance(expect, int):
        rules = doc.get("rules") or doc.get("firewall", {}).get("rules", [])
        return any([expect, expect] in r.get("ports", []) for r in rules)
    peers = doc.get("peers_upsert") or doc.get("peers", [])
    return any(p.get("name") == expect for p in peers)


async def stream_phase(coord: CoordinatorProcess, setup: Setup, writes: int, results: dict[str, Any]) -> None:
    host, port, pid = coord.host, coord.port, coord.process.pid if coord.process else 0
    streams = [Stream(p["peer"]["id"], p["credential"]) for p in setup.peers]
    n = len(streams)
    cpu0 = proc_cpu_s(pid)
    t0 = time.perf_counter()
    tracker = Tracker()
    tasks = [asyncio.create_task(read_stream(s, host, port, tracker)) for s in streams]
    all_in = await wait_until(lambda: tracker.maps + sum(1 for s in streams if s.error) >= n, 300, step=0.02)
    t_all = time.perf_counter() - t0
    connected = [s for s in streams if s.map_at is not None]
    connect_times = [(s.map_at or 0) - t0 for s in connected]
    errors = [s.error for s in streams if s.error]
    conn = summary(connect_times)
    server_cpu = proc_cpu_s(pid) - cpu0
    print(f"\nstreams: {len(connected):,}/{n:,} got their first `map` event in {t_all:.2f} s"
          f" (per stream since start: p50 {ms(conn['p50'])}, p95 {ms(conn['p95'])}, max {ms(conn['max'])});"
          f" server CPU {server_cpu:.2f} s, server RSS {proc_rss_mb(pid):.0f} MB")
    if errors or not all_in:
        print(f"  !! {len(errors)} streams failed (first: {errors[:1]}); all_in={all_in}")
    results["connect"] = {"streams": n, "with_map": len(connected), "all_s": t_all, **conn,
                          "server_cpu_s": server_cpu, "errors": len(errors)}
    await asyncio.sleep(0.5)

    per_write: list[dict[str, Any]] = []
    pooled: list[float] = []
    async with httpx.AsyncClient(base_url=coord.url, timeout=60,
                                 headers={"Authorization": f"Bearer {coord.admin_token}"}) as api:
        for w in range(writes):
            for s in connected:
                s.hit, s.extra = None, 0
            tracker.hits, tracker.armed = 0, True
            cpu0 = proc_cpu_s(pid)
            started = time.perf_counter()
            label, expect = await do_write(w, api, coord, setup)
            responded = time.perf_counter() - started

            await wait_until(lambda: tracker.hits >= len(connected), 60)
            await asyncio.sleep(0.3)  # let duplicates (if any) arrive before counting them
            tracker.armed = False
            got = [s.hit for s in connected if s.hit is not None]
            lat = [e.at - started for e in got]
            wrong = sum(1 for e in got if not delta_matches(e, expect))
            extra = sum(s.extra for s in connected)
            kinds = {e.kind for e in got}
            stat = summary(lat)
            pooled.extend(lat)
            cpu = proc_cpu_s(pid) - cpu0
            print(f"  write {w + 1}: {label:42s} HTTP {ms(responded)} | delivered {len(got):,}/{len(connected):,}"
                  f" first {ms(stat['min'])} p50 {ms(stat['p50'])} p95 {ms(stat['p95'])} max {ms(stat['max'])}"
                  f" | server CPU {cpu:.2f} s{'' if kinds == {'delta'} else f' | kinds {sorted(kinds)}'}"
                  f"{f' | {wrong} without the change!' if wrong else ''}{f' | {extra} extra events' if extra else ''}")
            per_write.append({"write": label, "http_s": responded, "delivered": len(got), "streams": len(connected),
                              "not_matching": wrong, "extra_events": extra, "server_cpu_s": cpu, **stat})
            await asyncio.sleep(0.5)
    overall = summary(pooled)
    min_delivered = min((w["delivered"] for w in per_write), default=0)
    verdict = "MET" if overall["p95"] <= GOAL_P95_S and min_delivered == n else "MISSED"
    print(f"  overall ({writes} writes x {n:,} streams): p50 {ms(overall['p50'])} p95 {ms(overall['p95'])}"
          f" max {ms(overall['max'])}; every write reached {min_delivered:,}/{n:,} streams"
          f"   goal p95 <= {GOAL_P95_S:g} s and all N reached: {verdict}")
    results["writes"] = per_write
    results["stream_overall"] = {**overall, "min_delivered": min_delivered, "goal_met": verdict == "MET"}
    results["server_rss_mb_streams_open"] = proc_rss_mb(pid)

    for s in streams:
        if s.writer is not None:
            s.writer.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ----- polling baseline ---------------------------------------------------------------------------
class Poller:
    """One peer polling GET /api/v1/peer/map on its own keep-alive HTTP/1.1 connection."""

    def __init__(self, credential: str, host: str, port: int) -> None:
        self.credential, self.host, self.port = credential, host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        self.writer.write((f"GET /api/v1/peer/map HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           f"Authorization: Bearer {self.credential}\r\n\r\n").encode())
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def poll_round(pollers: list[Poller]) -> tuple[float, list[float], int]:
    async def one(p: Poller) -> tuple[float, int]:
        t = time.perf_counter()
        status, _ = await p.get()
        return time.perf_counter() - t, status

    started = time.perf_counter()
    done = await asyncio.gather(*(one(p) for p in pollers))
    return time.perf_counter() - started, [d[0] for d in done], sum(1 for d in done if d[1] != 200)


async def poll_simulation(pollers: list[Poller], coord: CoordinatorProcess, setup: Setup,
                          write_after: float = 2.5, give_up_after: float = 15.0) -> dict[str, Any]:
    """N pollers at 1 s with random phases; one write; when does each poller first see the new serial?"""
    rng = random.Random(7)
    n = len(pollers)
    serial: list[int] = [-1] * n
    seen_at: list[float | None] = [None] * n
    write_at: list[float] = []
    polls = 0
    lag: list[float] = []
    start = time.perf_counter()

    async def run(i: int, p: Poller) -> None:
        nonlocal polls
        due = start + rng.random() * POLL_INTERVAL
        while time.perf_counter() - start < give_up_after and seen_at[i] is None:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            lag.append(time.perf_counter() - due)
            status, body = await p.get()
            polls += 1
            now = time.perf_counter()
            value = int(json.loads(body)["serial"]) if status == 200 else serial[i]
            if write_at and now > write_at[0] and serial[i] >= 0 and value > serial[i]:
                seen_at[i] = now
            serial[i] = value
            due = max(due + POLL_INTERVAL, now)  # a late poll does not catch up with a burst

    async def writer() -> None:
        await asyncio.sleep(write_after)
        async with httpx.AsyncClient(base_url=coord.url, timeout=60,
                                     headers={"Authorization": f"Bearer {coord.admin_token}"}) as api:
            write_at.append(time.perf_counter())
            r = await api.patch(f"/api/v1/policies/{setup.policy_id}", json={"ports": [443, 9999]})
            r.raise_for_status()
            write_at.append(time.perf_counter() - write_at[0])

    pid = coord.process.pid if coord.process else 0
    cpu0 = proc_cpu_s(pid)
    await asyncio.gather(writer(), *(run(i, p) for i, p in enumerate(pollers)))
    elapsed = time.perf_counter() - start
    lat = [t - write_at[0] for t in seen_at if t is not None]
    return {**summary(lat), "reached": len(lat), "polls": polls, "elapsed_s": elapsed,
            "req_per_s": polls / elapsed, "server_cpu_s": proc_cpu_s(pid) - cpu0,
            "poll_start_lag_p95_s": pct(lag, 95) if lag else 0.0, "write_http_s": write_at[1]}


async def polling_phase(coord: CoordinatorProcess, setup: Setup, simulate: bool, results: dict[str, Any]) -> None:
    pollers = [Poller(p["credential"], coord.host, coord.port) for p in setup.peers]
    n = len(pollers)
    pid = coord.process.pid if coord.process else 0
    try:
        await poll_round(pollers)  # open the keep-alive connections (not timed)
        single = []
        for p in pollers[:20]:  # one poll alone, as a spread-out poller mostly sees the server
            t = time.perf_counter()
            await p.get()
            single.append(time.perf_counter() - t)
        lone = statistics.median(single)
        rounds = []
        for _ in range(3):
            cpu0 = proc_cpu_s(pid)
            wall, lat, bad = await poll_round(pollers)
            rounds.append((wall, lat, bad, proc_cpu_s(pid) - cpu0))
        wall, lat, bad, cpu = sorted(rounds, key=lambda r: r[0])[1]  # the median round of 3
        resp = summary(lat)
        print(f"\nbaseline: polling GET /api/v1/peer/map every {POLL_INTERVAL:g} s instead of a stream")
        print(f"  one poll round = {n:,} concurrent GETs on keep-alive connections (median of 3 rounds):"
              f" {wall:.2f} s wall, {n / wall:,.0f} req/s, server CPU {cpu:.2f} s, {bad} non-200;"
              f" response time p50 {ms(resp['p50'])} p95 {ms(resp['p95'])}")
        load = wall / POLL_INTERVAL
        print(f"  1 s polling by {n:,} peers needs {n / POLL_INTERVAL:,.0f} req/s: {load:.0%} of this server's"
              " measured capacity, spent even when nothing changes")
        analytic = {"p50": 0.5 * POLL_INTERVAL + lone, "p95": 0.95 * POLL_INTERVAL + lone,
                    "max": POLL_INTERVAL + lone, "single_poll_s": lone}
        print(f"  analytic delivery latency (uniform wait for the next poll + one lone poll, {ms(lone).strip()}): "
              f"p50 {ms(analytic['p50'])} p95 {ms(analytic['p95'])} max {ms(analytic['max'])}"
              + ("" if load <= 1 else f"  (optimistic: a round takes {wall:.2f} s > {POLL_INTERVAL:g} s)"))
        results["poll_round"] = {"wall_s": wall, "req_per_s": n / wall, "server_cpu_s": cpu, "non_200": bad,
                                 "response": resp, "load_at_1s": load}
        results["poll_analytic"] = analytic
        if simulate:
            sim = await poll_simulation(pollers, coord, setup)
            print(f"  simulated: {n:,} pollers at {POLL_INTERVAL:g} s (random phase), one PATCH after 2.5 s:"
                  f" reached {sim['reached']:,}/{n:,}, p50 {ms(sim['p50'])} p95 {ms(sim['p95'])}"
                  f" max {ms(sim['max'])}; the PATCH took {ms(sim['write_http_s']).strip()};"
                  f" {sim['req_per_s']:,.0f} req/s achieved,"
                  f" server CPU {sim['server_cpu_s']:.1f} s in {sim['elapsed_s']:.1f} s,"
                  f" poll start lag p95 {ms(sim['poll_start_lag_p95_s'])}")
            results["poll_simulated"] = sim
    finally:
        for p in pollers:
            p.close()


# ----- main ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--peers", type=int, default=1000, help="streams (fleet peers) to connect")
    ap.add_argument("--writes", type=int, default=5, help="writes to fan out (each changes every fleet map)")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--no-poll-sim", action="store_true", help="skip the simulated 1 s polling run")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                    help="coordinator log level (default warning: no per-request access log lines)")
    ap.add_argument("--keep", action="store_true", help="keep the coordinator's temp dir (for its log)")
    args = ap.parse_args(argv)

    limits = raise_fd_limit(2 * args.peers + 256)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"stream fan-out benchmark: {args.peers:,} peers, {args.writes} writes; Python {platform.python_version()},"
          f" {os.cpu_count()} CPUs ({cpu}); fd limit {limits[0]}; client and coordinator share the machine")
    print(f"goal: every stream gets the delta, p95 delivery <= {GOAL_P95_S:g} s")
    results: dict[str, Any] = {"benchmark": "fanout", "peers": args.peers, "writes": args.writes,
                               "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-fanout-"))
    config = {"log": {"level": args.log_level}}
    try:
        with terminate_on_sigterm(), running_coordinator(workdir / uuid.uuid4().hex[:8], config) as coord:
            print(f"coordinator: {coord.url} (pid {coord.process.pid if coord.process else '?'}, SQLite in {workdir})")
            setup, enroll_s = set_up(coord, args.peers)
            print(f"enrolled {len(setup.peers):,} fleet peers + 1 hub peer in {enroll_s:.1f} s"
                  f" ({len(setup.peers) / enroll_s:,.0f} enrollments/s, {ENROLL_THREADS} client threads)")
            results["enroll"] = {"peers": len(setup.peers), "seconds": enroll_s}
            asyncio.run(stream_phase(coord, setup, args.writes, results))
            asyncio.run(polling_phase(coord, setup, not args.no_poll_sim, results))
            stream = results["stream_overall"]
            print()
            for which in ("poll_analytic", "poll_simulated"):
                if which in results:
                    base = results[which]
                    results[f"ratio_{which}_over_stream"] = {q: base[q] / stream[q] for q in ("p50", "p95", "max")}
                    print(f"ratio {which.replace('_', ' ', 1):15s} / stream: p50 {base['p50'] / stream['p50']:5.1f} x,"
                          f" p95 {base['p95'] / stream['p95']:5.1f} x, max {base['max'] / stream['max']:5.1f} x")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
