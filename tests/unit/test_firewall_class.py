"""The `Firewall` state machine against an in-memory nft (FakeKernel): fail closed, whole-map
rejection, retries, drift repair, disabled mode. Real nftables is exercised in
tests/integration/test_firewall_nft.py."""

from __future__ import annotations

from typing import Any

import pytest
from test_firewall_compile import DST, SRC, FakeKernel, fw, listing_of, rule

from agent.firewall import (
    DISABLED_MESSAGE,
    Firewall,
    FirewallError,
    FirewallMapError,
    compile_firewall,
    full_build,
    nft_set_name,
)


class Fake(FakeKernel):
    command = ["nft"]
    own_pids: list[int] = []


def make(mode: str = "enforce") -> tuple[Firewall, Fake, list[str]]:
    drifts: list[str] = []
    firewall = Firewall("wt0", mode=mode, monitor=False, on_drift=drifts.append)  # type: ignore[arg-type]
    kernel = Fake()
    firewall._nft = kernel  # type: ignore[assignment]
    return firewall, kernel, drifts


def expected(firewall: dict[str, Any]) -> Any:
    kernel = FakeKernel()
    kernel.apply(full_build(compile_firewall(firewall, "wt0")).commands)
    return listing_of(kernel)


def test_guard_first_then_enforcing() -> None:
    firewall, kernel, _ = make()
    assert firewall.status()["state"] == "absent"
    firewall.install_guard()
    firewall.install_guard()  # idempotent
    status = firewall.status()
    assert (status["state"], status["installed"], status["rules"]) == ("guard", "guard", 0)
    assert kernel.table is not None and kernel.table["rules"]["mesh_in"] == [{"expr": [{"drop": None}]}]
    result = firewall.apply(fw(rule(), rule("out", "icmp", ())))
    assert result.changed and not result.full_rebuild and result.chains_rebuilt == ("mesh_in", "mesh_out")
    assert listing_of(kernel) == expected(fw(rule(), rule("out", "icmp", ())))
    status = firewall.status()
    assert (status["state"], status["rules"], status["sets"], status["elements"]) == ("enforcing", 2, 1, 2)
    firewall.install_guard()  # enforcing: the guard does not replace the ruleset
    assert status["state"] == firewall.status()["state"] == "enforcing"


def test_apply_without_guard_installs_the_guard_first() -> None:
    firewall, kernel, _ = make()
    firewall.apply(fw(rule()))
    first = kernel.batches[0]
    assert first[1] == {"delete": {"table": {"family": "inet", "name": "starling"}}}
    assert not any("set" in c.get("add", {}) for c in first)  # the guard has no sets


def test_malformed_map_is_rejected_whole_and_the_previous_ruleset_stays() -> None:
    firewall, kernel, _ = make()
    firewall.apply(fw(rule()))
    before, batches = listing_of(kernel), len(kernel.batches)
    bad = fw(rule(), rule("out", ports=[(70000, 70001)]), sets={SRC: ["100.64.0.1"], DST: ["100.64.0.2"]})
    with pytest.raises(FirewallMapError, match="70000 is outside 1-65535"):  # not worth a retry
        firewall.apply(bad)
    assert len(kernel.batches) == batches and listing_of(kernel) == before
    status = firewall.status()
    assert status["state"] == "error" and status["installed"] == "ruleset"
    assert "map rejected, nothing applied" in status["last_error"]
    firewall.apply(fw(rule()))
    assert firewall.status()["state"] == "enforcing" and firewall.status()["last_error"] is None


def test_nft_failure_keeps_the_guard_and_a_retry_succeeds() -> None:
    firewall, kernel, _ = make()
    firewall.install_guard()
    guard = listing_of(kernel)
    kernel.failing = True
    reason = r"the guard \(all mesh traffic dropped\) stays active: .*simulated"
    with pytest.raises(FirewallError, match=reason) as info:
        firewall.apply(fw(rule()))
    assert not isinstance(info.value, FirewallMapError)  # worth a retry
    assert listing_of(kernel) == guard
    assert firewall.status()["state"] == "error" and "simulated failure" in firewall.status()["last_error"]
    kernel.failing = False
    firewall.apply(fw(rule()))
    assert listing_of(kernel) == expected(fw(rule())) and firewall.status()["state"] == "enforcing"


def test_incremental_update_on_a_tampered_table_falls_back_to_a_rebuild() -> None:
    firewall, kernel, drifts = make()
    firewall.apply(fw(rule()))
    assert kernel.table is not None
    kernel.table["sets"][nft_set_name(SRC)].discard("100.64.0.9")  # someone removed an element
    new = fw(rule(), sets={SRC: ["100.64.0.7"], DST: []})  # our diff deletes 100.64.0.9: nft refuses
    result = firewall.apply(new)
    assert result.full_rebuild and listing_of(kernel) == expected(new)
    assert len(drifts) == 1 and "1 address removed (100.64.0.9)" in drifts[0]


