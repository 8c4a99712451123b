"""`starling netcheck` and peer latency in the NAT lab: real agents behind an endpoint-independent and
a symmetric router and on the public segment, coturn (the mesh's relay) plus a second STUN server
(a coturn in a public host).

netcheck must name each router's mapping behaviour, the public mapping and the relays' latency over
UDP and TCP; peer latency (WireGuard handshake round trips) must be non-null on both ends of direct
and relayed pairs, agree with ping over the mesh, and reach status, metrics and the coordinator.

Known delays: this machine's kernel has neither sch_netem nor sch_fq nor nft queue (measured
2026-12-06: "Specified qdisc kind is unknown"), so a router cannot delay packets. The delay tests run
a userspace delay line instead (FORWARDER, FORWARD_DELAY_MS each way): in front of a STUN server for
netcheck, and between two plain wireguard-go peers for the handshake timing (both roles).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.coturn import CoturnProcess
from tests.fixtures.mesh import Mesh, control_plane, wait_for
from tests.fixtures.natlab import NatHost, Router, natlab

pytestmark = pytest.mark.slow

FORWARD_DELAY_MS = 20.0

# A UDP delay line (run inside a namespace): listen on PORT, forward to IP:PORT after DELAY s, and back
# the same way, one upstream socket per client (WireGuard on TARGET sees the upstream socket as its peer).
FORWARDER = r"""
import asyncio, sys
listen, target, delay = int(sys.argv[1]), (sys.argv[2], int(sys.argv[3])), float(sys.argv[4])

class Up(asyncio.DatagramProtocol):
    def __init__(self, front, client):
        self.front, self.client = front, client
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        asyncio.get_running_loop().call_later(delay, self.front.transport.sendto, data, self.client)

class Front(asyncio.DatagramProtocol):
    def __init__(self):
        self.ups = {}
    def connection_made(self, transport):
        self.transport = transport
        print("ready", flush=True)
    def datagram_received(self, data, addr):
        asyncio.get_running_loop().call_later(delay, self.forward, data, addr)
    def forward(self, data, addr):
        up = self.ups.get(addr)
        if up is None:
            asyncio.ensure_future(self.open(data, addr))
        else:
            up.transport.sendto(data, target)
    async def open(self, data, addr):
        loop = asyncio.get_running_loop()
        _t, up = await loop.create_datagram_endpoint(lambda: Up(self, addr), local_addr=("0.0.0.0", 0))
        self.ups[addr] = up
        up.transport.sendto(data, target)

async def main():
    await asyncio.get_running_loop().create_datagram_endpoint(Front, local_addr=("0.0.0.0", listen))
    await asyncio.sleep(3600)

asyncio.run(main())
"""

# Prints every handshake round trip agent.latency sees in this namespace (WireGuard on PORT), as JSON lines.
SNIFFER = r"""
import asyncio, json, sys
from agent.latency import HandshakeLatency

class Printing(HandshakeLatency):
    def _record(self, sample, retries):
        print(json.dumps({"remote": sample.remote, "rtt_ms": sample.rtt_ms, "role": sample.role}), flush=True)

