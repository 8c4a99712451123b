"""Routed traffic through a routing peer's firewall on real nftables (issue 16), in three namespaces.

Topology (names carry a per-run prefix `fr<hex>`): a client namespace C, a router R and a LAN host L.
C and R are joined by a veth pair standing in for WireGuard: R's end is named like the mesh
interface (`<prefix>m`, 100.64.Y.1/24), C's end holds 100.64.Y.2 and 100.64.Y.3 (a second mesh
source that no policy allows). R and L share a LAN veth (198.18.X.1/24 <-> .2/24). C routes the LAN
through R by hand; L routes 100.64.0.0/10 back through R (what an operator does when a route is not
masqueraded). R forwards (sysctl set by this test). The routing peer's `Firewall` drives nft in R.
L serves TCP 8080 and 9090 and answers each connection with the source address it saw; C serves
TCP 8080 on its mesh address.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.firewall import Firewall
from starling_proto.routes import ForwardEntry
from tests.fixtures.netns import HelperLab, run

pytestmark = pytest.mark.slow

HELPER = r"""
import socket, sys, threading
def handle(c, addr):
    with c:
        c.sendall((addr[0] + "\n").encode())
        while c.recv(100):
            pass
def serve(ip, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); s.listen(16)
    while True:
        c, addr = s.accept(); threading.Thread(target=handle, args=(c, addr), daemon=True).start()
mode = sys.argv[1]
if mode == "serve":
    for spec in sys.argv[2:]:
        ip, port = spec.split(":")
        threading.Thread(target=serve, args=(ip, int(port)), daemon=True).start()
    print("ready", flush=True); threading.Event().wait()
else:  # probe|hold DST PORT [SRC]: print the address the server saw, or FAIL
    try:
        src = (sys.argv[4], 0) if len(sys.argv) > 4 else None
        c = socket.create_connection((sys.argv[2], int(sys.argv[3])), 1.0, src)
        c.settimeout(1.0)
        print(c.makefile().readline().strip() or "FAIL", flush=True)
    except OSError:
        print("FAIL", flush=True); sys.exit(0)
    if mode == "hold":
        sys.stdin.readline(); c.sendall(b"x"); print("still open", flush=True)
