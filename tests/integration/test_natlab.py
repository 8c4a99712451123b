"""The NAT lab behaves like the internet it plays: endpoint-independent and symmetric NAT, stateful
inbound drop, unroutable foreign LANs, a real coturn for STUN and TURN, and a clean teardown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.coturn import CoturnProcess, running_coturn, stun_mapped_from, turn_allocate_from
from tests.fixtures.natlab import NatHost, NatLab, Router, natlab
from tests.fixtures.netns import run

pytestmark = pytest.mark.slow

# A tiny UDP tool run inside a namespace (standard library only):
#   listen PORT SECONDS [IP:PORT]  bind PORT, optionally send b"hello" to IP:PORT first, print "ready",
#                                  then print a JSON list of the payloads received within SECONDS
#   send SRC_PORT IP:PORT PAYLOAD COUNT
#   echo PORT ALT_PORT SECONDS     print "ready"; on the first datagram answer b"echo" from PORT and
#                                  b"stranger" from ALT_PORT to its sender; print the sender as JSON
UDP_TOOL = r"""
import json, socket, sys, time

def addr(text):
    ip, _, port = text.rpartition(":")
    return ip, int(port)

def sock(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    return s

mode, args = sys.argv[1], sys.argv[2:]
if mode == "listen":
    s = sock(int(args[0]))
    if len(args) > 2:
        s.sendto(b"hello", addr(args[2]))
    print("ready", flush=True)
    got, deadline = [], time.monotonic() + float(args[1])
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            got.append(s.recvfrom(2048)[0].decode())
        except TimeoutError:
            break
    print(json.dumps(got))
elif mode == "send":
    s = sock(int(args[0]))
    for _ in range(int(args[3])):
        s.sendto(args[2].encode(), addr(args[1]))
        time.sleep(0.05)
elif mode == "echo":
    s, alt = sock(int(args[0])), sock(int(args[1]))
    s.settimeout(float(args[2]))
    print("ready", flush=True)
    _data, peer = s.recvfrom(2048)
    s.sendto(b"echo", peer)
    alt.sendto(b"stranger", peer)
    print(json.dumps(list(peer)))
"""


@dataclass
class Lab:
    lab: NatLab
    pub: NatHost
    stun1: CoturnProcess  # root namespace, on the public gateway
    stun2: CoturnProcess  # a second STUN/TURN server inside a public host
    eim: Router
    sym: Router
    home: NatHost  # behind the endpoint-independent NAT
    office: NatHost  # behind the symmetric NAT
    workdir: Path

    @property
    def servers(self) -> list[tuple[str, int]]:
        return [self.stun1.address, self.stun2.address]


@pytest.fixture(scope="module")
def nat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("natlab")
    with natlab() as lab:
        pub = lab.add_public_host("pub")
        eim = lab.add_router("eim", "eim")
        sym = lab.add_router("sym", "symmetric")
        home = lab.add_host("home", eim)
        office = lab.add_host("office", sym)
        with (
            running_coturn(workdir / "stun1", lab.public_gateway) as stun1,
            running_coturn(workdir / "stun2", pub.ip, host=pub) as stun2,
        ):
            yield Lab(lab, pub, stun1, stun2, eim, sym, home, office, workdir)


def _udp(host: NatHost, *args: str, timeout: float = 15) -> str:
    return host.exec(sys.executable, "-c", UDP_TOOL, *args, timeout=timeout).stdout


def _udp_background(host: NatHost, log: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = host.popen([sys.executable, "-u", "-c", UDP_TOOL, *args], log)
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, "UDP tool did not start"
        time.sleep(0.02)
    return proc


def _last_json(text: str) -> object:
    return json.loads(text.strip().splitlines()[-1])


def test_lan_host_reaches_coturn_through_its_router(nat: Lab) -> None:
    assert nat.home.ping(nat.lab.public_gateway)
    mapped = stun_mapped_from(nat.home, [nat.stun1.address], local_port=40001)
    # Seen from the public side the LAN host is its router's WAN address; plain masquerade keeps the port.
    assert mapped == [(nat.eim.wan_ip, 40001)]


def test_eim_mapping_is_endpoint_independent(nat: Lab) -> None:
    mapped = stun_mapped_from(nat.home, nat.servers, local_port=40002)
    assert mapped[0] is not None
    assert mapped[0] == mapped[1], mapped
    assert mapped[0][0] == nat.eim.wan_ip


def test_symmetric_mapping_depends_on_destination(nat: Lab) -> None:
    mapped = stun_mapped_from(nat.office, nat.servers, local_port=40003)
    assert mapped[0] is not None and mapped[1] is not None, mapped
    assert mapped[0][0] == mapped[1][0] == nat.sym.wan_ip
    assert mapped[0][1] != mapped[1][1], mapped


def test_set_kind_switches_between_symmetric_and_eim(nat: Lab) -> None:
    router = nat.lab.add_router("switch", "symmetric")
    host = nat.lab.add_host("switcher", router)
    # The same local port every time: without the conntrack flush the old random mappings would stay.
    before = stun_mapped_from(host, nat.servers, local_port=40004)
    assert before[0] is not None and before[1] is not None and before[0] != before[1], before

    router.set_kind("eim")
    assert router.kind == "eim"
    assert "fully-random" not in router.ruleset()
    after = stun_mapped_from(host, nat.servers, local_port=40004)
    assert after == [(router.wan_ip, 40004)] * 2

    router.set_kind("symmetric")
    assert "fully-random" in router.ruleset()
    again = stun_mapped_from(host, nat.servers, local_port=40004)
    assert again[0] is not None and again[1] is not None and again[0] != again[1], again


def test_router_drops_unsolicited_inbound(nat: Lab) -> None:
    # No flow from the LAN yet: packets to the router's WAN address never reach the LAN host.
    log = nat.workdir / "listen-unsolicited.log"
    listener = _udp_background(nat.home, log, "listen", "41000", "1.5")
    _udp(nat.pub, "send", "42000", f"{nat.eim.wan_ip}:41000", "unsolicited", "5")
    assert listener.wait(10) == 0
    assert _last_json(log.read_text()) == []

    # After the LAN host sent to pub:43000, that endpoint's answer comes back, but a packet from another
    # port of the same public host is still dropped (address- and port-dependent filtering).
    log = nat.workdir / "echo.log"
    echo = _udp_background(nat.pub, log, "echo", "43000", "43001", "10")
    received = _udp(nat.home, "listen", "41000", "1.5", f"{nat.pub.ip}:43000")
    assert _last_json(received) == ["echo"]
    assert echo.wait(10) == 0
    assert _last_json(log.read_text()) == [nat.eim.wan_ip, 41000]


def test_foreign_lan_is_unroutable(nat: Lab) -> None:
    # Routers know only their two connected /24s: no default route, nothing leaves toward the uplink.
    for router in (nat.eim, nat.sym):
        assert router.exec("ip", "route", "show", "default").stdout.strip() == ""
        assert router.exec("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    unreachable = nat.eim.exec("ip", "route", "get", nat.office.ip, check=False)
    assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr.lower()
    assert not nat.home.ping(nat.office.ip, wait=0.5)
    assert not nat.office.ping(nat.home.ip, wait=0.5)
    # Nor can a public host address a LAN directly, or ping a router (input drops it on the WAN side).
    assert not nat.pub.ping(nat.home.ip, wait=0.5)
    assert not nat.pub.ping(nat.eim.wan_ip, wait=0.5)
    assert nat.pub.ping(nat.lab.public_gateway)


def test_turn_allocation_with_good_and_bad_credentials(nat: Lab) -> None:
    username, password = nat.stun1.credentials("home", ttl=600)
    result = turn_allocate_from(nat.home, nat.stun1.address, username, password)
    assert "error" not in result, result
    relay_ip, relay_port = result["relayed"]
    assert relay_ip == nat.lab.public_gateway
    assert nat.stun1.relay_ports is not None
    assert nat.stun1.relay_ports[0] <= relay_port <= nat.stun1.relay_ports[1]
    assert result["mapped"][0] == nat.eim.wan_ip

    bad = turn_allocate_from(nat.home, nat.stun1.address, username, password[:-2] + "xx")
    assert "401" in bad.get("error", ""), bad
    expired = turn_allocate_from(nat.office, nat.stun1.address, *nat.stun1.credentials("office", ttl=-60))
    assert "401" in expired.get("error", ""), expired
    # The other server's secret is not this one's.
    foreign = turn_allocate_from(nat.office, nat.stun2.address, username, password)
    assert "401" in foreign.get("error", ""), foreign


def test_close_leaves_nothing_behind(tmp_path: Path) -> None:
    root_forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with natlab() as lab:
        router = lab.add_router("r", "symmetric")
        host = lab.add_host("h", router)
        pub = lab.add_public_host("p")
        server = CoturnProcess(tmp_path / "coturn", pub.ip, host=pub)
        server.start()  # not stopped here: close() must kill it
        sleeper = host.popen(["sleep", "300"], tmp_path / "sleep.log")
        prefix, bridge = lab.prefix, lab.bridge
        assert prefix in run("ip", "netns", "list").stdout
        assert server.process is not None
        coturn = server.process
    assert prefix not in run("ip", "netns", "list").stdout
    assert run("ip", "link", "show", bridge, check=False).returncode != 0
    assert prefix not in run("ip", "-o", "link", "show").stdout
    # close() killed (and reaped) what ran in the lab; routers forwarded in their own namespaces only.
    assert coturn.poll() is not None and sleeper.poll() is not None
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == root_forwarding
