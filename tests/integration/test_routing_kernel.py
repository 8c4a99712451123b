"""`KernelRoutes` on the real kernel, inside a fresh network namespace (never the host's routing).

Topology (names carry a per-run prefix `rt<hex>`): namespace A with `eth1` 198.18.60.2/24 (default
route via 198.18.60.1, the other end of the veth in namespace GW) and a TUN device `wt<hex>` standing
in for the mesh interface (100.64.0.1/10; a TUN link is point-to-point like WireGuard; without a
reader it has no carrier, which `ip route get` does not mind). The agent's code runs in a child
process inside A (`ip netns exec`, one `KernelRoutes` for the whole test, driven over stdin/stdout);
checks use `ip route get`, `ip rule` and `ip route show table all` in A. "The internet" is
198.19.77.0/24; nothing is sent anywhere: the test only asks the kernel which way packets would go.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.netns import have_netns, run

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = "198.18.60.1"
LAN = "198.18.60.0/24"
MESH_IP = "100.64.0.1"
BYPASS = "198.19.77.10"
INTERNET_HOST = "198.19.77.1"

DRIVER = r"""
import json, sys
from agent.routing import ExitPlan, KernelRoutes, RoutingError, RoutingPlan
routes = KernelRoutes(sys.argv[1])
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "apply":
            p = cmd["plan"]
            exit_plan = ExitPlan(tuple(p["exit"])) if p.get("exit") is not None else None
            plan = RoutingPlan(p["interface"], tuple(p.get("prefixes", ())), exit_plan, p.get("forwarding", False))
            out = {"ok": True, "report": routes.apply(plan).to_json()}
        elif cmd["op"] == "remove":
            routes.remove()
            out = {"ok": True}
        else:
            out = {"ok": True, "report": routes.status().to_json()}
    except RoutingError as exc:
        out = {"ok": False, "error": str(exc), "report": exc.report.to_json() if exc.report else None}
    print(json.dumps(out), flush=True)
