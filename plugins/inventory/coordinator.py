# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: coordinator
short_description: Mesh peers from a Starling coordinator
version_added: 0.1.0
description:
  - Lists every peer of a Starling mesh from the coordinator API, with its mesh IP, groups, OS, agent version,
    online state and a summary of its connection paths.
  - Uses a YAML configuration file whose name ends with C(.coordinator.yml) or C(.coordinator.yaml).
  - Adds one Ansible group per coordinator group (names made safe, see O(group_prefix)), plus C(starling_online)
    and C(starling_offline).
  - Host variables, prefixed C(starling_), are C(starling_id), C(starling_dns_name), C(starling_mesh_ip),
    C(starling_public_key), C(starling_groups) (coordinator group names), C(starling_os), C(starling_version)
    (agent version), C(starling_approved), C(starling_online), C(starling_last_seen) and C(starling_paths), the
    number of the peer's tunnels per path type (C(direct), C(relayed), C(connecting), C(idle), C(lost)), types with none left out.
  - C(starling_latency_ms) maps each peer this peer reports a measured latency to (by name; by id when that peer is
    not in the listing) to the round trip in milliseconds of their last WireGuard handshake, as the agent measured it
    (peers without a measurement are left out).
  - C(starling_routes) lists the routes the peer is a routing peer of (named, or through one of its groups), each
    C({name, prefix, metric, masquerade, enabled, exit_node}) sorted by name (the lowest metric when it is named
    more than once); C(starling_exit_node) is the peer it sends its internet traffic through (a peer name), or null.
    The routes are read once per inventory run (one C(/routes) listing, not one per host).
  - Strings that come from the coordinator (names, OS, versions...) are data, never templates
    (with ansible-core 2.19 they are untrusted; on older versions they are marked unsafe).
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks this as a source for this plugin.
    required: true
    type: str
    choices: [starling.mesh.coordinator]
  url:
    description:
      - Base URL of the coordinator.
    type: str
    required: true
    env:
      - name: STARLING_URL
  token:
    description:
      - API token; one of scope C(read) is enough.
    type: str
    required: true
    env:
      - name: STARLING_TOKEN
  validate_certs:
    description: Verify the coordinator's TLS certificate.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for each HTTP request.
    type: float
    default: 30.0
  hostname:
    description:
      - What becomes the inventory hostname of a peer. V(name) is the peer's name, V(dns_name) its mesh DNS name.
    type: str
    choices: [name, dns_name]
    default: name
  ansible_host:
    description:
      - What C(ansible_host) is set to. V(mesh_ip) (the default) reaches the peer over the mesh,
        V(dns_name) uses its mesh DNS name, V(hostname) the hostname the agent reported,
        V(none) does not set C(ansible_host).
    type: str
    choices: [mesh_ip, dns_name, hostname, none]
    default: mesh_ip
  group_prefix:
    description: Prefix for the Ansible groups made from coordinator groups.
    type: str
    default: ""
  filter_group:
    description: Only the peers of this coordinator group.
    type: str
  filter_connected:
    description: Only the peers whose agent is connected (V(true)) or not (V(false)).
    type: bool
  page_size:
    description: Peers per API request (the API allows at most 1000).
    type: int
    default: 1000
notes:
  - With caching on, the raw API answers (peers and routes) are cached under one key per source, built from the
    file path, O(url), the filters and a hash of O(token). O(compose), O(groups) and O(keyed_groups) are applied
    again on every run, from the cached data.
"""

EXAMPLES = r"""
# mesh.coordinator.yml
plugin: starling.mesh.coordinator
url: https://coordinator.example.org
# token: from STARLING_TOKEN
ansible_host: mesh_ip
keyed_groups:
  - key: starling_os
    prefix: os
compose:
  ansible_user: "'admin'"
groups:
  stale: not starling_online

# cached for 5 minutes in a JSON file cache
# plugin: starling.mesh.coordinator
# url: https://coordinator.example.org
# cache: true
# cache_plugin: ansible.builtin.jsonfile
# cache_connection: ~/.cache/starling-inventory
# cache_timeout: 300
"""

import hashlib
import re

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorClient, CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._route import index_routes, routes_of_peer

try:  # ansible-core >= 2.19: data is untrusted for templating unless explicitly trusted; nothing to do
    from ansible.template import trust_as_template  # noqa: F401  pylint: disable=unused-import

    def untrusted(value):
        return value

except ImportError:  # older cores: mark coordinator strings unsafe so they are never templated
    from ansible.utils.unsafe_proxy import wrap_var as untrusted

SUFFIXES = (".coordinator.yml", ".coordinator.yaml")
PATHS = ("idle", "connecting", "direct", "relayed", "lost")
_UNSAFE_GROUP = re.compile(r"[^A-Za-z0-9_]")


def safe_group(name):
    name = _UNSAFE_GROUP.sub("_", name)
    return name if not name[:1].isdigit() else "_" + name


def path_summary(connections):
    """How many of the peer's tunnels are on each path type (only types with at least one)."""
    counts = {}
    for conn in connections or []:
        path = conn.get("path")
        if path in PATHS:
            counts[path] = counts.get(path, 0) + 1
    return counts


def latencies(connections, names=None):
    """{peer name (or id): latency_ms} of the connections with a measured latency."""
    names = names or {}
    out = {}
    for conn in connections or []:
        latency = conn.get("latency_ms")
        if latency is not None and conn.get("peer_id"):
            out[names.get(conn["peer_id"], conn["peer_id"])] = latency
    return out


