#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: peer
short_description: Manage enrolled peers of a Starling mesh
version_added: 0.1.0
description:
  - Set the groups of a peer, approve or unapprove it, rename it, or delete it from the mesh.
  - Peers join the mesh by enrolling with a setup key (the agent does that); this module does not create peers,
    and fails when O(state=present) names a peer that does not exist.
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.api
  - starling.mesh.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
options:
  name:
    description:
      - Current name of the peer.
      - When the peer does not exist but a peer named O(new_name) does, the rename is taken as done.
    type: str
    required: true
  new_name:
    description: Rename the peer to this name (a DNS label). Its DNS name follows.
    type: str
  groups:
    description:
      - Group names of the peer. With O(append=false) (the default) this is the exact list;
        when omitted, the groups are left alone.
    type: list
    elements: str
  append:
    description: If V(true), add the groups in O(groups) and keep the others.
    type: bool
    default: false
  approved:
    description:
      - Approve (V(true)) or unapprove (V(false)) the peer. Unapproved peers reach nobody and nobody reaches them.
      - When omitted, approval is left alone.
    type: bool
  exit_node:
    description:
      - Send this peer's internet traffic through that peer (a peer name), which must be a routing peer of a
        V(0.0.0.0/0) route (see M(starling.mesh.route)); an empty string clears it.
      - When omitted, the setting is left alone.
    type: str
  state:
    description: V(present) updates the peer, V(absent) removes it from the mesh (its agent loses access).
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: starling.mesh.mesh_info
  - module: starling.mesh.group
"""

EXAMPLES = r"""
- name: Approve a new peer and put it into the web group
  starling.mesh.peer:
    name: web-3
    approved: true
    groups: [web]
    append: true

- name: Rename a peer
  starling.mesh.peer:
    name: ip-10-0-0-7
    new_name: build-1

- name: Send a laptop's internet traffic through the office exit node
  starling.mesh.peer:
    name: laptop-7
    exit_node: office-exit

- name: Stop using an exit node
  starling.mesh.peer:
    name: laptop-7
    exit_node: ""

- name: Remove a decommissioned peer
  starling.mesh.peer:
    name: old-laptop
    state: absent
"""

RETURN = r"""
peer:
  description: The peer as the coordinator returns it (or would, in check mode). Empty when absent.
  returned: always
  type: dict
  sample:
    id: 01J9ZK3V7Q2W
    name: web-3
    hostname: web-3.example.org
    mesh_ip: 100.64.0.12
    dns_name: web-3.starling.internal
    groups: [web]
    approved: true
    connected: true
    exit_node: null
diff:
  description: Before and after state (name, groups, approved, exit_node).
  returned: always
  type: dict
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule, ensure_absent, public_view
from ansible_collections.starling.mesh.plugins.module_utils._route import EXIT_PREFIX, index_routes, routes_of_peer

KEYS = ("name", "groups", "approved", "exit_node")


def diff_view(peer):
    view = public_view(peer, KEYS)
    if "groups" in view:
        view["groups"] = sorted(view["groups"])
    return view


def check_exit_node(module, peer, name):
    """Fail before any change unless ``name`` is another peer that routes a 0.0.0.0/0 route."""
    client = module.client
    if name in (peer["name"], module.params["new_name"]):
        module.fail_json(msg="peer %r: a peer cannot be its own exit node" % peer["name"])
    exit_peer = client.find_by_name("/peers", name)
    if exit_peer is None:
        module.fail_json(msg="peer %r: exit_node: unknown peer %r" % (peer["name"], name))
    if any(r["exit_node"] for r in routes_of_peer(exit_peer, index_routes(client.list_all("/routes")))):
        return
    module.fail_json(
        msg="peer %r: exit_node: peer %r is not an exit node: make it a routing peer of a %s route first "
        "(starling.mesh.route)" % (peer["name"], name, EXIT_PREFIX)
    )


def run(module):
    p = module.params
    client = module.client
    peer = client.find_by_name("/peers", p["name"])
    if peer is None and p["new_name"]:
        peer = client.find_by_name("/peers", p["new_name"])
    before = diff_view(peer)
    if p["state"] == "absent":
        return ensure_absent(module, "/peers", peer, before, "peer")

    if peer is None:
        module.fail_json(
            msg="peer %r not found: peers join the mesh by enrolling with a setup key; this module only manages "
            "enrolled peers" % p["name"]
        )
    patch = {}
    if p["new_name"] and p["new_name"] != peer["name"]:
        if client.find_by_name("/peers", p["new_name"]) is not None:
            module.fail_json(msg="cannot rename peer %r: the name %r is taken" % (peer["name"], p["new_name"]))
        patch["name"] = p["new_name"]
    if p["groups"] is not None:
        wanted = set(p["groups"]) | (set(peer["groups"]) if p["append"] else set())
        if wanted != set(peer["groups"]):
            missing = client.missing_groups(wanted)
            if missing:
                module.fail_json(msg="peer %r: unknown groups: %s" % (peer["name"], ", ".join(missing)))
            patch["groups"] = sorted(wanted)
    if p["approved"] is not None and p["approved"] != peer["approved"]:
        patch["approved"] = p["approved"]
    if p["exit_node"] is not None:
        wanted_exit = p["exit_node"] or None
        if wanted_exit != peer.get("exit_node"):
            if wanted_exit is not None:
                check_exit_node(module, peer, wanted_exit)
            patch["exit_node"] = wanted_exit
    if not patch:
        return dict(changed=False, peer=peer, diff=dict(before=before, after=before))
    if module.check_mode:
        result = dict(peer, **patch)
    else:
        result = client.patch(client.item_path("/peers", peer["id"]), patch)
    return dict(changed=True, peer=result, diff=dict(before=before, after=diff_view(result)))


def main():
    module = StarlingModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            new_name=dict(type="str"),
            groups=dict(type="list", elements="str"),
            append=dict(type="bool", default=False),
            approved=dict(type="bool"),
            exit_node=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
