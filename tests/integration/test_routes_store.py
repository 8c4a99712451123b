"""Routes through the services on SQLite and PostgreSQL: the migration's tables, maps after writes equal to
a reload from the store, and what deleting a routing peer or an exit node does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from coordinator.errors import Conflict, Invalid
from coordinator.schemas import GroupIn, PeerUpdate, PolicyIn, RouteIn, RouteUpdate, SetupKeyIn
from coordinator.service.core import Coordinator
from coordinator.store.models import RouteRouter
from tests.integration.test_store import dsn, enroll, make

__all__ = ["dsn"]


def full_maps(coord: Coordinator) -> dict[str, Any]:
    """Every peer's rendered map by name, without what a reload renumbers or re-stamps (serials, relays)."""
    out = {}
    for pid, node in coord.graph.peers.items():
        doc = json.loads(coord.render_full(pid))
        out[node.name] = (
            doc["peer"],
            sorted(p["name"] for p in doc["peers"]),
            doc["routes"],
            doc.get("forward"),
            doc["firewall"]["rules"],
            {k: sorted(v) for k, v in doc["firewall"]["sets"].items()},
        )
    return out


def routed(coord: Coordinator) -> dict[str, str]:
    """clients: c1; gateways: gw1, gw2; an exit route through gw2; c1 may reach the LAN on tcp/443."""
    for g in ("clients", "gateways"):
        coord.groups.create("admin", GroupIn(name=g))
    ids = {}
    for name, grp in (("c1", "clients"), ("gw1", "gateways"), ("gw2", "gateways")):
        key = coord.credentials.create_key("admin", SetupKeyIn(name=f"k-{name}", auto_groups=[grp]))
        ids[name] = enroll(coord, {"setup_key": key.key, "hostname": name}).peer.id
    lan = RouteIn.model_validate(
        {"name": "lan", "prefix": "198.18.40.0/24", "routers": [{"peer": "gw1", "metric": 10}, {"group": "gateways"}]}
    )
    ids["lan"] = coord.routes.create("admin", lan).id
    inet = RouteIn.model_validate({"name": "inet", "prefix": "0.0.0.0/0", "routers": [{"peer": "gw2"}]})
    ids["inet"] = coord.routes.create("admin", inet).id
    pol = {
        "name": "c-lan",
        "protocol": "tcp",
        "ports": [443],
        "sources": {"groups": ["clients"]},
        "destinations": {"routes": ["lan", "inet"]},
    }
    ids["pol"] = coord.policies.create("admin", PolicyIn.model_validate(pol)).id
    coord.peers.update("admin", ids["c1"], PeerUpdate.model_validate({"exit_node": "gw2"}))
    return ids


def test_migration_creates_the_route_tables(dsn: str, tmp_path: Path) -> None:
    coord = make(dsn, tmp_path)
    inspector = inspect(coord.store.engine)
    assert {"routes", "route_routers"} <= set(inspector.get_table_names())
    assert "exit_node_id" in {c["name"] for c in inspector.get_columns("peers")}
    routed(coord)
    with pytest.raises(IntegrityError), coord.store.transaction() as s:  # neither peer nor group
        s.add(RouteRouter(route_id=coord.routes.find(name="lan", cursor=None, limit=1).items[0].id, metric=1))
    coord.store.dispose()


def test_route_writes_give_the_maps_a_reload_gives(dsn: str, tmp_path: Path) -> None:
    coord = make(dsn, tmp_path)
    ids = routed(coord)
    maps = full_maps(coord)
    c1 = maps["c1"]
    assert c1[0]["exit_node"] == ids["gw2"] and c1[1] == ["gw1", "gw2"]
    assert [(r["name"], [x["metric"] for x in r["routers"]]) for r in c1[2]] in (
        [("lan", [10, 9999]), ("inet", [9999])],
        [("inet", [9999]), ("lan", [10, 9999])],
    )
    assert [f["name"] for f in maps["gw2"][3]] == sorted(["lan", "inet"], key=lambda n: ids[n])
    assert maps["gw1"][3] == [{"route_id": ids["lan"], "name": "lan", "prefix": "198.18.40.0/24", "masquerade": True}]
    coord.reload()
    assert full_maps(coord) == maps

    coord.routes.update(
        "admin", ids["lan"], RouteUpdate.model_validate({"masquerade": False, "prefix": "198.18.41.0/24"})
    )
    coord.peers.update("admin", ids["gw1"], PeerUpdate(groups=[]))  # still a router: named directly
    maps = full_maps(coord)
    assert maps["gw1"][3][0]["masquerade"] is False
    coord.reload()
    assert full_maps(coord) == maps
    assert coord.view.consistency().violations == ()
    coord.store.dispose()


def test_deleting_routers_exit_nodes_and_refusals(dsn: str, tmp_path: Path) -> None:
    coord = make(dsn, tmp_path)
    ids = routed(coord)
    with pytest.raises(Conflict, match="c-lan"):
        coord.routes.delete("admin", ids["lan"])
    with pytest.raises(Invalid, match="overlaps route 'lan'"):
        coord.routes.create(
            "admin",
            RouteIn.model_validate({"name": "x", "prefix": "198.18.40.64/26", "routers": [{"peer": "gw1"}]}),
        )
    coord.peers.delete("admin", ids["gw2"])  # the exit node, and a router of both routes
    assert coord.peers.get(ids["c1"]).exit_node is None
    lan = coord.routes.get(ids["lan"])
    assert [(r.peer, r.group) for r in lan.routers] == [("gw1", None), (None, "gateways")]
    assert coord.routes.get(ids["inet"]).routers == []  # its only router is gone
    maps = full_maps(coord)
    assert "exit_node" not in maps["c1"][0] and maps["c1"][1] == ["gw1"]
    coord.reload()
    assert full_maps(coord) == maps
    coord.policies.delete("admin", ids["pol"])
    coord.routes.delete("admin", ids["lan"])
    assert coord.routes.find(name=None, cursor=None, limit=10).items[0].name == "inet"
    audit = coord.settings.audit(
        action="route.*", actor=None, target_type=None, target_id=None, since=None, until=None, cursor=None, limit=100
    ).items
    assert (audit[0].action, audit[0].target_id, audit[0].before is not None) == ("route.delete", ids["lan"], True)
    assert {e.action for e in audit} == {"route.create", "route.delete"}
    coord.store.dispose()