"""


class Lab(HelperLab):
    @property
    def mesh_if(self) -> str:
        return f"{self.prefix}m"

    @property
    def lan(self) -> str:
        return f"198.18.{self.x}.0/24"

    def lan_ip(self, host: int) -> str:
        return f"198.18.{self.x}.{host}"

    def mesh_ip(self, host: int) -> str:
        return f"100.64.{self.y}.{host}"

    def run(self, side: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns(side), *cmd, check=check)

    def connect(self, side: str, dst: str, port: int, src: str | None = None) -> str:
        """The source address the server saw, or FAIL."""
        args = [sys.executable, str(self.helper), "probe", dst, str(port), *([src] if src else [])]
        return self.run(side, *args).stdout.strip()

    def firewall(self) -> Firewall:
        return Firewall(self.mesh_if, nft=["ip", "netns", "exec", self.ns("r"), "nft"], monitor=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        if os.environ.get("CI"):
            pytest.fail("firewall tests need root, iproute2 and nftables")
        pytest.skip("needs root, iproute2 and nftables")
    helper = tmp_path_factory.mktemp("fwroutes") / "helper.py"
    helper.write_text(HELPER)
    lab = Lab("fr" + secrets.token_hex(3), helper)
    created: list[str] = []
    try:
        for side in "crl":
            run("ip", "netns", "add", lab.ns(side))
            created.append(lab.ns(side))
            lab.run(side, "ip", "link", "set", "lo", "up")
        p, c, r, lan_host = lab.prefix, lab.ns("c"), lab.ns("r"), lab.ns("l")
        run("ip", "link", "add", lab.mesh_if, "netns", r, "type", "veth", "peer", "name", f"{p}mc", "netns", c)
        run("ip", "link", "add", f"{p}rl", "netns", r, "type", "veth", "peer", "name", f"{p}lh", "netns", lan_host)
        for side, dev, addresses in (
            ("r", lab.mesh_if, [f"{lab.mesh_ip(1)}/24"]),
            ("c", f"{p}mc", [f"{lab.mesh_ip(2)}/24", f"{lab.mesh_ip(3)}/24"]),
            ("r", f"{p}rl", [f"{lab.lan_ip(1)}/24"]),
            ("l", f"{p}lh", [f"{lab.lan_ip(2)}/24"]),
        ):
            for address in addresses:
                lab.run(side, "ip", "addr", "add", address, "dev", dev)
            lab.run(side, "ip", "link", "set", dev, "up")
        lab.run("c", "ip", "route", "add", lab.lan, "via", lab.mesh_ip(1))
        lab.run("l", "ip", "route", "add", "100.64.0.0/10", "via", lab.lan_ip(1))
        lab.run("r", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for side, specs in (
            ("l", [f"{lab.lan_ip(2)}:8080", f"{lab.lan_ip(2)}:9090"]),
            ("c", [f"{lab.mesh_ip(2)}:8080"]),
        ):
            server = lab.popen(side, "serve", *specs)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield lab
    finally:
        for proc in lab.procs:
            proc.kill()
            proc.wait(5)
        for ns in created:
            run("ip", "netns", "del", ns, check=False)


FWD_RULE = {
    "policy_id": "p-clinic",
    "direction": "forward",
    "protocol": "tcp",
    "ports": [[8080, 8080]],
    "peer_set": "p-clinic:src",
    "route_id": "r1",
}


def router_map(lab: Lab, *, forward_rules: bool = True) -> dict[str, object]:
    rules = [{**FWD_RULE, "prefix": lab.lan}] if forward_rules else []
    return {"default_action": "drop", "rules": rules, "sets": {"p-clinic:src": [lab.mesh_ip(2)]}}


def entries(lab: Lab, masquerade: bool) -> list[ForwardEntry]:
    return [ForwardEntry("r1", "clinic", lab.lan, masquerade)]


def test_routed_traffic_through_the_routing_peer(lab: Lab) -> None:
    lan_host, client, other = lab.lan_ip(2), lab.mesh_ip(2), lab.mesh_ip(3)
    # Without any firewall every path is open: the drops below are the firewall's doing.
    assert lab.connect("c", lan_host, 8080) == client
    assert lab.connect("c", lan_host, 8080, other) == other
    assert lab.connect("c", lan_host, 9090) == client
    assert lab.connect("l", client, 8080) == lab.lan_ip(2)

    firewall = lab.firewall()
    try:
        firewall.install_guard()
        assert lab.connect("c", lan_host, 8080) == "FAIL", "the guard drops forwarding"
        result = firewall.apply(router_map(lab), entries(lab, masquerade=False))
        assert result.changed and not result.full_rebuild and "mesh_fwd" in result.chains_rebuilt
        assert firewall.check_drift() is False, "real nft output must parse back to what we installed"

        # (a) allowed source and port pass, the reply comes back; without masquerade L sees the mesh address
        assert lab.connect("c", lan_host, 8080) == client
        # (b) another mesh source with a route by hand is dropped at the routing peer
        assert lab.connect("c", lan_host, 8080, other) == "FAIL"
        # (c) another port is dropped
        assert lab.connect("c", lan_host, 9090) == "FAIL"
        # (d) the LAN host cannot open a connection into the mesh, not even while an allowed flow is open
        hold = lab.popen("c", "hold", lan_host, "8080")
        assert hold.stdout is not None and hold.stdin is not None
        assert hold.stdout.readline().strip() == client
        assert lab.connect("l", client, 8080) == "FAIL"
        hold.stdin.write("go\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "still open"
        # and the router itself does not become reachable from the mesh through forwarding rules
        assert lab.connect("c", lab.lan_ip(1), 8080) == "FAIL"

        # (e) masquerade on: L sees the router's LAN address; the change is a diff, not a rebuild
        result = firewall.apply(router_map(lab), entries(lab, masquerade=True))
        assert not result.full_rebuild and result.chains_rebuilt == ("postrouting",)
        assert firewall.check_drift() is False
        assert "masquerade" in lab.run("r", "nft", "list", "chain", "inet", "starling", "postrouting").stdout
        assert lab.connect("c", lan_host, 8080) == lab.lan_ip(1)
        assert lab.connect("c", lan_host, 8080, other) == "FAIL"
        status = firewall.status()
        assert status["masquerade"] == [lab.lan] and status["route_rules"] == 1
        firewall.apply(router_map(lab), entries(lab, masquerade=False))
        assert lab.connect("c", lan_host, 8080) == client

        # drift in the routed chains is repaired
        lab.run("r", "nft", "flush", "chain", "inet", "starling", "mesh_fwd")
        assert lab.connect("c", lan_host, 8080) == "FAIL"
        assert firewall.check_drift() is True
        assert lab.connect("c", lan_host, 8080) == client

        # (f) a map without the forward rules closes forwarding again
        result = firewall.apply(router_map(lab, forward_rules=False), entries(lab, masquerade=True))
        assert not result.full_rebuild
        assert lab.connect("c", lan_host, 8080) == "FAIL"
        assert lab.connect("l", client, 8080) == "FAIL"
        listing = lab.run("r", "nft", "list", "table", "inet", "starling").stdout
        assert "mesh_fwd" not in listing, listing
        assert "masquerade" in listing  # the route is still forwarded (masqueraded), but nobody may use it
        assert firewall.check_drift() is False
    finally:
        # (g) remove() leaves no trace
        firewall.remove()
    assert lab.run("r", "nft", "list", "ruleset").stdout.strip() == ""
    assert lab.connect("c", lan_host, 9090) == client  # forwarding is back to the kernel's own


def test_client_route_rules_on_real_nft(lab: Lab) -> None:
    """The client side: a route rule (here the exit-node prefix 0.0.0.0/0) opens mesh_out to it."""
    firewall = Firewall(f"{lab.prefix}mc", nft=["ip", "netns", "exec", lab.ns("c"), "nft"], monitor=False)
    exit_rule = {"policy_id": "p-exit", "direction": "route", "protocol": "tcp", "ports": [[8080, 8080]]}
    try:
        firewall.apply({"rules": [{**exit_rule, "route_id": "exit", "prefix": "0.0.0.0/0"}], "sets": {}})
        assert firewall.check_drift() is False
        assert lab.connect("c", lab.lan_ip(2), 8080) == lab.mesh_ip(2)
        assert lab.connect("c", lab.lan_ip(2), 9090) == "FAIL"
        firewall.apply({"rules": [], "sets": {}})
        assert lab.connect("c", lab.lan_ip(2), 8080) == "FAIL"
    finally:
        firewall.remove()
    assert lab.run("c", "nft", "list", "ruleset").stdout.strip() == ""
