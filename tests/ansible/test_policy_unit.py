"""Unit tests of plugins/module_utils/_policy.py: validation, normalization, reachability, assertions."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.ansible import collection_loader

collection_loader.install()

from ansible_collections.starling.mesh.plugins.module_utils import _policy as P  # noqa: E402


def pol(
    name: str, src: list[str], dst: list[str], protocol: str = "any", ports: list[Any] | None = None, **kw: Any
) -> dict[str, Any]:
    def ends(names: list[str]) -> dict[str, list[str]]:
        return {
            "groups": [n for n in names if not n.startswith("peer:")],
            "peers": [n[5:] for n in names if n.startswith("peer:")],
        }

    return P.normalize_policy(
        {
            "name": name,
            "protocol": protocol,
            "ports": ports or [],
            "sources": ends(src),
            "destinations": ends(dst),
            **kw,
        }
    )


@pytest.mark.parametrize(
    "spec,expected",
    [(22, (22, 22)), ("22", (22, 22)), ("8000-8100", (8000, 8100)), (" 80 - 81 ", (80, 81)), (65535, (65535, 65535))],
)
def test_parse_port_ok(spec: Any, expected: tuple[int, int]) -> None:
    assert P.parse_port(spec) == expected


@pytest.mark.parametrize(
    "spec,text",
    [
        (0, "outside"),
        ("70000", "outside"),
        ("9-1", "starts after"),
        ("http", "not a number"),
        (True, "not a number"),
        ("1-2-3", "not a number"),
    ],
)
def test_parse_port_bad(spec: Any, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        P.parse_port(spec)


def test_normalize_policy_matches_coordinator_form() -> None:
    p = pol("x", ["b", "a", "a"], ["peer:web-1"], "tcp", ["8000-8100", 22, "22"])
    assert p["ports"] == ["22", "8000-8100"]
    assert p["sources"] == {"groups": ["a", "b"], "peers": []}
    assert p["destinations"] == {"groups": [], "peers": ["web-1"], "routes": []}
    assert p["enabled"] is True and p["bidirectional"] is False and p["description"] == ""


def test_normalize_policy_lists_every_problem() -> None:
    with pytest.raises(P.PolicyDataError) as err:
        P.normalize_policy(
            {
                "name": "bad name",
                "protocol": "icmp",
                "ports": [0, "x"],
                "sources": {},
                "destinations": {"groups": ["ok"], "hosts": []},
                "colour": "red",
            }
        )
    text = str(err.value)
    for part in (
        "is not valid",
        "unknown keys colour",
        "outside 1-65535",
        "not a number",
        "ports need protocol tcp or udp",
        "sources must name at least one",
        "destinations has unknown keys",
    ):
        assert part in text, text


def test_comparable_policy_of_api_object() -> None:
    api = {
        "id": "1",
        "name": "p",
        "description": "",
        "enabled": True,
        "protocol": "tcp",
        "ports": ["5432"],
        "bidirectional": False,
        "sources": {"groups": ["dev"], "peers": []},
        "destinations": {"groups": ["db"], "peers": []},
        "created_at": "x",
    }
    assert P.comparable_policy(api) == pol("p", ["dev"], ["db"], "tcp", [5432])


def test_intervals() -> None:
    assert P.merge([(5, 9), (1, 3), (4, 4), (20, 30)]) == [(1, 9), (20, 30)]
    assert P.subtract([(1, 100)], [(10, 20), (50, 60)]) == [(1, 9), (21, 49), (61, 100)]
    assert P.subtract([(10, 20)], [(1, 100)]) == []
    assert P.subtract([(10, 20)], []) == [(10, 20)]


def test_reach_diff_gain_loss_and_narrowing() -> None:
    before = [pol("a", ["ci"], ["db"]), pol("b", ["dev"], ["db"], "tcp", [5432])]
    after = [pol("b", ["dev"], ["db"], "tcp", [5432, "8000-8100"]), pol("c", ["ci"], ["db"], "tcp", [22])]
    diff = P.reach_diff(P.reach_map(before), P.reach_map(after))
    assert P.reach_lines(diff) == [
        "+ dev -> db tcp/8000-8100",
        "- ci -> db tcp/1-21,23-65535",
        "- ci -> db udp",
        "- ci -> db icmp",
        "- ci -> db other-protocols",
    ]


def test_reach_diff_any_bidirectional_and_disabled() -> None:
    after = [pol("a", ["ci"], ["peer:db-1"], bidirectional=True), pol("off", ["x"], ["y"], enabled=False)]
    diff = P.reach_diff({}, P.reach_map(after))
    assert P.reach_lines(diff) == ["+ ci -> peer:db-1 any", "+ peer:db-1 -> ci any"]
    assert diff["lost"] == []
    assert P.reach_diff(P.reach_map(after), P.reach_map(after)) == {"gained": [], "lost": []}


def test_reach_overlapping_policies_do_not_lose() -> None:
    before = [pol("a", ["ci"], ["db"], "tcp", [5432]), pol("b", ["ci"], ["db"])]
    after = [pol("b", ["ci"], ["db"])]
    assert P.reach_diff(P.reach_map(before), P.reach_map(after)) == {"gained": [], "lost": []}


def test_expectations_and_is_allowed() -> None:
    policies = [
        pol("dev-db", ["dev"], ["db"], "tcp", [5432]),
        pol("ping", ["ci"], ["peer:db-1"], "icmp", bidirectional=True),
    ]
    dev = {"kind": "group", "name": "dev", "groups": ["dev"]}
    db = {"kind": "group", "name": "db", "groups": ["db"]}
    ci = {"kind": "group", "name": "ci", "groups": ["ci"]}
    db1 = {"kind": "peer", "name": "db-1", "groups": ["db"]}
    assert P.is_allowed(policies, dev, db, "tcp", 5432) == (True, ["dev-db"])
    assert P.is_allowed(policies, dev, db, "tcp", 22)[0] is False
    assert P.is_allowed(policies, dev, db, "udp", None)[0] is False
    assert P.is_allowed(policies, dev, db1, "tcp", 5432)[0] is True  # peer via its group
    assert P.is_allowed(policies, db1, ci, "icmp", None) == (True, ["ping"])  # bidirectional
    assert P.is_allowed(policies, db, dev)[0] is False  # not bidirectional
    exp = P.normalize_expectation({"from": "ci", "to": "db", "port": 5432, "allowed": False}, 0)
    assert exp["protocol"] == "tcp" and exp["port"] == 5432
    assert P.expectation_text(exp) == "ci -> db tcp/5432 denied"


@pytest.mark.parametrize(
    "raw,text",
    [
        ({"from": "a", "to": "b"}, "allowed (true or false) is required"),
        ({"from": "a", "to": "b", "allowed": True, "port": 70000}, "outside 1-65535"),
        ({"from": "a", "to": "b", "allowed": True, "port": "1-2"}, "single port"),
        ({"from": "a", "to": "b", "allowed": True, "port": 53, "protocol": "icmp"}, "needs protocol tcp or udp"),
        ({"to": "b", "allowed": True}, "from is required"),
        ({"from": "a", "to": "b", "allowed": "maybe"}, "allowed must be true or false"),
    ],
)
def test_bad_expectations(raw: dict[str, Any], text: str) -> None:
    with pytest.raises(P.PolicyDataError, match=re.escape(text)):
        P.normalize_expectation(raw, 3)
