#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: group
short_description: Manage groups of a Starling mesh
version_added: 0.1.0
description:
  - Create, update and delete a group on the Starling coordinator.
  - Groups are what policies name; peers join them through setup key auto-groups,
    through M(starling.mesh.peer), or through the O(peers) list of this module.
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
    description: Name of the group.
    type: str
    required: true
  description:
    description:
      - Free text. When omitted, an existing group keeps its description (a new one gets an empty one).
    type: str
  peers:
    description:
      - Peer names that are members of the group.
      - With O(append=false) (the default) this is the exact member list; when omitted, membership is left alone.
    type: list
    elements: str
  append:
    description:
      - If V(true), add the peers in O(peers) and keep the other members.
    type: bool
    default: false
  state:
    description:
      - V(present) creates or updates the group, V(absent) deletes it.
      - The coordinator refuses to delete a group that a policy or a setup key still uses; the module then fails with that reason.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: starling.mesh.policy_set
  - module: starling.mesh.peer
"""

EXAMPLES = r"""
- name: Ensure the database group exists with exactly two members
  starling.mesh.group:
    url: https://coordinator.example.org
    token: "{{ starling_token }}"
    name: db
    description: PostgreSQL servers
    peers:
      - db-1
      - db-2

- name: Add one peer to the ci group, keep the others
  starling.mesh.group:
    name: ci
    peers: [runner-7]
    append: true

- name: Remove a group
  starling.mesh.group:
    name: legacy
    state: absent
"""

RETURN = r"""
group:
  description: The group as the coordinator returns it (or would, in check mode). Empty when the group is absent.
  returned: always
  type: dict
  sample:
    id: 01J9ZK3V7Q2W
    name: db
    description: PostgreSQL servers
    peers: [db-1, db-2]
    created_at: "2025-01-01T00:00:00Z"
diff:
  description: Before and after state (name, description, peers).
  returned: always
  type: dict
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule, ensure_absent, public_view

KEYS = ("name", "description", "peers")


def desired_members(current, peers, append):
    if peers is None:
        return sorted(current)
    if append:
        return sorted(set(current) | set(peers))
    return sorted(set(peers))


def run(module):
    p = module.params
    client = module.client
    group = client.find_by_name("/groups", p["name"])
    before = public_view(group, KEYS)
    if p["state"] == "absent":
        return ensure_absent(module, "/groups", group, before, "group")

    if p["peers"] is not None:
        missing = client.missing_peers(p["peers"])
        if missing:
            module.fail_json(msg="group %r: unknown peers: %s" % (p["name"], ", ".join(missing)))

    if group is None:
        body = {"name": p["name"], "description": p["description"] or ""}
        if p["peers"] is not None:
            body["peers"] = sorted(set(p["peers"]))
        if module.check_mode:
            result = dict(body, peers=body.get("peers", []))
        else:
            result = client.post("/groups", body)
        return dict(changed=True, group=result, diff=dict(before={}, after=public_view(result, KEYS)))

    patch = {}
    if p["description"] is not None and p["description"] != group["description"]:
        patch["description"] = p["description"]
    members = desired_members(group["peers"], p["peers"], p["append"])
    if members != sorted(group["peers"]):
        patch["peers"] = members
    if not patch:
        return dict(changed=False, group=group, diff=dict(before=before, after=before))
    if module.check_mode:
        result = dict(group, **patch)
    else:
        result = client.patch(client.item_path("/groups", group["id"]), patch)
    return dict(changed=True, group=result, diff=dict(before=before, after=public_view(result, KEYS)))


def main():
    module = StarlingModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            description=dict(type="str"),
            peers=dict(type="list", elements="str"),
            append=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
