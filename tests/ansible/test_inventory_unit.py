"""Unit tests of the starling.mesh.coordinator inventory plugin (no coordinator: data is handed in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ansible import collection_loader

collection_loader.install()

from ansible.inventory.data import InventoryData  # noqa: E402
from ansible.parsing.dataloader import DataLoader  # noqa: E402
from ansible.plugins.loader import inventory_loader  # noqa: E402
from ansible.template import trust_as_template  # noqa: E402
from ansible_collections.starling.mesh.plugins.inventory import coordinator as plugin_mod  # noqa: E402

PEERS = [
    {
        "id": "1",
        "name": "web-1",
        "hostname": "web-1.lan",
        "dns_name": "web-1.mesh",
        "mesh_ip": "100.64.0.1",
        "public_key": "k1",
        "groups": ["web", "ops-team"],
        "os": "debian",
        "agent_version": "0.1.0",
        "approved": True,
        "ephemeral": False,
        "connected": True,
        "last_seen": "t",
        "connections": [{"path": "direct"}, {"path": "relayed"}, {"path": "direct"}],
        "connections_reported_at": "t",
    },
    {
        "id": "2",
        "name": "db-1",
        "hostname": "db-1.lan",
        "dns_name": "db-1.mesh",
        "mesh_ip": "100.64.0.2",
        "public_key": "k2",
        "groups": ["9db"],
        "os": "{{ 7 * 7 }}",
        "agent_version": "0.2.0",
        "approved": True,
        "ephemeral": True,
        "connected": False,
        "last_seen": None,
        "connections": [],
        "connections_reported_at": None,
    },
]


@pytest.fixture
def plugin() -> Any:
    p = inventory_loader.get("starling.mesh.coordinator")
    assert p is not None
    return p


def configure(p: Any, **options: Any) -> InventoryData:
    # a config file's templates are trusted (ansible loads it with trusted_as_template=True); do the same here
    for key in ("compose", "groups"):
        if key in options:
            options[key] = {k: trust_as_template(v) for k, v in options[key].items()}
    for keyed in options.get("keyed_groups", []):
        keyed["key"] = trust_as_template(keyed["key"])
    p.set_options(direct={"plugin": "starling.mesh.coordinator", "url": "http://c", "token": "t", **options})
    p.inventory = InventoryData()
    p.loader = DataLoader()
    p._vars = {}
    return p.inventory


def test_verify_file_explains(plugin: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(plugin.display, "vvv", said.append)
    good = tmp_path / "mesh.coordinator.yml"
    good.write_text("plugin: starling.mesh.coordinator\n")
    other = tmp_path / "mesh.yml"
    other.write_text("plugin: starling.mesh.coordinator\n")
    assert plugin.verify_file(str(good)) is True
    assert plugin.verify_file(str(tmp_path / "x.coordinator.yaml")) is False
    assert "does not exist" in said[-1]
    assert plugin.verify_file(str(other)) is False
    assert "must end with .coordinator.yml or .coordinator.yaml" in said[-1]


def test_host_vars_and_helpers() -> None:
    hv = plugin_mod.host_vars(PEERS[0])
    assert hv["starling_paths"] == {"direct": 2, "relayed": 1}
    assert (
        hv["starling_online"] is True and hv["starling_version"] == "0.1.0" and hv["starling_mesh_ip"] == "100.64.0.1"
    )
    assert all(k.startswith("starling_") for k in hv)
    assert plugin_mod.safe_group("ops-team.eu") == "ops_team_eu"
    assert plugin_mod.safe_group("9db") == "_9db"


def test_populate_groups_and_constructed(plugin: Any) -> None:
    inv = configure(
        plugin,
        keyed_groups=[{"key": "starling_os", "prefix": "os"}],
        compose={"ver": "starling_version"},
        groups={"eph": "not starling_online"},
    )
    plugin.populate(PEERS)
    assert sorted(h.name for h in inv.groups["starling_online"].get_hosts()) == ["web-1"]
    assert sorted(h.name for h in inv.groups["starling_offline"].get_hosts()) == ["db-1"]
    assert "ops_team" in inv.groups and "_9db" in inv.groups and "eph" in inv.groups
    assert inv.get_host("web-1").vars["ansible_host"] == "100.64.0.1"
    assert inv.get_host("db-1").vars["ver"] == "0.2.0"
    assert inv.get_host("db-1").vars["starling_os"] == "{{ 7 * 7 }}"  # data, not a template


def test_hostname_and_ansible_host_choices(plugin: Any) -> None:
    inv = configure(plugin, hostname="dns_name", ansible_host="hostname", group_prefix="s_")
    plugin.populate(PEERS)
    assert inv.get_host("web-1.mesh").vars["ansible_host"] == "web-1.lan"
    assert "s_web" in inv.groups
    inv = configure(plugin, ansible_host="none")
    plugin.populate(PEERS)
    assert "ansible_host" not in inv.get_host("web-1").vars


def test_cache_key_per_source(plugin: Any) -> None:
    configure(plugin)
    a = plugin._cache_key("/x/mesh.coordinator.yml")
    configure(plugin, token="other")
    b = plugin._cache_key("/x/mesh.coordinator.yml")
    configure(plugin, url="http://d")
    c = plugin._cache_key("/x/mesh.coordinator.yml")
    configure(plugin)
    assert len({a, b, c}) == 3 and plugin._cache_key("/x/mesh.coordinator.yml") == a


def test_populate_routes_hostvars(plugin: Any) -> None:
    routes = [
        {
            "id": "r1",
            "name": "clinic-lan",
            "prefix": "198.18.40.0/24",
            "exit_node": False,
            "masquerade": True,
            "enabled": True,
            "routers": [
                {"peer": None, "group": "ops-team", "metric": 20},
                {"peer": "web-1", "group": None, "metric": 5},
            ],
        }
    ]
    inv = configure(plugin, keyed_groups=[{"key": "starling_routes | map(attribute='name')", "prefix": "routes"}])
    plugin.populate([{**PEERS[0], "exit_node": None}, {**PEERS[1], "exit_node": "web-1"}], routes)
    web = inv.get_host("web-1").vars
    assert web["starling_routes"] == [
        {
            "name": "clinic-lan",
            "prefix": "198.18.40.0/24",
            "metric": 5,
            "masquerade": True,
            "enabled": True,
            "exit_node": False,
        }
    ]
    assert web["starling_exit_node"] is None
    db = inv.get_host("db-1").vars
    assert db["starling_routes"] == [] and db["starling_exit_node"] == "web-1"
    assert [h.name for h in inv.groups["routes_clinic_lan"].get_hosts()] == ["web-1"]


def test_parse_refreshes_a_cache_of_the_older_format(plugin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(plugin, cache=True)
    fetched: list[int] = []

    def fetch() -> dict[str, Any]:
        fetched.append(1)
        return {"peers": PEERS, "routes": []}

    monkeypatch.setattr(plugin, "fetch", fetch)
    monkeypatch.setattr(plugin, "_read_config_data", lambda path: None)
    key = plugin._cache_key("/x/mesh.coordinator.yml")
    plugin._cache = {key: PEERS}  # peers only, written before routes existed
    plugin.parse(plugin.inventory, plugin.loader, "/x/mesh.coordinator.yml")
    assert fetched == [1] and plugin._cache[key] == {"peers": PEERS, "routes": []}
    plugin.parse(plugin.inventory, plugin.loader, "/x/mesh.coordinator.yml")
    assert fetched == [1]  # served from the cache now
