"""Benchmark: time from `starling up` on two fresh agents to the first overlay ping between them.

Set-up (once): a NetLab bridge 198.18.N.0/24 in the root namespace, a real coordinator and a real
signal service listening on the bridge address (198.18.N.1), `settings.signal_url` pointing at
signal, group `bench` with a bidirectional policy bench <-> bench, and a reusable setup key.

Each run uses two FRESH namespaces and two fresh state dirs. Both `starling up --foreground`
commands (enrollment included) are started together at t0; from t0 on, a raw ICMP socket in the
first namespace sends an echo request to the second agent's mesh IP every `--interval` (10 ms;
as soon as that IP is known, i.e. the second agent enrolled) and the first echo reply ends the
run. The two peers are then stopped, their namespaces deleted and the peers deleted from the
coordinator, so every run starts with the same coordinator state (two peers in the map).

Baseline, side by side, the same number of runs in the same kind of fresh namespaces: two
hand-configured wireguard-go interfaces (`wireguard-go -f`, `wg set` private key / listen port /
peer / allowed-ips / endpoint / keepalive, `ip addr add`, `ip link set up`), started together,
time to the first reply of the same pinger. Agent and baseline runs alternate.

Breakdown: from the agents' debug logs (`log_level: debug`) and files: state.json written
(enrolled), "agent up" (wireguard-go up, control socket open), signal connected, map.json written
with the other peer in it, first offer sent, first candidates received (offer/answer from the other
peer), the WireGuard handshake (UAPI last_handshake_time, ns resolution) and the first ping reply.
Agents are split into "early" (enrolled first: its first map is empty, the other peer arrives as a
delta) and "late" (its first map already holds the other peer).

Before/after: `--against DIR` also runs the agent from another source tree (e.g. the last commit:
`git archive HEAD | tar -x -C DIR`), alternating with this one in the same lab, with the same
coordinator and signal, so that both see the same machine load; it prints both and their ratio.

Run as root from the repository root:
    PYTHONPATH=. .venv/bin/python bench/connect.py [--runs 10] [--json FILE] [--keep] [--against DIR]
No timing asserts; goals (p50 <= 0.5 s, p95 <= 1 s) are printed as MET / MISSED. Everything the
bench creates (namespaces, bridge, processes, sockets, temp dir) is removed at the end, also after
a failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tests.fixtures.coordinator import CoordinatorProcess
from tests.fixtures.enroll import sealed_enroll
from tests.fixtures.mesh import SignalProcess
from tests.fixtures.netns import Host, NetLab, have_netns, run

GOAL_P50_S = 0.5
GOAL_P95_S = 1.0
CLONE_NEWNET = 0x40000000
WG_SOCKET_DIR = Path("/var/run/wireguard")
MAX_HOSTS = 240  # NetLab gives host i the address 198.18.N.(i+2)


# ----- small helpers (also used by bench/tunnel_throughput.py and bench/agent_idle.py) -----------
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


def keypair() -> tuple[str, str]:
    """A WireGuard (X25519) key pair, base64 (private, public)."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (utime + stime from /proc/PID/stat)."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """Numeric fields of /proc/PID/status in kB (VmRSS, VmHWM, ...) or counts (Threads)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0])
    return out


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def netns_pids(ns: str) -> list[int]:
    out = run("ip", "netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    wg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "wireguard-go"], capture_output=True,
                        text=True, check=False).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "wireguard_go": wg, "loadavg_start": loadavg()}


def fmt_s(value: float) -> str:
    return "      -" if value != value else f"{value * 1000:7.0f} ms" if value < 10 else f"{value:7.2f} s "


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# ----- sockets inside a namespace ---------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in_netns(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside namespace `ns`: it stays there while this thread returns home."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.socket(family, kind, proto)
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


class Pinger:
    """ICMP echo from inside a namespace (raw socket, no process per ping): a tight ping loop."""

    def __init__(self, ns: str) -> None:
        self.sock = socket_in_netns(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        self.ident = random.randint(1, 0xFFFF)
        self.seq = 0
        self.sent = 0
        self.send_errors = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, dst: str) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        payload = struct.pack("!d", time.time())
        header = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq)
        packet = struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + payload), self.ident, self.seq) + payload
        try:
            self.sock.sendto(packet, (dst, 0))
            self.sent += 1
        except OSError:  # no route / no address yet: the interface is not configured yet
            self.send_errors += 1

    def got_reply(self, src: str) -> bool:
        """Drain the socket; True if an echo reply of ours from `src` was among the packets."""
        found = False
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return found
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8 or addr[0] != src:
                continue
            kind, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and ident == self.ident:
                found = True

    def wait_reply(self, dst: str, timeout: float, interval: float = 0.01) -> float | None:
        """Ping `dst` every `interval` until the first reply: its time.time(), or None after `timeout`."""
        deadline = time.time() + timeout
        next_send = 0.0
        while True:
            now = time.time()
            if now >= deadline:
                return None
            if now >= next_send:
                self.send(dst)
                next_send = now + interval
            ready, _, _ = select.select([self.sock], [], [], max(0.0, min(next_send, deadline) - time.time()))
            if ready and self.got_reply(dst):
                return time.time()

    def close(self) -> None:
        self.sock.close()


# ----- the lab: bridge + coordinator + signal ----------------------------------------------------
@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class Bench:
    lab: NetLab
    coord: CoordinatorProcess
    signal: SignalProcess
    workdir: Path
    keys: dict[str, str] = field(default_factory=dict)  # setup keys by group

    def api(self) -> httpx.Client:
        return self.coord.client()

    def policy(self, name: str, src: str, dst: str) -> str:
        with self.api() as api:
            for g in (src, dst):
                api.post("/api/v1/groups", json={"name": g})
            r = api.post("/api/v1/policies", json={"name": name, "bidirectional": True,
                                                    "sources": {"groups": [src]}, "destinations": {"groups": [dst]}})
            r.raise_for_status()
            return str(r.json()["id"])

    def setup_key(self, group: str) -> str:
        if group not in self.keys:
            with self.api() as api:
                api.post("/api/v1/groups", json={"name": group})
                r = api.post("/api/v1/setup-keys", json={"name": f"key-{group}", "reusable": True,
                                                         "auto_groups": [group]})
                r.raise_for_status()
                self.keys[group] = str(r.json()["key"])
        return self.keys[group]

    def enroll_fake(self, group: str, hostname: str, client: httpx.Client | None = None) -> dict[str, Any]:
        """Enroll a peer that never connects: a random X25519 public key through the API."""
        r = sealed_enroll(self.coord.url, {"setup_key": self.setup_key(group), "hostname": hostname}, client=client)
        if r.status_code != 200:
            raise RuntimeError(f"enroll {hostname}: {r.status_code} {r.text}")
        return dict(r.json())

    def delete_peer(self, peer_id: str) -> None:
        with self.api() as api:
            api.delete(f"/api/v1/peers/{peer_id}")

    def add_host(self, name: str) -> Host:
        if len(self.lab.hosts) >= MAX_HOSTS:
            raise RuntimeError("too many namespaces for one lab (--runs too large)")
        return self.lab.add_host(name)

    def drop_host(self, host: Host, interfaces: tuple[str, ...] = ()) -> None:
        """Stop everything we started in `host`, delete its namespace (and so its veth and TUNs)."""
        mine = [p for p in self.lab.processes if list(p.args[:4]) == ["ip", "netns", "exec", host.ns]]  # type: ignore[index]
        for proc in mine:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in mine:
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            self.lab.processes.remove(proc)
        for pid in netns_pids(host.ns):  # e.g. the agent's wireguard-go (its own session)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run("ip", "netns", "del", host.ns, check=False)
        for iface in interfaces:
            (WG_SOCKET_DIR / f"{iface}.sock").unlink(missing_ok=True)


@contextlib.contextmanager
def bench_lab(workdir: Path, coordinator_config: dict[str, Any] | None = None) -> Iterator[Bench]:
    """Bridge + coordinator + signal (on the bridge address) with settings.signal_url; all removed on exit."""
    if not have_netns():
        raise SystemExit("needs root, iproute2 and /dev/net/tun")
    lab = NetLab()
    config = {"log": {"level": "warning"}, **(coordinator_config or {})}
    coord = CoordinatorProcess(workdir=workdir / "coordinator", config=config, host=lab.gateway)
    sig = SignalProcess(workdir / "signal", lab.gateway, "")
    with sigterm_as_exit():
        try:
            lab.start()
            # A bridge takes the lowest MAC of its ports unless its address was set: without this, a
            # namespace added later can change the gateway's MAC under the ARP caches of running hosts.
            mac = "02:5b:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(4))
            run("ip", "link", "set", lab.bridge, "address", mac)
            coord.start()
            sig.coordinator_url = coord.url
            sig.start()
            with coord.client() as api:
                r = api.patch("/api/v1/settings", json={"signal_url": sig.ws_url})
                r.raise_for_status()
            yield Bench(lab, coord, sig, workdir)
        finally:
            sig.stop()
            coord.stop()
            lab.close()


# ----- agents -----------------------------------------------------------------------------------
@dataclass
class AgentRun:
    host: Host
    name: str
    workdir: Path
    interface: str
    proc: subprocess.Popen[bytes]
    started: float

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def log(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def config(self) -> Path:
        return self.workdir / "agent.yaml"

    def state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
            return data
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        r = self.host.exec(sys.executable, "-m", "agent.cli", "--config", str(self.config), "status", "--json",
                           check=False)
        try:
            data: dict[str, Any] = json.loads(r.stdout) if r.returncode == 0 else {}
        except ValueError:
            return {}
        return data

    def wireguard_go_pid(self) -> int | None:
        return next((p for p in netns_pids(self.host.ns) if proc_comm(p) == "wireguard-go"), None)

    def log_tail(self, n: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def spawn_agent(bench: Bench, host: Host, name: str, group: str, workdir: Path, interface: str,
                config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> AgentRun:
    """`starling up --foreground` (enrollment included) in `host`; returns at once."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(workdir / "state"), "backend": "userspace", **(config or {})}
    (workdir / "agent.yaml").write_text(yaml.safe_dump(cfg))
    key = bench.setup_key(group)
    cmd = [sys.executable, "-m", "agent.cli", "--config", str(workdir / "agent.yaml"), "up", "--foreground",
           "--management-url", bench.coord.url, "--setup-key", key, "--hostname", name, "--interface", interface]
    started = time.time()
    proc = host.popen(cmd, workdir / "agent.log", env=env)
    return AgentRun(host, name, workdir, interface, proc, started)