"""

SYSCTLS = (
    "/proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/*/forwarding"
    " /proc/sys/net/ipv4/conf/*/accept_redirects /proc/sys/net/ipv4/conf/*/rp_filter"
)


@dataclass
class RoutingLab:
    prefix: str = field(default_factory=lambda: "rt" + secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    driver: subprocess.Popen[str] | None = None

    @property
    def ns(self) -> str:
        return f"{self.prefix}-a"

    @property
    def mesh(self) -> str:
        return f"wt{self.prefix[2:]}"

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns, *cmd, check=check)

    def start(self) -> None:
        gw = f"{self.prefix}-gw"
        for ns in (self.ns, gw):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            # IPv4 only: IPv6 link-local routes appear on their own after a link comes up (DAD), and
            # would make the before/after dumps differ for reasons that are not the agent's
            for key in ("all", "default"):
                run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        self.exec("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "gw0", "netns", gw)
        run("ip", "netns", "exec", gw, "ip", "addr", "add", f"{GATEWAY}/24", "dev", "gw0")
        run("ip", "netns", "exec", gw, "ip", "link", "set", "gw0", "up")
        self.exec("ip", "addr", "add", "198.18.60.2/24", "dev", "eth1")
        self.exec("ip", "link", "set", "eth1", "up")
        self.exec("ip", "route", "add", "default", "via", GATEWAY)
        self.exec("ip", "tuntap", "add", "dev", self.mesh, "mode", "tun")
        self.exec("ip", "addr", "add", f"{MESH_IP}/10", "dev", self.mesh)
        self.exec("ip", "link", "set", self.mesh, "up")
        self.driver = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", DRIVER, self.mesh],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )

    def call(self, op: str, **plan: Any) -> dict[str, Any]:
        assert self.driver is not None and self.driver.stdin is not None and self.driver.stdout is not None
        msg = {"op": op, "plan": {"interface": self.mesh, **plan}}
        self.driver.stdin.write(json.dumps(msg) + "\n")
        self.driver.stdin.flush()
        line = self.driver.stdout.readline()
        assert line, "the routing driver died (see stderr above)"
        result: dict[str, Any] = json.loads(line)
        return result

    def apply(self, **plan: Any) -> dict[str, Any]:
        result = self.call("apply", **plan)
        assert result["ok"], result
        report: dict[str, Any] = result["report"]
        return report

    def route_get(self, *args: str) -> str:
        result = self.exec("ip", "route", "get", *args, check=False)
        return result.stdout if result.returncode == 0 else "error: " + result.stderr.strip()

    def dumps(self) -> tuple[str, str, str]:
        return (
            self.exec("ip", "rule", "show").stdout,
            self.exec("ip", "route", "show", "table", "all").stdout,
            self.exec("ip", "-4", "rule", "show").stdout,
        )

    def sysctls(self) -> str:
        return self.exec("sh", "-c", f"grep -H . {SYSCTLS}").stdout

    def close(self) -> None:
        if self.driver is not None:
            if self.driver.stdin is not None:
                self.driver.stdin.close()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.driver.pid, 9)
                self.driver.wait(5)
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab() -> Iterator[RoutingLab]:
    if not have_netns():
        if os.environ.get("CI"):
            pytest.fail("routing tests need root, iproute2 and /dev/net/tun")
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    lab = RoutingLab()
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


def test_prefix_routes_follow_the_plan(lab: RoutingLab) -> None:
    assert f"via {GATEWAY} dev eth1" in lab.route_get("198.18.61.5")
    report = lab.apply(prefixes=["198.18.61.0/24", "198.18.62.0/24"])
    assert [p["installed"] for p in report["prefixes"]] == [True, True]
    assert report["writes"] == 2
    for address in ("198.18.61.5", "198.18.62.5"):
        assert lab.route_get(address).startswith(f"{address} dev {lab.mesh} ")
    routes = lab.exec("ip", "route", "show").stdout
    assert f"198.18.61.0/24 dev {lab.mesh} proto 83 scope link" in routes
    assert lab.apply(prefixes=["198.18.61.0/24", "198.18.62.0/24"])["writes"] == 0

    line = next(x for x in routes.splitlines() if x.startswith("198.18.62.0/24"))
    report = lab.apply(prefixes=["198.18.62.0/24"])
    assert report["writes"] == 1
    assert f"via {GATEWAY} dev eth1" in lab.route_get("198.18.61.5")
    after = lab.exec("ip", "route", "show").stdout
    assert "198.18.61.0/24" not in after
    assert line in after.splitlines()

    # a prefix this host is directly on is never installed; the other is unaffected
    report = lab.apply(prefixes=[LAN, "198.18.62.0/24"])
    assert report["prefixes"][0] == {
        "prefix": LAN,
        "installed": False,
        "reason": f"{LAN} overlaps {LAN} on eth1, where this host is directly connected",
    }
    assert lab.route_get("198.18.60.5").startswith("198.18.60.5 dev eth1 ")
    status = lab.call("status")["report"]
    assert [(p["prefix"], p["installed"]) for p in status["prefixes"]] == [(LAN, False), ("198.18.62.0/24", True)]

    # a route removed from outside is reported and put back by the next apply
    lab.exec("ip", "route", "del", "198.18.62.0/24", "dev", lab.mesh)
    assert lab.call("status")["report"]["prefixes"][1]["installed"] is False
    assert lab.apply(prefixes=["198.18.62.0/24"])["writes"] == 1
    assert lab.route_get("198.18.62.5").startswith(f"198.18.62.5 dev {lab.mesh} ")


def test_exit_node_routes_around_the_bypass_and_remove_restores_exactly(lab: RoutingLab) -> None:
    for key in ("all", lab.mesh, "eth1"):  # strict reverse-path filtering, as many hosts have it
        lab.exec("sysctl", "-q", "-w", f"net.ipv4.conf.{key}.rp_filter=1")
    before = lab.dumps()
    reply_from_internet = (MESH_IP, "from", INTERNET_HOST, "iif", lab.mesh)
    assert lab.route_get(*reply_from_internet).startswith("error: ")  # strict rp_filter drops it today

    report = lab.apply(prefixes=["198.18.61.0/24"], exit=[BYPASS, "198.19.77.11/32"])
    assert report["exit"] == {
        "installed": True,
        "table": 52100,
        "bypass": [BYPASS, "198.19.77.11"],
        "fwmark": None,
        "reason": "",
    }
    assert lab.route_get(INTERNET_HOST).startswith(f"{INTERNET_HOST} dev {lab.mesh} table 52100 ")
    assert lab.route_get(BYPASS).startswith(f"{BYPASS} via {GATEWAY} dev eth1 ")
    assert lab.route_get("100.64.7.7").startswith(f"100.64.7.7 dev {lab.mesh} src {MESH_IP} ")  # main
    assert lab.route_get("198.18.60.5").startswith("198.18.60.5 dev eth1 ")  # connected LAN: main
    assert lab.route_get("198.18.61.5").startswith(f"198.18.61.5 dev {lab.mesh} ")  # route prefix: main
    # replies come back through the tunnel and pass strict rp_filter; so do the bypass's replies on eth1
    assert lab.route_get(*reply_from_internet).startswith(f"local {MESH_IP} from {INTERNET_HOST} ")
    assert not lab.route_get("198.18.60.2", "from", BYPASS, "iif", "eth1").startswith("error: ")
    rules = lab.exec("ip", "rule", "show").stdout
    assert f"5210:\tfrom all to {BYPASS} lookup main proto 83" in rules
    assert "5220:\tfrom all lookup main suppress_prefixlength 0 proto 83" in rules
    assert "5230:\tfrom all lookup 52100 proto 83" in rules
    assert lab.apply(prefixes=["198.18.61.0/24"], exit=[BYPASS, "198.19.77.11"])["writes"] == 0

    # a new bypass set changes the bypass rules only
    report = lab.apply(prefixes=["198.18.61.0/24"], exit=[BYPASS, "198.19.77.12"])
    assert report["writes"] == 2
    changed = lab.exec("ip", "rule", "show").stdout
    assert [x for x in rules.splitlines() if "198.19.77.1" not in x] == [
        x for x in changed.splitlines() if "198.19.77.1" not in x
    ]
    assert lab.route_get("198.19.77.11").startswith(f"198.19.77.11 dev {lab.mesh} table 52100 ")
    assert lab.route_get("198.19.77.12").startswith(f"198.19.77.12 via {GATEWAY} dev eth1 ")

    result = lab.call("remove")
    assert result["ok"], result
    assert lab.dumps() == before
    assert lab.route_get(INTERNET_HOST).startswith(f"{INTERNET_HOST} via {GATEWAY} dev eth1 ")
    assert lab.route_get(*reply_from_internet).startswith("error: ")


def test_exit_node_dropped_by_a_new_plan_restores_the_rules(lab: RoutingLab) -> None:
    before = lab.dumps()
    lab.apply(exit=[BYPASS])
    assert lab.dumps() != before
    report = lab.apply()
    assert report["exit"] is None and report["writes"] == 4  # exit rule, table route, main rule, bypass rule
    assert lab.dumps() == before


def test_forwarding_is_turned_on_and_everything_it_touched_is_restored(lab: RoutingLab) -> None:
    # a hardened host: no ICMP redirects accepted. Writing ip_forward=0 makes the kernel set
    # all.accept_redirects=1 (inet_forward_change): the agent must put the 0 back.
    lab.exec("sysctl", "-q", "-w", "net.ipv4.ip_forward=0")  # a new namespace may inherit the host's 1
    lab.exec("sysctl", "-q", "-w", "net.ipv4.conf.all.accept_redirects=0")
    lab.exec("sysctl", "-q", "-w", "net.ipv4.conf.eth1.forwarding=1")  # per-interface, also rewritten
    before = lab.sysctls()
    assert "/proc/sys/net/ipv4/ip_forward:0" in before

    report = lab.apply(forwarding=True)
    assert report["forwarding"] and report["forwarding_changed"] and report["writes"] == 1
    assert "/proc/sys/net/ipv4/ip_forward:1" in lab.sysctls()
    assert lab.apply(forwarding=True)["writes"] == 0
    # the routing peer's side of a routed packet from a mesh client passes strict rp_filter
    lab.exec("sysctl", "-q", "-w", f"net.ipv4.conf.{lab.mesh}.rp_filter=1")
    assert lab.route_get("198.18.60.5", "from", "100.64.0.2", "iif", lab.mesh).startswith("198.18.60.5 from")
    lab.exec("sysctl", "-q", "-w", f"net.ipv4.conf.{lab.mesh}.rp_filter=0")

    report = lab.apply(forwarding=False)
    assert not report["forwarding"] and not report["forwarding_changed"]
    assert lab.sysctls() == before

    lab.apply(forwarding=True)
    result = lab.call("remove")
    assert result["ok"], result
    assert lab.sysctls() == before


def test_missing_interface_is_a_clear_error(lab: RoutingLab) -> None:
    assert lab.driver is not None and lab.driver.stdin is not None and lab.driver.stdout is not None
    lab.driver.stdin.write(json.dumps({"op": "apply", "plan": {"interface": "wtnothere"}}) + "\n")
    lab.driver.stdin.flush()
    result = json.loads(lab.driver.stdout.readline())
    assert result["ok"] is False
    assert result["error"] == "interface wtnothere does not exist: no route changed"
