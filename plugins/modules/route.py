#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: route
short_description: Manage one network route (subnet router, HA route or exit node) of a Starling mesh
version_added: 0.1.0
description:
  - Create, update and delete one route on the Starling coordinator. A route makes an IPv4 prefix (a LAN behind
    one or more peers) reachable through the mesh; its routing peers forward the traffic.
  - With several routing peers, each client uses the one with the lowest metric among those it has a live
    tunnel to, and fails over to the next (high availability).
  - The prefix V(0.0.0.0/0) makes the routing peers B(exit nodes); a client uses one only when it opted in
    (O(starling.mesh.peer#module:exit_node)).
  - Nobody may use a route until a policy names it among its destinations (C(destinations.routes) in
    M(starling.mesh.policy) and M(starling.mesh.policy_set)).
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
    description: Name of the route.
    type: str
    required: true
  description:
    description: Free text. When omitted, an existing route keeps its description.
    type: str
  prefix:
    description:
      - IPv4 prefix in canonical form, for example V(198.18.40.0/24), or V(0.0.0.0/0) for an exit node.
      - Required when the route is created; when omitted, an existing route keeps its prefix.
      - The coordinator refuses prefixes that overlap another route, the mesh range, loopback, link-local or
        multicast.
    type: str
  routers:
    description:
      - The routing peers, each naming exactly one of O(routers[].peer) or O(routers[].group) (every member of the group routes).
      - The order carries no meaning. Required when the route is created; when omitted, an existing route keeps them.
    type: list
    elements: dict
    suboptions:
      peer:
        description: A peer name.
        type: str
      group:
        description: A group name.
        type: str
      metric:
        description: Preference, 1-9999; lower is preferred.
        type: int
        default: 9999
  masquerade:
    description:
      - Whether the routing peers masquerade routed traffic (hosts on the LAN then see the routing peer's address
        and need no route back to the mesh). When omitted, an existing route keeps its value (a new one masquerades).
    type: bool
  enabled:
    description: Whether the route is in force. When omitted, an existing route keeps its value (a new one is enabled).
    type: bool
  state:
    description: V(present) creates or updates the route, V(absent) deletes it (the coordinator refuses while a policy names it).
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: starling.mesh.policy
  - module: starling.mesh.policy_set
  - module: starling.mesh.peer
"""

EXAMPLES = r"""
- name: The clinic LAN, through two gateways (gw1 preferred)
  starling.mesh.route:
    name: clinic-lan
    prefix: 198.18.40.0/24
    routers:
      - peer: gw1
        metric: 10
      - group: clinic-gateways
        metric: 100

- name: Who may use it is up to policies
  starling.mesh.policy:
    name: staff-to-clinic-web
    protocol: tcp
    ports: [443]
    sources:
      groups: [staff]
    destinations:
      routes: [clinic-lan]

- name: An exit node
  starling.mesh.route:
    name: internet
    prefix: 0.0.0.0/0
    routers:
      - peer: exit-1

- name: Remove a route
  starling.mesh.route:
    name: old-lan
    state: absent
"""

RETURN = r"""
route:
  description: The route as the coordinator returns it (or would, in check mode). Empty when absent.
  returned: always
  type: dict
  sample:
    id: 01J9ZK3V7Q2W
    name: clinic-lan
    description: ""
    prefix: 198.18.40.0/24
    exit_node: false
    masquerade: true
    enabled: true
    routers:
      - {peer: gw1, group: null, metric: 10}
      - {peer: null, group: clinic-gateways, metric: 100}
diff:
  description: Before and after state of the declared fields (routers sorted, peers first).
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
from ansible_collections.starling.mesh.plugins.module_utils._policy import PolicyDataError
from ansible_collections.starling.mesh.plugins.module_utils._route import (
    EXIT_PREFIX,
    METRIC_DEFAULT,
    ROUTE_KEYS,
    comparable_route,
    normalize_route,
    overlaps,
    router_refs,
)

ROUTER_SPEC = dict(
    peer=dict(type="str"),
    group=dict(type="str"),
    metric=dict(type="int", default=METRIC_DEFAULT),
)


def wanted_route(params, current):
    """The complete desired route: parameters over the current values (or defaults)."""
    if current is None and (not params.get("prefix") or params.get("routers") is None):
        raise PolicyDataError(["route %r: prefix and routers are required to create it" % params["name"]])
    data = over_current(params, ROUTE_KEYS, comparable_route(current) if current else {})
    if data.get("routers"):
        data["routers"] = [dict((k, v) for k, v in r.items() if v is not None) for r in data["routers"]]
    return normalize_route(data)


def predicted(current, wanted):
    """The API object check mode reports (routers as the API returns them)."""
    out = dict(current or {})
    out.update(wanted)
    out["routers"] = [{"peer": r.get("peer"), "group": r.get("group"), "metric": r["metric"]} for r in wanted["routers"]]
    out["exit_node"] = wanted["prefix"] == EXIT_PREFIX
    return out


def check_server(module, route, current):
    """Fail, before any change, on unknown routing peers or groups and on overlaps with other routes."""
    client = module.client
    groups, peers = router_refs(route)
    problems = unknown_references(client, groups, peers)
    if current is None or current.get("prefix") != route["prefix"]:
        for other in client.list_all("/routes"):
            if other["name"] != route["name"] and overlaps(route["prefix"], other.get("prefix")):
                problems.append("%s overlaps route %r (%s)" % (route["prefix"], other["name"], other.get("prefix")))
    if problems:
        module.fail_json(msg="route %r: %s" % (route["name"], "; ".join(problems)), errors=problems)


def run(module):
    p = module.params
    client = module.client
    current = client.find_by_name("/routes", p["name"])
    before = comparable_route(current) if current else {}
    if p["state"] == "absent":
        return ensure_absent(module, "/routes", current, before, "route")

    try:
        wanted = wanted_route(p, current)
    except PolicyDataError as exc:
        module.fail_json(msg="; ".join(exc.errors), errors=exc.errors)
    if wanted == before:
        return dict(changed=False, route=current, diff=dict(before=before, after=before))
    check_server(module, wanted, current)
    if current is None:
        result = predicted(None, wanted) if module.check_mode else client.post("/routes", wanted)
    else:
        changed = [k for k in ROUTE_KEYS if before.get(k) != wanted[k]]
        if module.check_mode:
            result = predicted(current, wanted)
        else:
            result = client.patch(client.item_path("/routes", current["id"]), dict((k, wanted[k]) for k in changed))
    return dict(changed=True, route=result, diff=dict(before=before, after=comparable_route(result)))


def main():
    module = StarlingModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            description=dict(type="str"),
            prefix=dict(type="str"),
            routers=dict(
                type="list",
                elements="dict",
                options=ROUTER_SPEC,
                mutually_exclusive=[("peer", "group")],
                required_one_of=[("peer", "group")],
            ),
            masquerade=dict(type="bool"),
            enabled=dict(type="bool"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
    )
    try:
        module.exit_json(**run(module))
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