def uapi_last_handshake(interface: str) -> dict[str, float]:
    """Peers' last handshake times (unix seconds, ns resolution) from the wireguard-go UAPI socket."""
    from agent.wg.uapi import UapiClient

    try:
        return {k: s.last_handshake for k, s in UapiClient(interface).get()[1].items()}
    except Exception:
        return {}


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) ([\w.]+): (.*)$")


def log_events(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = LOG_LINE.match(line)
        if m:
            ts = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            out.append((ts, m.group(5)))
    return out


def agent_milestones(agent: AgentRun, other: str) -> dict[str, float]:
    """Absolute times (unix s) of the milestones of `agent` found in its files and debug log."""
    ms: dict[str, float] = {}
    for ts, text in log_events(agent.log):
        if "agent up:" in text:
            ms.setdefault("agent_up", ts)
        elif re.match(r"signal \S+: connected as", text):
            ms.setdefault("signal", ts)
        elif text.startswith(f"offer to {other}:") and "(sent)" in text:
            ms.setdefault("offer_sent", ts)
        elif text.startswith(f"answer to {other}:"):
            ms.setdefault("answer_sent", ts)
        elif text.startswith(("offer from", "answer from")):
            ms.setdefault("cand_rx", ts)
    return ms


# ----- one run ----------------------------------------------------------------------------------
MILESTONES = [
    ("enrolled", "enrolled (state.json written)"),
    ("agent_up", "agent up (wireguard-go + control socket)"),
    ("first_map", "first map applied (map.json written)"),
    ("map_peer", "map holds the other peer (map.json)"),
    ("signal", "signal connected"),
    ("offer_sent", "first offer sent"),
    ("cand_rx", "first candidates received (offer/answer)"),
    ("handshake", "WireGuard handshake (UAPI)"),
]


@dataclass
class RunResult:
    kind: str
    index: int
    ok: bool
    seconds: float  # t0 -> first ping reply (nan if none)
    detail: dict[str, Any] = field(default_factory=dict)


def wg_log_summary(agent: AgentRun, t0: float) -> dict[str, Any]:
    """From wireguard-go's own log (WG_LOG_LEVEL=debug; 1 s resolution): handshake initiations sent
    and the ones that failed because the peer had no endpoint yet."""
    path = agent.state_dir / "logs" / f"wireguard-go-{agent.interface}.log"
    out: dict[str, Any] = {"initiations": [], "no_endpoint": []}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = re.search(r"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d)", line)
        if not m:
            continue
        ts = time.mktime(time.strptime(m.group(1), "%Y/%m/%d %H:%M:%S")) - t0
        if "Sending handshake initiation" in line:
            out["initiations"].append(round(ts, 1))
        elif "no known endpoint" in line:
            out["no_endpoint"].append(round(ts, 1))
    return out


def agent_run(bench: Bench, index: int, timeout: float, interval: float, log_level: str,
              wg_log_level: str = "", ping_delay: float = 0.0) -> RunResult:
    p = bench.lab.prefix
    names = (f"a{index}", f"b{index}")
    hosts = [bench.add_host(n) for n in names]
    ifaces = tuple(f"{p}{n}"[:15] for n in names)
    pinger = Pinger(hosts[0].ns)
    agents: list[AgentRun] = []
    try:
        t0 = time.time()
        env = {"WG_LOG_LEVEL": wg_log_level} if wg_log_level else None
        agents = [spawn_agent(bench, h, n, "bench", bench.workdir / f"run{index}" / n, i, {"log_level": log_level},
                              env) for h, n, i in zip(hosts, names, ifaces, strict=True)]
        deadline = t0 + timeout
        dst = ""
        first_map: dict[int, float] = {}
        map_peer: dict[int, float] = {}
        map_mtime: dict[int, float] = {}
        next_send = 0.0
        t_reply: float | None = None
        states: dict[int, dict[str, Any]] = {}
        while time.time() < deadline:
            for i, a in enumerate(agents):
                if i not in states and (st := a.state()) is not None:
                    states[i] = st
                if i in map_peer:
                    continue
                with contextlib.suppress(OSError):
                    mtime = (a.state_dir / "map.json").stat().st_mtime
                    if mtime != map_mtime.get(i):
                        map_mtime[i] = mtime
                        first_map.setdefault(i, mtime)
                        other = states.get(1 - i, {}).get("peer_id")
                        with contextlib.suppress(OSError, ValueError):
                            peers = json.loads((a.state_dir / "map.json").read_text()).get("peers", [])
                            if other and any(pe.get("id") == other for pe in peers):
                                map_peer[i] = mtime
                            elif other is None:
                                map_mtime.pop(i)  # look again once we know the other's id
            if not dst and 1 in states and time.time() >= t0 + ping_delay:
                dst = states[1]["mesh_ip"]
            now = time.time()
            if dst and now >= next_send:
                pinger.send(dst)
                next_send = now + interval
            wait = max(0.0, min(next_send if dst else now + 0.005, now + 0.005, deadline) - time.time())
            ready, _, _ = select.select([pinger], [], [], wait)
            if ready and dst and pinger.got_reply(dst):
                t_reply = time.time()
                break
        hs = [uapi_last_handshake(i) for i in ifaces]
        for a in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(a.proc.pid, signal.SIGTERM)
        for a in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.proc.wait(5)
        detail: dict[str, Any] = {"pings_sent": pinger.sent, "ping_send_errors": pinger.send_errors,
                                  "agents": []}
        enrolled = {i: (a.state_dir / "state.json").stat().st_mtime for i, a in enumerate(agents)
                    if (a.state_dir / "state.json").exists()}
        order = sorted(range(2), key=lambda i: enrolled.get(i, float("inf")))
        for rank_, i in enumerate(order):
            a = agents[i]
            ms = agent_milestones(a, names[1 - i])
            if i in enrolled:
                ms["enrolled"] = enrolled[i]
            if i in first_map:
                ms["first_map"] = first_map[i]
            if i in map_peer:
                ms["map_peer"] = map_peer[i]
            handshakes = [v for v in hs[i].values() if v]
            if handshakes:
                ms["handshake"] = min(handshakes)
            detail["agents"].append({"name": a.name, "role": ("early", "late")[rank_],
                                     "t": {k: round(v - t0, 4) for k, v in ms.items()}})
            if wg_log_level:
                detail["agents"][-1]["wireguard_go"] = wg_log_summary(a, t0)
        ok = t_reply is not None
        if not ok:
            detail["log_tails"] = {a.name: a.log_tail() for a in agents}
        return RunResult("agent", index, ok, (t_reply - t0) if t_reply else float("nan"), detail)
    finally:
        pinger.close()
        for h, iface in zip(hosts, ifaces, strict=True):
            bench.drop_host(h, (iface,))
        for a in agents:
            st = a.state()
            if st:
                with contextlib.suppress(httpx.HTTPError):
                    bench.delete_peer(st["peer_id"])


BASELINE_SCRIPT = """
set -e
LOG_LEVEL=error wireguard-go -f {iface} &
while [ ! -S /var/run/wireguard/{iface}.sock ]; do sleep 0.002; done
wg set {iface} private-key {keyfile} listen-port 51820 peer {peer} allowed-ips {peer_ip}/32 \\
    endpoint {endpoint}:51820 persistent-keepalive 25
ip addr add {my_ip}/24 dev {iface}
ip link set {iface} up
wait
"""


def baseline_run(bench: Bench, index: int, timeout: float, interval: float) -> RunResult:
    p = bench.lab.prefix
    names = (f"wa{index}", f"wb{index}")
    hosts = [bench.add_host(n) for n in names]
    ifaces = tuple(f"{p}{n}"[:15] for n in names)
    overlay = ("100.127.0.1", "100.127.0.2")
    keys = [keypair(), keypair()]
    rundir = bench.workdir / f"base{index}"
    rundir.mkdir(parents=True, exist_ok=True)
    pinger = Pinger(hosts[0].ns)
    try:
        scripts = []
        for i in range(2):
            keyfile = rundir / f"{names[i]}.key"
            keyfile.write_text(keys[i][0] + "\n")
            keyfile.chmod(0o600)
            scripts.append(BASELINE_SCRIPT.format(iface=ifaces[i], keyfile=keyfile, peer=keys[1 - i][1],
                                                  peer_ip=overlay[1 - i], endpoint=hosts[1 - i].ip,
                                                  my_ip=overlay[i]))
        t0 = time.time()
        for h, s, n in zip(hosts, scripts, names, strict=True):
            h.popen(["sh", "-c", s], rundir / f"{n}.log")
        t_reply = pinger.wait_reply(overlay[1], timeout, interval)
        hs = uapi_last_handshake(ifaces[0])
        detail: dict[str, Any] = {"pings_sent": pinger.sent, "ping_send_errors": pinger.send_errors}
        if hs and any(hs.values()):
            detail["handshake"] = round(min(v for v in hs.values() if v) - t0, 4)
        return RunResult("baseline", index, t_reply is not None, (t_reply - t0) if t_reply else float("nan"), detail)
    finally:
        pinger.close()
        for h, iface in zip(hosts, ifaces, strict=True):
            bench.drop_host(h, (iface,))


def interpreter_floor(bench: Bench, reps: int = 3) -> dict[str, float]:
    """Wall time of `python -m agent.cli --version` and of importing what `up` + the daemon import."""
    host = bench.add_host("imp")
    try:
        out: dict[str, list[float]] = {"cli_version": [], "imports": []}
        code = ("import agent.cli, agent.daemon, agent.signal_client, agent.signal_crypto, "
                "agent.wg.detect, agent.wg.userspace, agent.wg.kernel, pyroute2, websockets.asyncio.client")
        for _ in range(reps):
            for key, cmd in (("cli_version", [sys.executable, "-m", "agent.cli", "--version"]),
                             ("imports", [sys.executable, "-c", code])):
                started = time.perf_counter()
                host.exec(*cmd, timeout=60)
                out[key].append(time.perf_counter() - started)
        return {k: statistics.median(v) for k, v in out.items()}
    finally:
        bench.drop_host(host)


# ----- report -----------------------------------------------------------------------------------
def milestone_medians(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    medians: dict[str, dict[str, float]] = {"early": {}, "late": {}}
    for key, _label in MILESTONES:
        for role in ("early", "late"):
            vals = [ag["t"][key] for r in runs if r.ok for ag in r.detail["agents"]
                    if ag["role"] == role and key in ag["t"]]
            medians[role][key] = statistics.median(vals) if vals else float("nan")
    return medians


def report_against(now: list[RunResult], before: list[RunResult], tree: Path) -> dict[str, Any]:
    """This tree's agent against another tree's, run alternately in the same lab."""
    sn, sb = summary([r.seconds for r in now if r.ok]), summary([r.seconds for r in before if r.ok])
    print()
    print(f"This tree against {tree} ({len(now)} runs each, alternating)")
    print(f"{'':18}{'this tree':>14}{'against':>14}{'ratio this/against':>22}")
    for key in ("min", "p50", "p95", "max", "mean"):
        ratio = sn[key] / sb[key] if sb[key] and sb[key] == sb[key] else float("nan")
        print(f"{key:18}{fmt_s(sn[key]):>14}{fmt_s(sb[key]):>14}{ratio:>20.2f} x")
    print(f"{'failed runs':18}{len(now) - sn['n']:>14}{len(before) - sb['n']:>14}")
    mn, mb = milestone_medians(now), milestone_medians(before)
    print(f"{'milestone medians, ms after t0 (early/late agent)':52}{'this tree':>16}{'against':>16}")
    for key, label in MILESTONES:
        cells = [f"{m['early'][key] * 1000:6.0f}/{m['late'][key] * 1000:<6.0f}" for m in (mn, mb)]
        print(f"  {label:50}{cells[0]:>16}{cells[1]:>16}")
    return {"tree": str(tree), "this": sn, "against": sb, "milestones_this": mn, "milestones_against": mb}


def report(agent: list[RunResult], base: list[RunResult], floor: dict[str, float]) -> dict[str, Any]:
    a_ok = [r.seconds for r in agent if r.ok]
    b_ok = [r.seconds for r in base if r.ok]
    sa, sb = summary(a_ok), summary(b_ok)
    print()
    print(f"Time from start to first overlay ping ({len(agent)} runs each; p95 is nearest-rank)")
    print(f"{'':18}{'agent (starling up)':>22}{'baseline (wg-go by hand)':>27}{'ratio agent/base':>19}")
    for key in ("min", "p50", "p95", "max", "mean"):
        ratio = sa[key] / sb[key] if sb[key] and sb[key] == sb[key] else float("nan")
        print(f"{key:18}{fmt_s(sa[key]):>22}{fmt_s(sb[key]):>27}{ratio:>17.1f} x")
    print(f"{'failed runs':18}{len(agent) - len(a_ok):>22}{len(base) - len(b_ok):>27}")
    print()
    print("Agent milestones, median ms after both `up` commands started (n = runs where seen)")
    print(f"{'':46}{'early agent':>16}{'late agent':>16}")
    medians: dict[str, dict[str, float]] = {"early": {}, "late": {}}
    for key, label in MILESTONES:
        cells = []
        for role in ("early", "late"):
            vals = [ag["t"][key] for r in agent if r.ok for ag in r.detail["agents"]
                    if ag["role"] == role and key in ag["t"]]
            med = statistics.median(vals) if vals else float("nan")
            medians[role][key] = med
            cells.append(f"{med * 1000:8.0f} ({len(vals):2d})" if vals else "       - ( 0)")
        print(f"{label:46}{cells[0]:>16}{cells[1]:>16}")
    print(f"{'first ping reply (pair)':46}{sa['p50'] * 1000:8.0f}")
    if floor:
        print()
        print(f"Python floor (median of 3): `python -m agent.cli --version` {floor['cli_version'] * 1000:.0f} ms, "
              f"interpreter + all agent imports {floor['imports'] * 1000:.0f} ms")
    print()
    g1, g2 = sa["p50"] <= GOAL_P50_S, sa["p95"] <= GOAL_P95_S
    print(f"Goal p50 <= {GOAL_P50_S} s: {sa['p50']:.3f} s  {verdict(g1)}")
    print(f"Goal p95 <= {GOAL_P95_S} s: {sa['p95']:.3f} s  {verdict(g2)}")
    return {"agent": sa, "baseline": sb, "milestones_median": medians, "python_floor": floor,
            "goals": {"p50": verdict(g1), "p95": verdict(g2)}}


def against_run(tree: Path, bench: Bench, index: int, args: argparse.Namespace) -> RunResult:
    """One agent run with the agent (both `up` processes) from another source tree."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    # The agents inherit both (Host.popen); PYTHONSAFEPATH keeps the current directory (this tree) off
    # their sys.path, which would otherwise come before PYTHONPATH.
    os.environ.update(PYTHONPATH=str(tree.resolve()), PYTHONSAFEPATH="1")
    try:
        result = agent_run(bench, index, args.timeout, args.interval, args.log_level, args.wg_log_level,
                           args.ping_delay)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result.kind = "against"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="measured runs of each kind (default 10)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each kind first (default 1)")
    ap.add_argument("--interval", type=float, default=0.01, help="ping interval in s (default 0.01)")
    ap.add_argument("--timeout", type=float, default=20.0, help="give up on a run after this many s")
    ap.add_argument("--log-level", default="debug", help="agent log_level (debug gives the breakdown)")
    ap.add_argument("--wg-log-level", default="", help="WG_LOG_LEVEL for the agents' wireguard-go (diagnosis)")
    ap.add_argument("--ping-delay", type=float, default=0.0,
                    help="start pinging only this many s after t0 (diagnosis: is it our pings that trigger "
                         "WireGuard's first handshake attempt?)")
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help="also run the agent from this source tree (e.g. `git archive HEAD | tar -x -C DIR`), "
                         "alternating with this one, and compare")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (agent logs)")
    args = ap.parse_args(argv)
    per_run = 6 if args.against else 4  # namespaces per iteration
    if args.runs < 1 or per_run * (args.runs + args.warmup) + 1 > MAX_HOSTS:
        ap.error(f"--runs must be 1..{MAX_HOSTS // per_run - args.warmup - 1}")
    if args.against and not (args.against / "agent" / "cli.py").is_file():
        ap.error(f"--against {args.against}: not a source tree (no agent/cli.py)")
    for tool in ("wireguard-go", "wg", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, kernel {info['kernel']}, "
          f"wireguard-go {info['wireguard_go']}, load {info['loadavg_start']}")
    workdir = Path(tempfile.mkdtemp(prefix="starling-bench-connect-"))
    agent: list[RunResult] = []
    base: list[RunResult] = []
    other: list[RunResult] = []
    try:
        with bench_lab(workdir) as bench:
            bench.policy("bench-bench", "bench", "bench")
            bench.setup_key("bench")
            floor = interpreter_floor(bench)
            total = args.warmup + args.runs
            for i in range(total):
                warm = i < args.warmup
                a = agent_run(bench, i, args.timeout, args.interval, args.log_level, args.wg_log_level,
                              args.ping_delay)
                b = baseline_run(bench, i, args.timeout, args.interval)
                o: RunResult | None = None
                if args.against:
                    o = against_run(args.against, bench, 1000 + i, args)
                tag = "warm-up" if warm else f"run {i - args.warmup + 1:2d}"
                print(f"{tag}: agent {fmt_s(a.seconds)}   baseline {fmt_s(b.seconds)}"
                      + (f"   against {fmt_s(o.seconds)}" if o is not None else "") + f"   load {loadavg()}"
                      + ("" if a.ok else "   AGENT FAILED") + ("" if b.ok else "   BASELINE FAILED")
                      + ("" if o is None or o.ok else "   AGAINST FAILED"), flush=True)
                if not a.ok:
                    for name, tail in a.detail.get("log_tails", {}).items():
                        print(f"--- {name} log tail ---\n{tail}")
                if not warm:
                    agent.append(a)
                    base.append(b)
                    if o is not None:
                        other.append(o)
        result = report(agent, base, floor)
        if args.against:
            result["against"] = report_against(agent, other, args.against)
        if args.json:
            doc = {"bench": "connect", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                   "loadavg_end": loadavg(), "summary": result,
                   "runs": [r.__dict__ for r in agent + base],
                   "against_runs": [r.__dict__ for r in other]}
            args.json.write_text(json.dumps(doc, indent=2, default=str))
            print(f"\nwrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
