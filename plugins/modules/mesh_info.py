#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: mesh_info
short_description: Read peers, groups, policies, routes and settings of a Starling mesh
version_added: 0.1.0
description:
  - Returns the peers, groups, policies, routes, setup keys (metadata only) and settings of a Starling coordinator.
  - Read-only; works with an API token of scope C(read).
  - Follows the API's pagination, so all matching objects are returned.
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.api
  - starling.mesh.attributes
attributes:
  check_mode:
    support: full
    details: The module never changes anything.
  diff_mode:
    support: N/A
    details: The module never changes anything.
options:
  gather:
    description: What to read.
    type: list
    elements: str
    choices: [peers, groups, policies, routes, setup_keys, settings]
    default: [peers, groups, policies, routes, settings]
  name:
    description: Only the peers, groups, policies and routes with this exact name.
    type: str
  group:
    description: Only the peers that are members of this group.
    type: str
  connected:
    description: Only the peers whose agent is connected (V(true)) or not (V(false)).
    type: bool
seealso:
  - plugin: starling.mesh.coordinator
    plugin_type: inventory
"""

EXAMPLES = r"""
- name: Everything
  starling.mesh.mesh_info:
  register: mesh

- name: Offline members of the db group
  starling.mesh.mesh_info:
    gather: [peers]
    group: db
    connected: false
  register: offline_db

- name: Show their names
  ansible.builtin.debug:
    msg: "{{ offline_db.peers | map(attribute='name') | list }}"
"""

RETURN = r"""
peers:
  description: Peers (see the coordinator API for all fields).
  returned: when V(peers) is in O(gather)
  type: list
  elements: dict
  sample:
    - name: db-1
      mesh_ip: 100.64.0.3
      groups: [db]
      connected: true
groups:
  description: Groups with their member names.
  returned: when V(groups) is in O(gather)
  type: list
  elements: dict
policies:
  description: Policies.
  returned: when V(policies) is in O(gather)
  type: list
  elements: dict
routes:
  description: Routes (prefix, routing peers with their metrics, masquerade, enabled, exit_node).
  returned: when V(routes) is in O(gather)
  type: list
  elements: dict
setup_keys:
  description: Setup keys (metadata; the coordinator has no clear keys).
  returned: when V(setup_keys) is in O(gather)
  type: list
  elements: dict
settings:
  description: Mesh settings (prefix, DNS domain, TURN servers, approval, revision).
  returned: when V(settings) is in O(gather)
  type: dict
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule


def run(module):
    p = module.params
    client = module.client
    result = dict(changed=False)
    gather = set(p["gather"])
    named = {"name": p["name"]} if p["name"] else {}
    if "peers" in gather:
        result["peers"] = client.list_all("/peers", dict(named, group=p["group"], connected=p["connected"]))
    if "groups" in gather:
        result["groups"] = client.list_all("/groups", named)
    if "policies" in gather:
        result["policies"] = client.list_all("/policies", named)
    if "routes" in gather:
        result["routes"] = client.list_all("/routes", named)
    if "setup_keys" in gather:
        keys = client.list_all("/setup-keys")
        result["setup_keys"] = [k for k in keys if not p["name"] or k["name"] == p["name"]]
    if "settings" in gather:
        result["settings"] = client.get("/settings")
    return result


def main():
    module = StarlingModule(
        argument_spec=dict(
            gather=dict(
                type="list",
                elements="str",
                default=["peers", "groups", "policies", "routes", "settings"],
                choices=["peers", "groups", "policies", "routes", "setup_keys", "settings"],
            ),
            name=dict(type="str"),
            group=dict(type="str"),
            connected=dict(type="bool"),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
