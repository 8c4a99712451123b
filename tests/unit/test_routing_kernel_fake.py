"""`KernelRoutes` against an in-memory rtnetlink (kernel semantics of replace/add/delete) and a
/proc/sys in a temporary directory: idempotence (no write on a second apply), what is owned, errors
that name the route or rule, the order of exit-node changes, and the sysctl bookkeeping.
The same behaviour on the real kernel: tests/integration/test_routing_kernel.py."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.routing.kernel import (
    EXIT_TABLE,
    MAIN_TABLE,
    PRIO_BYPASS,
    PRIO_EXIT,
    PRIO_MAIN,
    ROUTE_PROTO,
    KernelRoutes,
    KRoute,
    KRule,
    Rtnl,
    Sysctl,
)
from agent.routing.plan import ExitPlan, RoutingPlan
from agent.routing.port import RoutingError

N = ipaddress.IPv4Network


class FakeKernel:
    """Links, addresses, routes and rules with the kernel's matching rules; `fail` holds operations
    (e.g. "route_replace 198.18.41.0/24") that raise like a NetlinkError would."""

    def __init__(self) -> None:
        self.names = {1: "lo", 2: "eth0", 3: "wt0"}
        self.addrs = [(1, "127.0.0.1", 8), (2, "198.18.40.7", 24), (3, "100.64.0.1", 10)]
        self.route_list: list[KRoute] = [
            KRoute(MAIN_TABLE, N("0.0.0.0/0"), 2, proto=3, scope=0, gateway="198.18.40.1"),
            KRoute(MAIN_TABLE, N("198.18.40.0/24"), 2, proto=2),
            KRoute(MAIN_TABLE, N("100.64.0.0/10"), 3, proto=2),
        ]
        self.rule_list: list[KRule] = [
            KRule(0, 255, protocol=2),
            KRule(32766, MAIN_TABLE, protocol=2),
            KRule(32767, 253, protocol=2),
        ]
        self.log: list[str] = []
        self.fail: set[str] = set()

    def _op(self, name: str, what: object) -> None:
        self.log.append(f"{name} {what}")
        if f"{name} {what}" in self.fail:
            raise OSError(1, "Operation not permitted")

    # Rtnl
    def links(self) -> dict[int, str]:
        return dict(self.names)

    def addresses(self) -> list[tuple[int, str, int]]:
        return list(self.addrs)

    def routes(self, table: int) -> list[KRoute]:
        return [r for r in self.route_list if r.table == table]

    def rules(self) -> list[KRule]:
        return sorted(self.rule_list, key=lambda r: r.priority)

    def route_replace(self, route: KRoute) -> None:
        self._op("route_replace", route.dst if route.table == MAIN_TABLE else f"{route.dst} table {route.table}")
        self.route_list = [r for r in self.route_list if r.key != route.key] + [route]

    def route_delete(self, route: KRoute) -> None:
        self._op("route_delete", route.dst if route.table == MAIN_TABLE else f"{route.dst} table {route.table}")
        match = [r for r in self.route_list if r.key == route.key and r.oif == route.oif and r.proto == route.proto]
        if not match:
            raise OSError(3, "No such process")
        self.route_list.remove(match[0])

    def rule_add(self, rule: KRule) -> None:
        self._op("rule_add", rule.describe())
        if rule in self.rule_list:
            raise OSError(17, "File exists")
        self.rule_list.append(rule)

    def rule_delete(self, rule: KRule) -> None:
        self._op("rule_delete", rule.describe())
        if rule not in self.rule_list:
            raise OSError(2, "No such file or directory")
        self.rule_list.remove(rule)

    @contextlib.contextmanager
    def open(self) -> Iterator[Rtnl]:
        yield self

    def dump(self) -> tuple[list[KRoute], list[KRule]]:
        return sorted(self.route_list, key=str), self.rules()


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def sysctl(tmp_path: Path) -> Sysctl:
    root = tmp_path / "sys"
    (root / "net/ipv4").mkdir(parents=True)
    (root / "net/ipv4/ip_forward").write_text("0\n")
    for name, fwd, redirects in (("all", "0", "1"), ("default", "0", "1"), ("eth0", "1", "1"), ("wt0", "0", "1")):
        (root / f"net/ipv4/conf/{name}").mkdir(parents=True)
        (root / f"net/ipv4/conf/{name}/forwarding").write_text(fwd + "\n")
        (root / f"net/ipv4/conf/{name}/accept_redirects").write_text(redirects + "\n")
    return Sysctl(root)


def routes_for(kernel: FakeKernel, sysctl: Sysctl, state_file: Path | None = None) -> KernelRoutes:
    return KernelRoutes("wt0", rtnl=kernel.open, sysctl=sysctl, state_file=state_file)


def test_apply_installs_prefixes_and_a_second_apply_writes_nothing(kernel: FakeKernel, sysctl: Sysctl) -> None:
    routes = routes_for(kernel, sysctl)
    plan = RoutingPlan("wt0", ("198.18.41.0/24", "198.18.42.0/24"))
    report = routes.apply(plan)
    assert report.installed == ("198.18.41.0/24", "198.18.42.0/24")
    assert report.writes == 2
    assert KRoute(MAIN_TABLE, N("198.18.41.0/24"), 3) in kernel.route_list
    again = routes.apply(plan)
    assert again.writes == 0
    assert again.installed == report.installed
    assert routes.status().installed == report.installed


def test_a_removed_prefix_goes_and_the_other_is_not_touched(kernel: FakeKernel, sysctl: Sysctl) -> None:
    routes = routes_for(kernel, sysctl)
    routes.apply(RoutingPlan("wt0", ("198.18.41.0/24", "198.18.42.0/24")))
    kernel.log.clear()
    report = routes.apply(RoutingPlan("wt0", ("198.18.42.0/24",)))
    assert kernel.log == ["route_delete 198.18.41.0/24"]
    assert report.writes == 1
    assert [r.dst for r in kernel.route_list if r.proto == ROUTE_PROTO] == [N("198.18.42.0/24")]


def test_overlapping_prefix_is_skipped_with_the_reason_and_reevaluated(kernel: FakeKernel, sysctl: Sysctl) -> None:
    routes = routes_for(kernel, sysctl)
    report = routes.apply(RoutingPlan("wt0", ("198.18.40.0/24", "198.18.41.0/24")))
    assert report.skipped == {
        "198.18.40.0/24": "198.18.40.0/24 overlaps 198.18.40.0/24 on eth0, where this host is directly connected"
    }
    assert routes.status().skipped == report.skipped
    # the host leaves that LAN: the next apply installs the prefix
    kernel.addrs = [a for a in kernel.addrs if a[0] != 2]
    kernel.route_list = [r for r in kernel.route_list if r.oif != 2]
    assert routes.apply(RoutingPlan("wt0", ("198.18.40.0/24", "198.18.41.0/24"))).skipped == {}
    # and back: the route the agent installed is deleted again, since the host is on that LAN now
    kernel.addrs.append((2, "198.18.40.7", 24))
    report = routes.apply(RoutingPlan("wt0", ("198.18.40.0/24", "198.18.41.0/24")))
    assert "198.18.40.0/24" in report.skipped
    assert N("198.18.40.0/24") not in [r.dst for r in kernel.route_list if r.proto == ROUTE_PROTO]


def test_a_route_the_agent_does_not_own_is_never_replaced(kernel: FakeKernel, sysctl: Sysctl) -> None:
    static = KRoute(MAIN_TABLE, N("198.18.50.0/24"), 2, proto=4, scope=0, gateway="198.18.40.9")
    kernel.route_list.append(static)
    report = routes_for(kernel, sysctl).apply(RoutingPlan("wt0", ("198.18.50.0/24",)))
    assert report.skipped["198.18.50.0/24"] == (
        "198.18.50.0/24: the host already has a route for it (198.18.50.0/24 via 198.18.40.9 dev eth0 proto 4)"
        " that the agent does not own"
    )
    assert static in kernel.route_list
    assert report.writes == 0


def test_stale_routes_of_the_agent_are_removed_foreign_ones_kept(kernel: FakeKernel, sysctl: Sysctl) -> None:
    ours_left_over = KRoute(MAIN_TABLE, N("198.18.60.0/24"), 3)  # e.g. from before a restart
    theirs = KRoute(MAIN_TABLE, N("198.18.61.0/24"), 3, proto=4)
    kernel.route_list += [ours_left_over, theirs]
    routes_for(kernel, sysctl).apply(RoutingPlan("wt0"))
    assert ours_left_over not in kernel.route_list
    assert theirs in kernel.route_list


def test_exit_node_rules_order_and_idempotence(kernel: FakeKernel, sysctl: Sysctl) -> None:
    before = kernel.dump()
    routes = routes_for(kernel, sysctl)
    plan = RoutingPlan("wt0", exit=ExitPlan(("198.19.77.10", "198.19.77.11")))
    report = routes.apply(plan)
    assert report.exit is not None and report.exit.installed
    assert kernel.log == [
        f"rule_add {PRIO_BYPASS}: to 198.19.77.10/32 lookup main",
        f"rule_add {PRIO_BYPASS}: to 198.19.77.11/32 lookup main",
        f"rule_add {PRIO_MAIN}: from all lookup main suppress_prefixlength 0",
        f"route_replace 0.0.0.0/0 table {EXIT_TABLE}",
        f"rule_add {PRIO_EXIT}: from all lookup {EXIT_TABLE}",
    ]
    assert routes.apply(plan).writes == 0
    assert routes.status().exit == report.exit
    # a new bypass set changes only the bypass rules (the new one is added before the old one goes)
    kernel.log.clear()
    routes.apply(RoutingPlan("wt0", exit=ExitPlan(("198.19.77.10", "198.19.77.12"))))
    assert kernel.log == [
        f"rule_add {PRIO_BYPASS}: to 198.19.77.12/32 lookup main",
        f"rule_delete {PRIO_BYPASS}: to 198.19.77.11/32 lookup main",
    ]
    # dropping the exit node: the exit rule goes first, the bypass rules last
    kernel.log.clear()
    routes.apply(RoutingPlan("wt0"))
    assert kernel.log[0] == f"rule_delete {PRIO_EXIT}: from all lookup {EXIT_TABLE}"
    assert kernel.log[1] == f"route_delete 0.0.0.0/0 table {EXIT_TABLE}"
    assert kernel.dump() == before


def test_exit_with_fwmark_uses_not_fwmark(kernel: FakeKernel, sysctl: Sysctl) -> None:
    routes_for(kernel, sysctl).apply(RoutingPlan("wt0", exit=ExitPlan(fwmark=0xCA6C)))
    assert KRule(PRIO_EXIT, EXIT_TABLE, fwmark=0xCA6C, invert=True) in kernel.rule_list
    assert KRule(PRIO_EXIT, EXIT_TABLE, fwmark=0xCA6C, invert=True).describe() == (
        f"{PRIO_EXIT}: not from all fwmark 0xca6c lookup {EXIT_TABLE}"
    )


def test_prefix_containing_a_bypass_address_is_skipped(kernel: FakeKernel, sysctl: Sysctl) -> None:
    plan = RoutingPlan("wt0", ("198.19.77.0/24",), ExitPlan(("198.19.77.10",)))
    report = routes_for(kernel, sysctl).apply(plan)
    assert "contains 198.19.77.10" in report.skipped["198.19.77.0/24"]


def test_errors_name_the_route_and_rule_and_the_rest_is_still_applied(kernel: FakeKernel, sysctl: Sysctl) -> None:
    kernel.fail = {"route_replace 198.18.41.0/24", f"route_replace 0.0.0.0/0 table {EXIT_TABLE}"}
    routes = routes_for(kernel, sysctl)
    plan = RoutingPlan("wt0", ("198.18.41.0/24", "198.18.42.0/24"), ExitPlan(("198.19.77.10",)))
    with pytest.raises(RoutingError) as caught:
        routes.apply(plan)
    message = str(caught.value)
    assert "cannot install route '198.18.41.0/24 dev wt0 proto 83': Operation not permitted (errno 1)" in message
    assert f"cannot install route 'default dev wt0 table {EXIT_TABLE} proto 83'" in message
    report = caught.value.report
    assert report is not None
    assert report.installed == ("198.18.42.0/24",)
    assert report.skipped["198.18.41.0/24"].startswith("cannot install: ")
    assert report.exit is not None and not report.exit.installed
    # the exit rule was not added without its table: the agent's traffic keeps the main table
    assert not [r for r in kernel.rule_list if r.table == EXIT_TABLE]
    kernel.fail = set()
    assert routes.apply(plan).exit.installed  # type: ignore[union-attr]


def test_missing_interface_is_an_error_that_changes_nothing(kernel: FakeKernel, sysctl: Sysctl) -> None:
    before = kernel.dump()
    with pytest.raises(RoutingError, match="interface wt7 does not exist"):
        routes_for(kernel, sysctl).apply(RoutingPlan("wt7", ("198.18.41.0/24",)))
    assert kernel.dump() == before and kernel.log == []


def test_remove_restores_routes_rules_and_sysctls(kernel: FakeKernel, sysctl: Sysctl) -> None:
    before = kernel.dump()
    values = {p: p.read_text() for p in sysctl.root.rglob("*") if p.is_file()}
    routes = routes_for(kernel, sysctl)
    report = routes.apply(RoutingPlan("wt0", ("198.18.41.0/24",), ExitPlan(("198.19.77.10",)), forwarding=True))
    assert report.forwarding and report.forwarding_changed
    assert sysctl.read("net/ipv4/ip_forward") == "1"
    # what the kernel does on an ip_forward write, done here by hand: every interface follows
    # (conf/all/forwarding is ip_forward itself in the kernel: not a separate file to restore)
    for name in ("default", "eth0", "wt0"):
        sysctl.write(f"net/ipv4/conf/{name}/forwarding", "1")
    sysctl.write("net/ipv4/conf/all/accept_redirects", "0")
    routes.remove()
    assert kernel.dump() == before
    assert {p: p.read_text() for p in sysctl.root.rglob("*") if p.is_file()} == values


def test_a_netlink_read_failure_is_a_routing_error(sysctl: Sysctl) -> None:
    @contextlib.contextmanager
    def broken() -> Iterator[Rtnl]:
        raise OSError(13, "Permission denied")
        yield  # pragma: no cover

    routes = KernelRoutes("wt0", rtnl=broken, sysctl=sysctl)
    with pytest.raises(RoutingError, match="cannot read the kernel's routes and rules: Permission denied"):
        routes.apply(RoutingPlan("wt0", ("198.18.41.0/24",)))


def test_status_before_any_apply_names_the_interface(kernel: FakeKernel, sysctl: Sysctl) -> None:
    report = routes_for(kernel, sysctl).status()
    assert (report.interface, report.prefixes, report.exit, report.forwarding) == ("wt0", (), None, False)


def test_forwarding_already_on_is_left_alone(kernel: FakeKernel, sysctl: Sysctl) -> None:
    sysctl.write("net/ipv4/ip_forward", "1")
    routes = routes_for(kernel, sysctl)
    report = routes.apply(RoutingPlan("wt0", forwarding=True))
    assert report.forwarding and not report.forwarding_changed and report.writes == 0
    routes.apply(RoutingPlan("wt0", forwarding=False))
    assert sysctl.read("net/ipv4/ip_forward") == "1"


def test_forwarding_restore_survives_a_restart_through_the_state_file(
    kernel: FakeKernel, sysctl: Sysctl, tmp_path: Path
) -> None:
    state = tmp_path / "routing.json"
    routes_for(kernel, sysctl, state).apply(RoutingPlan("wt0", forwarding=True))
    assert json.loads(state.read_text())["sysctl"]["net/ipv4/ip_forward"] == "0"
    restarted = routes_for(kernel, sysctl, state)
    report = restarted.apply(RoutingPlan("wt0", forwarding=True))
    assert report.writes == 0 and report.forwarding_changed
    restarted.apply(RoutingPlan("wt0", forwarding=False))
    assert sysctl.read("net/ipv4/ip_forward") == "0"
    assert not state.exists()
    state.write_text("{")
    with pytest.raises(RoutingError, match="unreadable routing state"):
        routes_for(kernel, sysctl, state)
