"""The routing plan's validation and the pure overlap checks (agent.routing.plan)."""

from __future__ import annotations

import ipaddress

import pytest

from agent.routing.plan import (
    ConnectedNet,
    ExitPlan,
    RoutingPlan,
    connected_networks,
    overlap_reason,
    underlay_reason,
)
from agent.routing.port import PrefixState, RoutingReport


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def test_plan_normalises_prefixes_sorted_and_unique() -> None:
    plan = RoutingPlan("wt0", ("198.18.41.0/24", "198.18.40.0/24", "198.18.41.0/24"))
    assert plan.prefixes == ("198.18.40.0/24", "198.18.41.0/24")
    assert plan.networks == (net("198.18.40.0/24"), net("198.18.41.0/24"))


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("0.0.0.0/0", "RoutingPlan.exit"),
        ("198.18.40.1/24", "canonical"),
        ("100.64.3.0/24", "mesh range"),
        ("127.0.0.0/8", "loopback"),
        ("198.18.40.0", "IPv4 prefix"),
        ("2001:db8::/32", "IPv4 prefix"),
    ],
)
def test_plan_refuses_bad_prefixes(prefix: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RoutingPlan("wt0", (prefix,))


@pytest.mark.parametrize("name", ["", "a" * 16, "wt 0", "a/b"])
def test_plan_refuses_bad_interface_names(name: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        RoutingPlan(name)


def test_exit_plan_normalises_bypass_and_checks_fwmark() -> None:
    plan = ExitPlan(("198.19.77.10/32", "198.19.77.2", "198.19.77.10", " 198.19.77.11 "))
    assert plan.bypass == ("198.19.77.2", "198.19.77.10", "198.19.77.11")
    assert ExitPlan(fwmark=0xCA6C).fwmark == 0xCA6C
    with pytest.raises(ValueError, match="IPv4 address"):
        ExitPlan(("198.19.77.0/24",))
    with pytest.raises(ValueError, match="IPv4 address"):
        ExitPlan(("2001:db8::1",))
    with pytest.raises(ValueError, match="32-bit mark"):
        ExitPlan(fwmark=0)
    with pytest.raises(ValueError, match="32-bit mark"):
        ExitPlan(fwmark=1 << 32)


def test_plans_compare_by_value() -> None:
    a = RoutingPlan("wt0", ("198.18.40.0/24",), ExitPlan(("198.19.77.10",)), True)
    b = RoutingPlan("wt0", ("198.18.40.0/24", "198.18.40.0/24"), ExitPlan(("198.19.77.10/32",)), True)
    assert a == b
    assert a != RoutingPlan("wt0", ("198.18.40.0/24",), None, True)


def test_connected_networks_skip_the_mesh_interface_loopback_and_default_routes() -> None:
    addresses = [
        ("lo", "127.0.0.1", 8),
        ("eth0", "198.18.40.7", 24),
        ("wt0", "100.64.0.1", 10),
        ("eth1", "198.19.77.20", 24),
    ]
    link_routes = [("eth0", "198.18.40.0", 24), ("ppp0", "0.0.0.0", 0), ("eth2", "198.18.99.0", 25)]
    found = connected_networks(addresses, link_routes, "wt0")
    assert [(str(c.network), c.interface) for c in found] == [
        ("198.18.40.0/24", "eth0"),
        ("198.18.99.0/25", "eth2"),
        ("198.19.77.0/24", "eth1"),
    ]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("198.18.40.0/24", "198.18.40.0/24 overlaps 198.18.40.0/24 on eth1, where this host is directly connected"),
        ("198.18.40.128/25", "198.18.40.128/25 overlaps 198.18.40.0/24 on eth1"),
        ("198.18.0.0/16", "198.18.0.0/16 overlaps 198.18.40.0/24 on eth1"),
        ("198.18.41.0/24", None),
        ("198.19.0.0/24", None),
    ],
)
def test_overlap_reason(prefix: str, expected: str | None) -> None:
    connected = [ConnectedNet(net("198.18.40.0/24"), "eth1"), ConnectedNet(net("198.19.77.0/24"), "eth0")]
    reason = overlap_reason(net(prefix), connected)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_underlay_reason_names_the_address_inside_the_prefix() -> None:
    assert underlay_reason(net("198.19.0.0/16"), ("198.18.1.1", "198.19.77.10")) == (
        "198.19.0.0/16 contains 198.19.77.10, which the agent must reach outside the mesh (underlay)"
    )
    assert underlay_reason(net("198.19.78.0/24"), ("198.19.77.10",)) is None


def test_report_json_and_summary() -> None:
    report = RoutingReport(
        "wt0",
        (PrefixState("198.18.40.0/24", False, "overlaps"), PrefixState("198.18.41.0/24", True)),
        forwarding=True,
        writes=3,
    )
    assert report.installed == ("198.18.41.0/24",)
    assert report.skipped == {"198.18.40.0/24": "overlaps"}
    assert report.to_json()["prefixes"][0] == {"prefix": "198.18.40.0/24", "installed": False, "reason": "overlaps"}
    assert report.summary() == "1 route(s) via wt0, 1 not installed; IPv4 forwarding on"
