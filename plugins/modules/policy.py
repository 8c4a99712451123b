#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: policy
short_description: Manage one access policy of a Starling mesh
version_added: 0.1.0
description:
  - Create, update and delete one policy on the Starling coordinator.
  - A policy opens traffic from its O(sources) to its O(destinations) (both ways when O(bidirectional=true));
    everything no policy opens is dropped by every peer.
  - To declare the complete policy set of a mesh, with a reachability preview and assertions, use M(starling.mesh.policy_set).
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
    description: Name of the policy.
    type: str
    required: true
  description:
    description: Free text. When omitted, an existing policy keeps its description.
    type: str
  enabled:
    description: Whether the policy is in force. When omitted, an existing policy keeps its value (a new one is enabled).
    type: bool
  protocol:
    description: Protocol the policy opens. When omitted, an existing policy keeps its value (a new one gets V(any)).
    type: str
    choices: [any, tcp, udp, icmp]
  ports:
    description:
      - Ports or inclusive ranges, for example V(5432) or V(8000-8100). Only with O(protocol=tcp) or O(protocol=udp).
      - An empty list means all ports. When omitted, an existing policy keeps its ports.
    type: list
    elements: str
  bidirectional:
    description:
      - Also open the same traffic from destinations to sources. When omitted, an existing policy keeps its value.
      - Not with routes among the destinations (routed traffic is one-way).
    type: bool
  sources:
    description: Who may initiate traffic. Required when the policy is created.
    type: dict
    suboptions:
      groups:
        description: Group names.
        type: list
        elements: str
        default: []
      peers:
        description: Peer names.
        type: list
        elements: str
        default: []
  destinations:
    description: Who or what may be reached. Required when the policy is created.
    type: dict
    suboptions:
      groups:
        description: Group names.
        type: list
        elements: str
        default: []
      peers:
        description: Peer names.
        type: list
        elements: str
        default: []
      routes:
        description:
          - Route names (see M(starling.mesh.route)). The sources may reach the route's prefix through its routing
            peers, with this policy's protocol and ports.
          - A policy with routes among its destinations cannot be O(bidirectional).
        type: list
        elements: str
        default: []
  state:
    description: V(present) creates or updates the policy, V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: starling.mesh.policy_set
  - module: starling.mesh.group
"""

EXAMPLES = r"""
- name: Developers may reach PostgreSQL on the database servers
  starling.mesh.policy:
    name: dev-to-db
    protocol: tcp
    ports: [5432]
    sources:
      groups: [dev]
    destinations:
      groups: [db]

- name: Staff may reach the clinic LAN's web servers through its routing peers
  starling.mesh.policy:
    name: staff-to-clinic-web
    protocol: tcp
    ports: [443]
    sources:
      groups: [staff]
    destinations:
      routes: [clinic-lan]

- name: Disable it for a while
  starling.mesh.policy:
    name: dev-to-db
    enabled: false

- name: Remove it
  starling.mesh.policy:
    name: dev-to-db
    state: absent
"""

RETURN = r"""
policy:
  description: The policy as the coordinator returns it (or would, in check mode). Empty when absent.
  returned: always
  type: dict
  sample:
    id: 01J9ZK3V7Q2W
    name: dev-to-db
    description: ""
    enabled: true
    protocol: tcp
    ports: ["5432"]
    bidirectional: false
    sources: {groups: [dev], peers: []}
    destinations: {groups: [db], peers: [], routes: []}
diff:
  description: Before and after state of the declared fields.
  returned: always
  type: dict
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import (
    StarlingModule,
    ensure_absent,
    over_current,
    unknown_references,
)
from ansible_collections.starling.mesh.plugins.module_utils._policy import (
    POLICY_KEYS,
    PolicyDataError,
    comparable_policy,
    normalize_policy,
    policy_refs,
    route_refs,
)

ENDPOINT_SPEC = dict(
    groups=dict(type="list", elements="str", default=[]),
    peers=dict(type="list", elements="str", default=[]),
)
DESTINATION_SPEC = dict(ENDPOINT_SPEC, routes=dict(type="list", elements="str", default=[]))


def wanted_policy(params, current):
    """The complete desired policy: parameters over the current values (or defaults)."""
    data = over_current(params, POLICY_KEYS, comparable_policy(current) if current else {})
    if current is None and (params["sources"] is None or params["destinations"] is None):
        raise PolicyDataError(["policy %r: sources and destinations are required to create it" % params["name"]])
    return normalize_policy(data)


def check_references(module, policy):
    groups, peers = policy_refs(policy)
    problems = unknown_references(module.client, groups, peers, route_refs(policy))
    if problems:
        module.fail_json(msg="policy %r: %s" % (policy["name"], "; ".join(problems)))


def run(module):
    p = module.params
    client = module.client
    current = client.find_by_name("/policies", p["name"])
    before = comparable_policy(current) if current else {}
    if p["state"] == "absent":
        return ensure_absent(module, "/policies", current, before, "policy")

    try:
        wanted = wanted_policy(p, current)
    except PolicyDataError as exc:
        module.fail_json(msg="; ".join(exc.errors), errors=exc.errors)
    if wanted == before:
        return dict(changed=False, policy=current, diff=dict(before=before, after=before))
    check_references(module, wanted)
    if current is None:
        result = wanted if module.check_mode else client.post("/policies", wanted)
    else:
        patch = dict((k, v) for k, v in wanted.items() if before.get(k) != v)
        result = dict(current, **patch) if module.check_mode else client.patch(client.item_path("/policies", current["id"]), patch)
    return dict(changed=True, policy=result, diff=dict(before=before, after=comparable_policy(result)))


def main():
    module = StarlingModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            description=dict(type="str"),
            enabled=dict(type="bool"),
            protocol=dict(type="str", choices=["any", "tcp", "udp", "icmp"]),
            ports=dict(type="list", elements="str"),
            bidirectional=dict(type="bool"),
            sources=dict(type="dict", options=ENDPOINT_SPEC),
            destinations=dict(type="dict", options=DESTINATION_SPEC),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