def host_vars(peer, routes=None, names=None):
    """The starling_ host variables of one peer (plain data from the API); ``routes`` is ``index_routes`` of the
    /routes listing, ``names`` maps peer ids to names (for C(starling_latency_ms))."""
    return {
        "starling_id": peer.get("id"),
        "starling_dns_name": peer.get("dns_name"),
        "starling_mesh_ip": peer.get("mesh_ip"),
        "starling_public_key": peer.get("public_key"),
        "starling_groups": list(peer.get("groups") or []),
        "starling_os": peer.get("os"),
        "starling_version": peer.get("agent_version"),
        "starling_approved": peer.get("approved"),
        "starling_online": bool(peer.get("connected")),
        "starling_last_seen": peer.get("last_seen"),
        "starling_paths": path_summary(peer.get("connections")),
        "starling_latency_ms": latencies(peer.get("connections"), names),
        "starling_routes": routes_of_peer(peer, routes or index_routes([])),
        "starling_exit_node": peer.get("exit_node"),
    }


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "starling.mesh.coordinator"

    def verify_file(self, path):
        if not super(InventoryModule, self).verify_file(path):
            self.display.vvv("starling.mesh.coordinator: skipping %s: the file does not exist or is not readable" % path)
            return False
        if not path.endswith(SUFFIXES):
            self.display.vvv(
                "starling.mesh.coordinator: skipping %s: the file name must end with %s" % (path, " or ".join(SUFFIXES))
            )
            return False
        return True

    def _cache_key(self, path):
        token = self.get_option("token") or ""
        token_hash = hashlib.sha256(token.encode("utf-8")).hexdigest()
        source = "|".join(
            [
                self.get_option("url").rstrip("/"),
                token_hash,
                str(self.get_option("filter_group")),
                str(self.get_option("filter_connected")),
            ]
        )
        return "%s_%s" % (self.get_cache_key(path), hashlib.sha256(source.encode("utf-8")).hexdigest()[:16])

    def fetch(self):
        """The raw API answers: ``{"peers": [...], "routes": [...]}`` (one listing each, paged)."""
        try:
            client = CoordinatorClient(
                self.get_option("url"),
                self.get_option("token"),
                validate_certs=self.get_option("validate_certs"),
                timeout=self.get_option("timeout"),
            )
            params = {"group": self.get_option("filter_group"), "connected": self.get_option("filter_connected")}
            limit = max(1, min(1000, int(self.get_option("page_size"))))
            peers = client.list_all("/peers", params, limit=limit)
            try:
                routes = client.list_all("/routes", limit=limit)
            except CoordinatorError as exc:
                if exc.status != 404:
                    raise
                routes = []  # a coordinator without routes
            return {"peers": peers, "routes": routes}
        except CoordinatorError as exc:
            raise AnsibleError("starling.mesh.coordinator: %s" % exc.msg)

    def parse(self, inventory, loader, path, cache=True):
        super(InventoryModule, self).parse(inventory, loader, path)
        self._read_config_data(path)
        if not self.get_option("url"):
            raise AnsibleParserError("starling.mesh.coordinator: url is not set (option url or STARLING_URL)")
        if not self.get_option("token"):
            raise AnsibleParserError("starling.mesh.coordinator: token is not set (option token or STARLING_TOKEN)")

        cache_key = self._cache_key(path)
        use_cache = self.get_option("cache") and cache
        update_cache = self.get_option("cache") and not cache
        data = None
        if use_cache:
            try:
                data = self._cache[cache_key]
            except KeyError:
                update_cache = True
            if data is not None and not (isinstance(data, dict) and "peers" in data and "routes" in data):
                data = None  # written by an older version of this plugin (peers only): refresh
                update_cache = True
        if data is None:
            data = self.fetch()
        if update_cache:
            self._cache[cache_key] = data
        self.populate(data["peers"], data["routes"])

    def populate(self, peers, routes=()):
        inventory = self.inventory
        # ansible-core 2.19 hands plugins a proxy whose set_variable deep-copies each value and tags it with its
        # origin (about 80 us per variable: most of the plugin's time for 10k peers). The values here are fresh,
        # untagged JSON data (str, int, bool, None, list, dict) that the proxy would neither change nor trust
        # (this plugin is not trusted_by_default), so they are set on the wrapped inventory directly.
        target = getattr(inventory, "__wrapped__", inventory)
        strict = self.get_option("strict")
        compose = self.get_option("compose")
        groups = self.get_option("groups")
        keyed = self.get_option("keyed_groups")
        constructed = bool(compose or groups or keyed)
        use_dns = self.get_option("hostname") == "dns_name"
        host_source = self.get_option("ansible_host")
        prefix = self.get_option("group_prefix") or ""
        route_index = index_routes(routes)
        names = dict((p.get("id"), p.get("name")) for p in peers if p.get("id") and p.get("name"))
        online = inventory.add_group("starling_online")
        offline = inventory.add_group("starling_offline")
        made = {}
        for peer in peers:
            name = peer.get("dns_name") if use_dns else peer.get("name")
            if not name:
                continue
            host = inventory.add_host(name)
            hvars = host_vars(peer, route_index, names)
            if host_source != "none":
                value = peer.get(host_source)
                if value:
                    hvars["ansible_host"] = value
            hvars = untrusted(hvars)
            for key, value in hvars.items():
                target.set_variable(host, key, value)
            inventory.add_child(online if hvars["starling_online"] else offline, host)
            for gname in hvars["starling_groups"]:
                group = made.get(gname)
                if group is None:
                    group = made[gname] = inventory.add_group(safe_group(prefix + gname))
                inventory.add_child(group, host)
            if constructed:
                self._set_composite_vars(compose, hvars, host, strict=strict)
                self._add_host_to_composed_groups(groups, hvars, host, strict=strict)
                self._add_host_to_keyed_groups(keyed, hvars, host, strict=strict)
