"""Network routes end to end (issue 16): real agents in network namespaces, a "clinic" LAN with a
plain host that runs no agent behind two routing peers, and a lab "internet" behind an exit node.

    c1 (staff), c2 (guest)            flat underlay 198.18.<o>.0/24 (coordinator, signal)
    gw1 (metric 10), gw2 (metric 20)  also on the clinic LAN 198.19.<o>.0/24 with lanhost .10
    gw2                               also the exit node: lab internet 198.19.<o+1>.0/24, inet .10

The attacker's test comes first: c2 has a tunnel to gw1 (a peer policy) but no policy to the LAN;
it adds the route by hand and is dropped at the routing peer.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mesh import Mesh, control_plane, wait_for
from tests.fixtures.netns import Host, NetLab, netlab, run

pytestmark = pytest.mark.slow

LISTENER = r"""
import json, socket, sys, threading
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", port)); t.listen(16)
def tcp():
    while True:
        c, a = t.accept()
        print(json.dumps({"tcp": a[0]}), flush=True)
        c.sendall(b"hello from the lan\n"); c.close()
threading.Thread(target=tcp, daemon=True).start()
while True:
    data, a = u.recvfrom(2048)
    print(json.dumps({"udp": a[0], "data": data.decode(errors="replace")}), flush=True)
