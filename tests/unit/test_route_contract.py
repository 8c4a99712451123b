"""The routes part of the map contract (starling_proto.routes, route/forward firewall rules): what a
prefix may be, how route entries and route rules parse, and that a bad one names its field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from starling_proto.firewall import FirewallRule, FirewallSection
from starling_proto.netmap import FullMap, MapDelta, SelfEntry, parse_map_message
from starling_proto.routes import ForwardEntry, RouteEntry, RouterRef, check_route_prefix
from starling_proto.wire import WireFormatError

KEY = "A" * 43 + "="


@pytest.mark.parametrize("prefix", ["198.18.40.0/24", "198.19.0.0/16", "0.0.0.0/0", "198.18.7.7/32", "100.0.0.0/10"])
def test_good_prefixes(prefix: str) -> None:
    assert str(check_route_prefix(prefix)) == prefix


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        ("198.18.40.1/24", "canonical"),  # host bits set
        ("198.18.40.0", "IPv4 prefix"),
        ("198.18.040.0/24", "canonical"),
        ("100.64.0.0/10", "mesh range"),
        ("100.100.0.0/16", "mesh range"),
        ("100.0.0.0/8", "mesh range"),  # contains the mesh range
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("0.0.0.0/8", "this network"),
        ("::/0", "IPv4 prefix"),
        (24, "IPv4 prefix"),
        ("198.18.40.0/33", "canonical"),
    ],
)
def test_bad_prefixes_say_why(prefix: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_route_prefix(prefix)


def _map() -> dict[str, Any]:
    me = SelfEntry("me", "client", KEY, "100.64.0.2", ("100.64.0.2/32",), mesh_prefix="100.64.0.0/10")
    full = FullMap(
        serial=3,
        peer=me,
        routes=(RouteEntry("r1", "clinic", "198.18.40.0/24", (RouterRef("gw1", 10), RouterRef("gw2", 20))),),
        forward=(ForwardEntry("r2", "office", "198.18.41.0/24", masquerade=False),),
        firewall=FirewallSection(
            (
                FirewallRule("p1", "route", "tcp", ((443, 443),), "", route_id="r1", prefix="198.18.40.0/24"),
                FirewallRule("p2", "forward", "any", (), "p2:src", route_id="r2", prefix="198.18.41.0/24"),
            ),
            {"p2:src": ("100.64.0.7",)},
        ),
    )
    return full.to_wire()


def test_routes_round_trip() -> None:
    doc = _map()
    parsed = parse_map_message(copy.deepcopy(doc))
    assert isinstance(parsed, FullMap)
    assert parsed.to_wire() == doc
    assert parsed.routes[0].routers[1] == RouterRef("gw2", 20) and not parsed.routes[0].exit_node
    assert parsed.forward == (ForwardEntry("r2", "office", "198.18.41.0/24", False),)
    route_rule = doc["firewall"]["rules"][0]
    assert "peer_set" not in route_rule and route_rule["prefix"] == "198.18.40.0/24"
    assert parsed.to_json() == FullMap.from_wire(doc).to_json()


def test_a_map_without_routes_keeps_the_old_shape() -> None:
    """Peers that use no route get the same document as before routes existed (old agents read it)."""
    me = SelfEntry("me", "client", KEY, "100.64.0.2", ("100.64.0.2/32",))
    doc = FullMap(serial=1, peer=me, firewall=FirewallSection((FirewallRule("p", "in", "any", (), "s"),), {"s": ()}))
    wire = doc.to_wire()
    assert wire["routes"] == [] and "forward" not in wire and "exit_node" not in wire["peer"]
    assert set(wire["firewall"]["rules"][0]) == {"policy_id", "direction", "action", "protocol", "ports", "peer_set"}


def _break(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = _map()
    here: Any = doc
    for step in path[:-1]:
        here = here[step]
    if value is KeyError:
        del here[path[-1]]
    else:
        here[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("routes", 0, "prefix"), "100.64.3.0/24", "routes[0].prefix"),
        (("routes", 0, "prefix"), "198.18.40.7/24", "routes[0].prefix"),
        (("routes", 0, "routers", 0, "metric"), 0, "routes[0].routers[0]"),
        (("routes", 0, "routers", 0, "metric"), "10", "routes[0].routers[0].metric"),
        (("routes", 0, "routers", 0, "peer_id"), "", "routes[0].routers[0].peer_id"),
        (("routes", 0, "routers"), "gw1", "routes[0].routers"),
        (("routes", 0, "id"), KeyError, "routes[0].id"),
        (("forward", 0, "masquerade"), "yes", "forward[0].masquerade"),
        (("forward", 0, "prefix"), "127.0.0.0/8", "forward[0].prefix"),
        (("firewall", "rules", 0, "prefix"), "100.64.0.0/10", "firewall.rules[0] (policy p1).prefix"),
        (("firewall", "rules", 0, "route_id"), "", "firewall.rules[0] (policy p1).route_id"),
        (("firewall", "rules", 0, "peer_set"), "p2:src", "firewall.rules[0]"),  # a route rule has no set
        (("firewall", "rules", 1, "peer_set"), KeyError, "firewall.rules[1]"),  # a forward rule needs one
        (("firewall", "rules", 1, "direction"), "sideways", "firewall.rules[1]"),
    ],
)
def test_malformed_route_parts_name_their_field(path: tuple[Any, ...], value: Any, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_map_message(_break(path, value))
    assert caught.value.field == field, str(caught.value)


def test_in_and_out_rules_may_not_carry_a_prefix() -> None:
    doc = _map()
    doc["firewall"]["rules"].append(
        {
            "policy_id": "p3",
            "direction": "in",
            "protocol": "any",
            "ports": [],
            "peer_set": "p2:src",
            "prefix": "0.0.0.0/0",
        }
    )
    with pytest.raises(WireFormatError, match="route and forward rules only"):
        parse_map_message(doc)


def test_a_route_listed_twice_is_refused() -> None:
    doc = _map()
    doc["routes"].append(copy.deepcopy(doc["routes"][0]))
    with pytest.raises(WireFormatError, match="appears twice"):
        parse_map_message(doc)


def test_deltas_carry_whole_route_lists() -> None:
    delta = MapDelta(serial=5, base_serial=4, routes=(), forward=(ForwardEntry("r9", "exit", "0.0.0.0/0"),))
    wire = delta.to_wire()
    assert wire["routes"] == [] and wire["forward"][0]["prefix"] == "0.0.0.0/0"
    back = parse_map_message(wire)
    assert isinstance(back, MapDelta) and back.routes == () and back.forward is not None and back.forward[0].exit_node
    assert parse_map_message(MapDelta(serial=5, base_serial=4).to_wire()).routes is None  # type: ignore[union-attr]