latency = Printing(lambda: int(sys.argv[1]), lambda: [])
latency.open()
print("ready", flush=True)
asyncio.run(latency.run())
"""


@dataclass
class Lab:
    mesh: Mesh
    coturn: CoturnProcess  # the mesh's relay, in the root namespace
    stun2: CoturnProcess  # a second STUN server, in a public host, also over TLS on 443
    eim: Router
    sym: Router

    def host(self, name: str) -> NatHost:
        return self.mesh.agents[name].host  # type: ignore[return-value]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("netcheck")
    secret = secrets.token_urlsafe(24)
    with natlab() as nat, contextlib.ExitStack() as stack:
        coturn = CoturnProcess(workdir / "coturn", nat.public_gateway, secret=secret)
        coturn.start()
        stack.callback(coturn.stop)
        pub = nat.add_public_host("stun2")
        stun2 = CoturnProcess(workdir / "stun2", pub.ip, host=pub, tls_port=443)  # STUN/TURN on UDP, TCP, TLS
        stun2.start()
        stack.callback(stun2.stop)
        config = {"mesh": {"turn_servers": [coturn.turn_url]}, "secrets": {"source": "config", "turn_secret": secret}}
        plane = control_plane(workdir, nat.public_gateway, config=config, groups=("all",), policies=(("all", "all"),))
        coord, signal = stack.enter_context(plane)
        mesh = Mesh(nat, coord, signal, workdir)  # type: ignore[arg-type]
        eim = nat.add_router("re", "eim")
        sym = nat.add_router("rs", "symmetric")
        try:
            mesh.start_agent("e1", ["all"], host=nat.add_host("e1", eim))
            mesh.start_agent("s1", ["all"], host=nat.add_host("s1", sym))
            mesh.start_agent("p", ["all"], host=nat.add_public_host("p"))
            yield Lab(mesh, coturn, stun2, eim, sym)
        finally:
            for agent in mesh.agents.values():
                print(f"--- agent {agent.host.name} log ---\n{agent.log_tail(60)}")


def netcheck(lab: Lab, name: str, *args: str) -> tuple[dict[str, Any], str]:
    agent = lab.mesh.agents[name]
    out = agent.cli("netcheck", "--json", *args, timeout=60)
    assert out.returncode == 0, out.stderr
    text = agent.cli("netcheck", *args, timeout=60)
    assert text.returncode == 0, text.stderr
    print(f"--- netcheck on {name} ---\n{text.stdout}")
    return json.loads(out.stdout), text.stdout


def test_netcheck_behind_eim_router(lab: Lab) -> None:
    second = f"stun:{lab.stun2.listen_ip}:{lab.stun2.port}"
    tcp = f"turn:{lab.coturn.listen_ip}:{lab.coturn.port}?transport=tcp"
    wait_for(lambda: (lab.mesh.agents["e1"].workdir / "state" / "map.json").exists(), 20, what="e1's cached map")
    report, text = netcheck(lab, "e1", "--server", second, "--server", tcp)
    assert report["udp"] is True
    assert report["mapping"]["behaviour"] == "endpoint-independent", report["mapping"]
    assert report["public_mapping"] == f"{lab.eim.wan_ip}:{report['local_port']}"  # masquerade keeps the port
    assert report["port_preserved"] is True
    assert "NAT mapping:     endpoint-independent" in text
    # The running agent's WireGuard port mapping comes from its status.
    wg_port = lab.mesh.agents["e1"].status()["listen_port"]
    assert report["wireguard_mapping"] == f"{lab.eim.wan_ip}:{wg_port}"
    relays = {(r["url"], r["transport"]): r for r in report["relays"]}
    udp = relays[(lab.coturn.turn_url, "udp")]
    assert udp["error"] is None and udp["stun_rtt_ms"] is not None
    over_tcp = relays[(tcp, "tcp")]
    assert over_tcp["error"] is None and over_tcp["connect_ms"] is not None and over_tcp["stun_rtt_ms"] is not None
    assert report["ipv6"] == {"works": None, "detail": "no IPv6 relay/STUN server", "mapped": None}
    assert "IPv6:            unknown: no IPv6 relay/STUN server" in text


def test_netcheck_behind_symmetric_router(lab: Lab) -> None:
    second = f"stun:{lab.stun2.listen_ip}:{lab.stun2.port}"
    report, text = netcheck(lab, "s1", "--server", second)
    assert report["udp"] is True
    assert report["mapping"]["behaviour"] == "endpoint-dependent", report["mapping"]
    assert report["mapping"]["servers"] >= 2
    mapped = {p["mapped"] for p in report["probes"] if p["mapped"]}
    assert len(mapped) >= 2 and all(m.startswith(f"{lab.sym.wan_ip}:") for m in mapped)
    assert "NAT mapping:     endpoint-dependent" in text


def test_netcheck_with_one_server_says_so(lab: Lab) -> None:
    report, text = netcheck(lab, "p", "--no-map", "--server", f"stun:{lab.stun2.listen_ip}:{lab.stun2.port}")
    # coturn with one listening address names no RFC 5780 OTHER-ADDRESS: one server address only.
    assert [p["via"] for p in report["probes"]] == [f"stun:{lab.stun2.listen_ip}:{lab.stun2.port}"]
    assert report["mapping"]["behaviour"] == "unknown" and report["mapping"]["servers"] == 1
    assert "NAT mapping:     unknown (one STUN server" in text
    # A public host: its mapping is its own address and port.
    assert report["public_mapping"] == f"{lab.host('p').ip}:{report['local_port']}"


def _latency(lab: Lab, src: str, dst: str) -> dict[str, Any]:
    return lab.mesh.agents[src].peer_status(dst)


def _ping_ms(lab: Lab, src: str, dst: str, count: int = 5) -> float:
    out = lab.host(src).exec(
        "ping", "-c", str(count), "-i", "0.2", "-W", "2", lab.mesh.agents[dst].mesh_ip, check=False, timeout=30
    )
    match = re.search(r"= ([\d.]+)/[\d.]+/", out.stdout)  # the minimum: the path, without load spikes
    assert match, out.stdout + out.stderr
    return float(match.group(1))


# e1 (EIM) <-> s1 (symmetric) goes through the relay (docs/nat.md); the pairs with the public host go direct.
@pytest.mark.parametrize(("a", "b", "path"), [("e1", "p", "direct"), ("s1", "p", "direct"), ("e1", "s1", "relayed")])
def test_peer_latency_is_measured_on_both_ends(lab: Lab, a: str, b: str, path: str) -> None:
    lab.mesh.wait_ping(a, b, 30)
    for src, dst in ((a, b), (b, a)):
        wait_for(lambda s=src, d=dst: _latency(lab, s, d).get("path") == path, 20, what=f"{src}->{dst} {path}")
        try:
            wait_for(lambda s=src, d=dst: _latency(lab, s, d).get("latency_ms") is not None, 30, what="latency")
        except AssertionError as exc:
            raise AssertionError(f"{src}->{dst}: {exc}\n{lab.mesh.diagnose(src, dst)}") from None
    forward, backward = _latency(lab, a, b), _latency(lab, b, a)
    ping = _ping_ms(lab, a, b)
    print(f"{a}<->{b} ({path}): latency {forward['latency_ms']} / {backward['latency_ms']} ms, ping min {ping} ms")
    for st in (forward, backward):
        assert 0 < st["latency_ms"] < 1000, st
        assert st["latency_at"] is not None
        # The handshake round trip is the data path's round trip: close to ping over the tunnel.
        assert abs(st["latency_ms"] - ping) < max(15.0, ping * 0.5), (st, ping)
    status = lab.mesh.agents[a].status()
    assert status["latency"]["active"] and status["latency"]["error"] is None
    detail = lab.mesh.agents[a].cli("status", "-d").stdout
    print("\n".join(line for line in detail.splitlines() if "latency" in line.lower()))
    assert re.search(r"latency:\s+[\d.]+ ms \(WireGuard handshake round trip", detail), detail


def test_latency_reaches_the_coordinator(lab: Lab) -> None:
    lab.mesh.wait_ping("e1", "p", 30)
    e1, p = lab.mesh.agents["e1"], lab.mesh.agents["p"]
    wait_for(lambda: _latency(lab, "e1", "p").get("latency_ms") is not None, 30, what="e1->p latency")

    def reported() -> float | None:
        with lab.mesh.api() as api:
            peer = api.get(f"/api/v1/peers/{e1.peer_id}").json()
        conn = next((c for c in peer.get("connections", []) if c["peer_id"] == p.peer_id), {})
        value = conn.get("latency_ms")
        return float(value) if value is not None else None

    wait_for(lambda: reported() is not None, 15, what="latency in e1's state report")
    value = reported()
    assert value is not None and value > 0


def test_metrics_export_the_latency_gauge(lab: Lab) -> None:
    wait_for(lambda: _latency(lab, "e1", "p").get("latency_ms") is not None, 30, what="e1->p latency")
    script = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9586/metrics', timeout=5).read().decode())"
    )
    out = lab.host("e1").exec("python3", "-c", script, timeout=20).stdout
    match = re.search(r'starling_agent_peer_latency_seconds\{peer="p"\} ([\d.e+-]+)', out)
    assert match, out[-2000:]
    assert float(match.group(1)) > 0


def _wait_log(log: Path, text: str, timeout: float = 10) -> None:
    wait_for(lambda: log.exists() and text in log.read_text(errors="replace"), timeout, what=f"{text!r} in {log}")


def _samples(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_handshake_round_trip_carries_a_known_delay(lab: Lab, tmp_path: Path) -> None:
    """Two plain wireguard-go peers; A reaches B through a delay line in B's namespace (FORWARD_DELAY_MS
    each way). Both namespaces run agent.latency's socket (BPF filter, kernel timestamps): A's
    initiator sample and B's responder sample must both carry the delay line's 2 x FORWARD_DELAY_MS."""
    nat = lab.mesh.lab
    a, b = nat.add_public_host("wga"), nat.add_public_host("wgb")
    keys = {
        h.name: subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
        for h in (a, b)
    }
    pubs = {
        n: subprocess.run(["wg", "pubkey"], input=k, capture_output=True, text=True, check=True).stdout.strip()
        for n, k in keys.items()
    }
    mesh_ip = {a.name: "100.100.0.1", b.name: "100.100.0.2"}
    for host in (a, b):
        iface = f"{nat.prefix}{host.name}"[:15]
        host.popen(["wireguard-go", "-f", iface], tmp_path / f"{host.name}-wg.log")
        wait_for(lambda i=iface: Path(f"/var/run/wireguard/{i}.sock").exists(), 10, what=f"{iface} up")
        keyfile = tmp_path / f"{host.name}.key"
        keyfile.write_text(keys[host.name] + "\n")
        other = b if host is a else a
        peer = ["peer", pubs[other.name], "allowed-ips", f"{mesh_ip[other.name]}/32"]
        if host is a:
            peer += ["endpoint", f"{b.ip}:40000"]  # through B's delay line
        host.exec("wg", "set", iface, "listen-port", "51820", "private-key", str(keyfile), *peer)
        host.exec("ip", "addr", "add", f"{mesh_ip[host.name]}/24", "dev", iface)
        host.exec("ip", "link", "set", iface, "up")
    delay = tmp_path / "delay.log"
    b.popen([sys.executable, "-u", "-c", FORWARDER, "40000", "127.0.0.1", "51820", str(FORWARD_DELAY_MS / 1000)], delay)
    _wait_log(delay, "ready")
    logs = {h.name: tmp_path / f"{h.name}-sniff.log" for h in (a, b)}
    for host in (a, b):
        host.popen([sys.executable, "-u", "-c", SNIFFER, "51820"], logs[host.name])
        _wait_log(logs[host.name], "ready")
    started = time.monotonic()
    assert a.ping(mesh_ip[b.name], count=3, wait=2), delay.read_text()  # the first packet starts a handshake
    wait_for(lambda: _samples(logs[a.name]) and _samples(logs[b.name]), 10, what="both handshake samples")
    ours, theirs = _samples(logs[a.name])[0], _samples(logs[b.name])[0]
    print(f"delay line 2 x {FORWARD_DELAY_MS} ms: initiator {ours}, responder {theirs}")
    assert ours["role"] == "initiator" and ours["remote"] == f"{b.ip}:40000"
    assert theirs["role"] == "responder" and theirs["remote"].startswith("127.0.0.1:")
    for sample in (ours, theirs):
        # At least the two delays; at most a generous allowance for a loaded 2-core machine.
        assert 2 * FORWARD_DELAY_MS <= sample["rtt_ms"] < 2 * FORWARD_DELAY_MS + 40, sample
    assert time.monotonic() - started < 15


def test_netcheck_measures_a_far_servers_delay(lab: Lab, tmp_path: Path) -> None:
    """A delay line (FORWARD_DELAY_MS each way) in front of the second STUN server: netcheck's round trip
    to it carries the delay, the direct one does not."""
    host = lab.stun2.host
    assert host is not None
    log = tmp_path / "delay.log"
    args = ["40001", lab.stun2.listen_ip, str(lab.stun2.port), str(FORWARD_DELAY_MS / 1000)]
    host.popen([sys.executable, "-u", "-c", FORWARDER, *args], log)
    _wait_log(log, "ready")
    far, near = f"stun:{lab.stun2.listen_ip}:40001", f"stun:{lab.stun2.listen_ip}:{lab.stun2.port}"
    report, _text = netcheck(lab, "p", "--no-map", "--server", far, "--server", near)
    relays = {r["url"]: r for r in report["relays"]}
    assert relays[far]["error"] is None and len(relays[far]["samples_ms"]) == 3
    assert all(2 * FORWARD_DELAY_MS <= x < 2 * FORWARD_DELAY_MS + 40 for x in relays[far]["samples_ms"]), relays
    assert relays[near]["stun_rtt_ms"] < 2 * FORWARD_DELAY_MS, relays


def test_netcheck_times_a_tls_relay_and_names_an_untrusted_one(lab: Lab, tmp_path: Path) -> None:
    """turns: on coturn (TLS on 443, a self-signed certificate): trusted through the agent's ca_file, netcheck
    times the TCP connect, the TLS handshake and STUN inside TLS; without that trust it names the failure."""
    assert lab.stun2.ca_file is not None
    e1 = lab.mesh.agents["e1"]
    trusting = tmp_path / "netcheck.yaml"
    trusting.write_text(json.dumps({"state_dir": str(e1.workdir / "state"), "ca_file": str(lab.stun2.ca_file)}))
    url = lab.stun2.turns_url
    args = ["netcheck", "--json", "--no-map", "--server", url]
    out = e1.host.exec(sys.executable, "-m", "agent.cli", "--config", str(trusting), *args, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    relay = json.loads(out.stdout)["relays"][0]
    print(f"TLS relay {url}: {relay}")
    assert relay["transport"] == "tls" and relay["error"] is None, relay
    assert relay["connect_ms"] is not None and relay["tls_handshake_ms"] is not None
    assert relay["stun_rtt_ms"] is not None and len(relay["samples_ms"]) == 3
    report, text = netcheck(lab, "e1", "--no-map", "--server", url)  # e1's own config: no ca_file
    relay = report["relays"][0]
    assert relay["connect_ms"] is not None and relay["tls_handshake_ms"] is None
    assert str(relay["error"]).startswith("TLS handshake") and "CERTIFICATE_VERIFY_FAILED" in relay["error"], relay
    assert "ERROR TLS handshake" in text