"""


class Segment:
    """An extra L2 segment: a bridge in its own namespace, and veths into the hosts on it."""

    def __init__(self, lab: NetLab, name: str, subnet: str) -> None:
        self.lab, self.subnet = lab, subnet
        self.ns = f"{lab.prefix}-{name}"
        self.name = name
        run("ip", "netns", "add", self.ns)
        run("ip", "netns", "exec", self.ns, "ip", "link", "add", "br0", "type", "bridge")
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", "br0", "up")
        self.ports = 0

    def attach(self, host: Host, address: str, ifname: str) -> None:
        self.ports += 1
        outer = f"{self.name[:4]}p{self.ports}"
        run("ip", "link", "add", outer, "netns", self.ns, "type", "veth", "peer", "name", ifname, "netns", host.ns)
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", outer, "master", "br0", "up")
        host.exec("ip", "addr", "add", f"{address}/24", "dev", ifname)
        host.exec("ip", "link", "set", ifname, "up")

    def close(self) -> None:
        run("ip", "netns", "del", self.ns, check=False)


def plain_host(lab: NetLab, name: str) -> Host:
    """A namespace that runs no agent (not on the underlay bridge)."""
    ns = f"{lab.prefix}-{name}"
    run("ip", "netns", "add", ns)
    host = Host(name, ns, "", lab)
    lab.hosts.append(host)  # deleted with the lab
    host.exec("ip", "link", "set", "lo", "up")
    return host


class Listener:
    def __init__(self, host: Host, workdir: Path, port: int) -> None:
        self.log = workdir / f"listener-{host.name}-{port}.log"
        script = workdir / "listener.py"
        script.write_text(LISTENER)
        self.proc = host.popen([sys.executable, str(script), str(port)], self.log)
        self.port = port

    def seen(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("routes")
    with (
        netlab() as lab,
        control_plane(
            workdir,
            lab.gateway,
            groups=("staff", "guest", "gateways"),
            policies=(("guest", "gateways"),),  # a tunnel from c2 to the routers, no route
        ) as (coord, signal),
        contextlib.ExitStack() as stack,
    ):
        o = lab.octet
        lan = Segment(lab, "lan", f"198.19.{o}.0/24")
        stack.callback(lan.close)
        internet = Segment(lab, "net", f"198.19.{o + 1}.0/24")
        stack.callback(internet.close)
        m = Mesh(lab, coord, signal, workdir)
        hosts = {name: lab.add_host(name) for name in ("gw1", "gw2", "c1", "c2")}
        lanhost, inet = plain_host(lab, "lanhost"), plain_host(lab, "inet")
        lan.attach(hosts["gw1"], f"198.19.{o}.2", "lan0")
        lan.attach(hosts["gw2"], f"198.19.{o}.3", "lan0")
        lan.attach(lanhost, f"198.19.{o}.10", "eth0")
        internet.attach(hosts["gw2"], f"198.19.{o + 1}.1", "net0")
        internet.attach(inet, f"198.19.{o + 1}.10", "eth0")
        for name, group in (("gw1", "gateways"), ("gw2", "gateways"), ("c1", "staff"), ("c2", "guest")):
            m.start_agent(name, [group], host=hosts[name])
        with m.api() as api:
            r = api.post(
                "/api/v1/routes",
                json={
                    "name": "clinic-lan",
                    "prefix": f"198.19.{o}.0/24",
                    "routers": [{"peer": "gw1", "metric": 10}, {"peer": "gw2", "metric": 20}],
                },
            )
            assert r.status_code == 201, r.text
            r = api.post("/api/v1/routes", json={"name": "exit", "prefix": "0.0.0.0/0", "routers": [{"peer": "gw2"}]})
            assert r.status_code == 201, r.text
            for proto, ports in (("icmp", []), ("tcp", ["8080"]), ("udp", ["8080"])):
                body = {
                    "name": f"staff-clinic-{proto}",
                    "protocol": proto,
                    "ports": ports,
                    "sources": {"groups": ["staff"]},
                    "destinations": {"routes": ["clinic-lan"]},
                }
                r = api.post("/api/v1/policies", json=body)
                assert r.status_code == 201, r.text
            body = {"name": "staff-exit", "sources": {"groups": ["staff"]}, "destinations": {"routes": ["exit"]}}
            assert api.post("/api/v1/policies", json=body).status_code == 201
        listener = Listener(lanhost, workdir, 8080)
        web = Listener(inet, workdir, 8080)
        try:
            yield {
                "mesh": m,
                "lan": f"198.19.{o}",
                "inet": f"198.19.{o + 1}",
                "lanhost": lanhost,
                "inet_host": inet,
                "listener": listener,
                "web": web,
                "hosts": hosts,
            }
        finally:
            for agent in m.agents.values():
                print(f"--- agent {agent.host.name} log ---\n{agent.log_tail(40)}")
                print(agent.host.exec("nft", "list", "table", "inet", "starling", check=False).stdout)


def scrape(host: Host) -> str:
    code = "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
    return host.exec("python3", "-c", code, "http://127.0.0.1:9586/metrics", check=False).stdout


def route_status(mesh: Mesh, name: str) -> dict[str, Any]:
    routing: dict[str, Any] = mesh.agents[name].status().get("routing", {})
    return routing


def tcp_get(host: Host, ip: str, port: int, timeout: float = 2.0) -> str | None:
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{ip}',{port}),timeout={timeout})\n"
        "print(s.recv(100).decode().strip())\n"
    )
    r = host.exec(sys.executable, "-c", code, check=False, timeout=timeout + 5)
    return r.stdout.strip() if r.returncode == 0 else None


def udp_send(host: Host, ip: str, port: int, text: str) -> None:
    code = (
        f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto({text!r}.encode(), ('{ip}',{port}))\n"
    )
    host.exec(sys.executable, "-c", code, check=False)


def test_a_peer_without_a_policy_is_dropped_at_the_router_even_with_the_route_added_by_hand(
    routed: dict[str, Any],
) -> None:
    m: Mesh = routed["mesh"]
    lanhost_ip = f"{routed['lan']}.10"
    c2, gw1 = m.agents["c2"], m.agents["gw1"]
    m.wait_ping("c2", "gw1", 30)  # c2 really has a tunnel to the routing peer
    assert route_status(m, "c2").get("routes") == [], "c2 may not use the clinic route: its map must not offer it"
    # Do by hand what the agent refuses to: the route, and the prefix in gw1's allowed IPs on c2.
    c2.host.exec("ip", "route", "add", f"{routed['lan']}.0/24", "dev", c2.interface)
    c2.host.exec("wg", "set", c2.interface, "peer", gw1_key(m), "allowed-ips", f"{gw1.mesh_ip}/32,{routed['lan']}.0/24")
    try:
        assert not c2.host.ping(lanhost_ip, count=3, wait=1.0)
        assert tcp_get(c2.host, lanhost_ip, 8080) is None
        udp_send(c2.host, lanhost_ip, 8080, "from-c2")
        time.sleep(1.0)
        assert not [s for s in routed["listener"].seen() if s.get("data") == "from-c2"], "the LAN host got c2's packet"
        counters = gw1.host.exec("nft", "list", "table", "inet", "starling", check=False).stdout
        assert "forward" in counters, counters
    finally:
        c2.host.exec("ip", "route", "del", f"{routed['lan']}.0/24", check=False)


def gw1_key(m: Mesh) -> str:
    return str(m.agents["gw1"].status()["public_key"])


def test_a_staff_peer_reaches_the_lan_host_through_its_routing_peer(routed: dict[str, Any]) -> None:
    m: Mesh = routed["mesh"]
    lanhost_ip = f"{routed['lan']}.10"
    c1 = m.agents["c1"]
    wait_for(lambda: c1.host.ping(lanhost_ip), 30, what="c1 pings the LAN host through the route")
    status = route_status(m, "c1")
    clinic = next(r for r in status["routes"] if r["name"] == "clinic-lan")
    assert clinic["active_router"] == "gw1" and clinic["installed"], status
    assert tcp_get(c1.host, lanhost_ip, 8080) == "hello from the lan"
    assert tcp_get(c1.host, lanhost_ip, 8081, timeout=1.5) is None  # no policy for that port
    # Masquerade (the default): the LAN host sees gw1's LAN address, and needs no route back.
    assert routed["listener"].seen()[-1] == {"tcp": f"{routed['lan']}.2"}
    route = c1.host.exec("ip", "route", "get", lanhost_ip).stdout
    assert c1.interface in route, route
    metrics = scrape(c1.host)
    prefix = f"{routed['lan']}.0/24"
    assert f'starling_agent_route_active_router{{prefix="{prefix}",route="clinic-lan",router="gw1"}} 1.0' in metrics
    assert 'starling_agent_route_router_up{route="clinic-lan",router="gw2"} 1.0' in metrics
    assert "starling_agent_forwarding 1.0" in scrape(m.agents["gw1"].host)
    explained = c1.cli("explain", lanhost_ip)
    assert explained.returncode == 0 and "goes through gw1 (route clinic-lan" in explained.stdout, explained.stdout
    assert "allowed by policy" in explained.stdout
    denied = m.agents["c2"].cli("explain", lanhost_ip)
    assert "no route covers" in denied.stdout, denied.stdout
    assert "forwarding" in json.dumps(route_status(m, "gw1")) and route_status(m, "gw1")["forwarding"]


def test_without_masquerade_the_lan_host_sees_the_mesh_address(routed: dict[str, Any]) -> None:
    m: Mesh = routed["mesh"]
    lanhost: Host = routed["lanhost"]
    lanhost_ip = f"{routed['lan']}.10"
    with m.api() as api:
        rid = api.get("/api/v1/routes").json()["items"][0]["id"]
        assert api.patch(f"/api/v1/routes/{rid}", json={"masquerade": False}).status_code == 200
    lanhost.exec("ip", "route", "add", "100.64.0.0/10", "via", f"{routed['lan']}.2")
    try:
        c1 = m.agents["c1"]
        wait_for(
            lambda: tcp_get(c1.host, lanhost_ip, 8080) is not None, 15, what="TCP through the route, no masquerade"
        )
        assert routed["listener"].seen()[-1] == {"tcp": c1.mesh_ip}
    finally:
        with m.api() as api:
            api.patch(f"/api/v1/routes/{rid}", json={"masquerade": True})
        lanhost.exec("ip", "route", "del", "100.64.0.0/10", check=False)


def test_exit_node_carries_other_traffic_and_removing_it_restores_routing(routed: dict[str, Any]) -> None:
    m: Mesh = routed["mesh"]
    c1 = m.agents["c1"]
    inet_ip = f"{routed['inet']}.10"
    before_rules = c1.host.exec("ip", "rule", "show").stdout
    before_routes = c1.host.exec("ip", "route", "show", "table", "all").stdout
    # A default route on the underlay that leads nowhere (no host answers ARP for .254): nothing leaves the lab.
    c1.host.exec("ip", "route", "add", "default", "via", f"198.18.{m.lab.octet}.254")
    try:
        before_default = c1.host.exec("ip", "route", "show", "table", "all").stdout
        assert not c1.host.ping(inet_ip, wait=1.0)  # the lab internet is not reachable from the underlay
        done = c1.cli("up", "--exit-node", "gw2")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: c1.host.ping(inet_ip), 20, what="c1 reaches the lab internet through the exit node")
        assert tcp_get(c1.host, inet_ip, 8080) == "hello from the lan"
        assert routed["web"].seen()[-1] == {"tcp": f"{routed['inet']}.1"}  # masqueraded behind gw2
        assert c1.interface in c1.host.exec("ip", "route", "get", inet_ip).stdout
        # The agent's own traffic stays outside the tunnel: the coordinator and the peers' endpoints.
        for underlay in (m.lab.gateway, *(a.host.ip for n, a in m.agents.items() if n != "c1")):
            got = c1.host.exec("ip", "route", "get", underlay).stdout
            assert c1.interface not in got, (underlay, got)
        assert route_status(m, "c1")["exit_node"] == "gw2"
        assert c1.status()["management"]["connected"]
        done = c1.cli("up", "--exit-node", "none")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: not c1.host.ping(inet_ip, wait=0.5), 10, what="exit node removed")
        assert c1.host.exec("ip", "route", "show", "table", "all").stdout == before_default
    finally:
        c1.host.exec("ip", "route", "del", "default", check=False)
        c1.cli("up", "--exit-node", "none")
    assert c1.host.exec("ip", "rule", "show").stdout == before_rules
    assert c1.host.exec("ip", "route", "show", "table", "all").stdout == before_routes


def test_failover_to_the_second_routing_peer_under_continuous_ping(routed: dict[str, Any]) -> None:
    m: Mesh = routed["mesh"]
    c1 = m.agents["c1"]
    lanhost_ip = f"{routed['lan']}.10"
    wait_for(lambda: c1.host.ping(lanhost_ip), 30, what="route up before the failover")
    wait_for(
        lambda: all(
            r["up"] for r in next(x for x in route_status(m, "c1")["routes"] if x["name"] == "clinic-lan")["routers"]
        ),
        20,
        what="both routing peers up",
    )
    interval, seconds = 0.1, 15
    ping = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            c1.host.ns,
            "ping",
            "-n",
            "-i",
            str(interval),
            "-w",
            str(seconds),
            "-W",
            "1",
            lanhost_ip,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        m.agents["gw1"].host.exec("ip", "link", "set", "eth0", "down")  # gw1 gone from the underlay
        out, _ = ping.communicate(timeout=seconds + 10)
    finally:
        if ping.poll() is None:
            ping.kill()
        m.agents["gw1"].host.exec("ip", "link", "set", "eth0", "up")
    sent = int(out.split(" packets transmitted")[0].split()[-1])
    received = int(out.split(" received")[0].split()[-1])
    lost_seconds = (sent - received) * interval
    print(f"failover: {sent - received} of {sent} pings lost = {lost_seconds:.1f} s without the route (goal <= 5 s)")
    clinic = next(x for x in route_status(m, "c1")["routes"] if x["name"] == "clinic-lan")
    assert clinic["active_router"] == "gw2", clinic
    assert received > 0 and lost_seconds <= 6.0, out
    # gw1 is back: traffic returns to it only after the hold time (no flapping), and keeps working.
    wait_for(
        lambda: next(x for x in route_status(m, "c1")["routes"] if x["name"] == "clinic-lan")["active_router"] == "gw1",
        40,
        what="fail-back to gw1 after the hold time",
    )
    wait_for(lambda: c1.host.ping(lanhost_ip), 10, what="route works after fail-back")