@pytest.mark.parametrize("tamper", ["element", "flush", "delete", "rule", "dormant"])
def test_check_drift_repairs_and_reports(tamper: str) -> None:
    firewall, kernel, drifts = make()
    firewall.apply(fw(rule()))
    assert firewall.check_drift() is False and drifts == []
    table = kernel.table
    assert table is not None
    if tamper == "element":
        table["sets"][nft_set_name(SRC)].add("100.64.3.3")
    elif tamper == "flush":
        for chain in table["rules"]:
            table["rules"][chain] = []
    elif tamper == "delete":
        kernel.table = None
    elif tamper == "rule":
        table["rules"]["mesh_in"].insert(0, {"expr": [{"accept": None}]})
    else:
        table["attrs"]["flags"] = ["dormant"]
    assert firewall.check_drift() is True
    assert listing_of(kernel) == expected(fw(rule()))
    assert len(drifts) == 1 and drifts[0].startswith("table inet starling changed outside Starling")
    assert firewall.status()["drift_repairs"] == 1 and firewall.status()["last_drift"]["description"] == drifts[0]
    assert firewall.check_drift() is False


def test_disabled_mode_installs_nothing() -> None:
    firewall, kernel, _ = make("disabled")
    firewall.install_guard()
    result = firewall.apply(fw(rule()))
    assert not result.applied and result.rules == 1
    assert kernel.table is None and firewall.check_drift() is False
    assert all(c == [] or "delete" in str(c) for c in kernel.batches)  # at most: remove a leftover table
    status = firewall.status()
    assert (status["mode"], status["state"], status["message"]) == ("disabled", "disabled", DISABLED_MESSAGE)


def test_remove_deletes_only_our_table() -> None:
    firewall, kernel, _ = make()
    firewall.apply(fw(rule()))
    firewall.remove()
    assert kernel.table is None and firewall.status()["state"] == "absent"
    assert kernel.batches[-1] == [
        {"add": {"table": {"family": "inet", "name": "starling"}}},
        {"delete": {"table": {"family": "inet", "name": "starling"}}},
    ]


def test_bad_mode_and_interface() -> None:
    with pytest.raises(FirewallError, match="mode"):
        Firewall("wt0", mode="audit")  # type: ignore[arg-type]
    with pytest.raises(FirewallError, match="interface"):
        Firewall("wt0;drop")


class _Lines:
    def __init__(self, text: str) -> None:
        self.stdout = iter(text.splitlines(keepends=True))


def test_monitor_flags_only_foreign_changes_to_our_table() -> None:
    from agent.firewall.nft import Monitor, Nft

    nft = Nft("nft")
    nft.own_pids.append(100)  # a batch of ours
    feed = [
        ("add element inet starling s_1 { 100.64.0.9 }\n# new generation 7 by process 100 (nft)\n", False),
        ("add rule ip filter INPUT counter accept\n# new generation 8 by process 555 (iptables-nft)\n", False),
        ("flush chain inet starling mesh_in\n# new generation 9 by process 555 (nft)\n", True),
        ("delete table inet starling\n# new generation 10 by process 101 (nft)\n", True),
    ]
    for text, foreign in feed:
        monitor = Monitor(nft)
        marks: list[str] = []
        monitor.mark_dirty = lambda marks=marks: marks.append("dirty")  # type: ignore[method-assign,misc]
        monitor._read(_Lines(text))  # type: ignore[arg-type]
        assert len(marks) == (2 if foreign else 1), text  # the end of the stream always marks dirty


def test_failed_repair_is_an_error_and_the_next_apply_rebuilds() -> None:
    firewall, kernel, drifts = make()
    firewall.apply(fw(rule()))
    kernel.table = None  # deleted by someone
    kernel.failing = True
    with pytest.raises(FirewallError, match="repair failed"):
        firewall.check_drift()
    assert firewall.status()["state"] == "error" and drifts == []
    kernel.failing = False
    result = firewall.apply(fw(rule()))  # same map: still rebuilt, the kernel state is unknown
    assert result.full_rebuild and listing_of(kernel) == expected(fw(rule()))
    assert firewall.status()["state"] == "enforcing"
    assert firewall.check_drift() is False


def test_a_failed_repair_is_retried_by_the_next_check() -> None:
    firewall, kernel, drifts = make()
    firewall.apply(fw(rule()))
    kernel.table = None
    kernel.failing = True
    with pytest.raises(FirewallError):
        firewall.check_drift()
    kernel.failing = False
    assert firewall.check_drift() is True and len(drifts) == 1
    assert firewall.status()["state"] == "enforcing" and firewall.status()["last_error"] is None
