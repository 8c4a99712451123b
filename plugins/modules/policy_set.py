#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: policy_set
short_description: Declare the complete group, route and policy set of a Starling mesh
version_added: 0.1.0
description:
  - Makes the groups and policies (and, when O(routes) is given, the routes) on the coordinator match the declared
    data. With O(exclusive=true) (the default) groups and policies (and routes, when managed) that are not declared
    are deleted.
  - Reports the change as B(reachability), which groups and peers gain or lose access to which groups, peers and
    routes, per protocol and port (for example C(+ dev -> db tcp/5432), C(- ci -> db any),
    C(+ staff -> 198.18.40.0/24 (route clinic-lan\) tcp/443)), in the diff and in RV(reachability).
  - Checks reachability assertions (O(expect)) against the declared set and fails before anything is applied when
    one does not hold.
  - The coordinator has no bulk endpoint, so the change is applied as individual calls in a safe order
    (create/update groups, create/update routes, create/update policies, delete policies, delete routes, delete
    groups). Everything that can be checked is checked first, on the client and against the coordinator's current
    state (names, ports, protocols, prefixes, overlapping routes, referenced groups, peers and routes, groups still
    used by setup keys or routes, assertions); nothing is changed when any check fails.
    If a call still fails midway, the module says which steps were applied; running it again converges.
author:
  - Starling developers (@starling)
extends_documentation_fragment:
  - starling.mesh.api
  - starling.mesh.attributes
attributes:
  check_mode:
    support: full
    details: Plans the change, checks the assertions and reports the reachability difference without applying.
  diff_mode:
    support: full
    details: The diff shows the changed groups, routes and policies and, as text, the reachability gained and lost.
options:
  groups:
    description: The groups of the mesh.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Group name.
        type: str
        required: true
      description:
        description: Free text.
        type: str
        default: ""
      peers:
        description:
          - Exact member list (peer names). When omitted, the membership is not managed
            (peers join through setup key auto-groups or M(starling.mesh.peer)).
        type: list
        elements: str
  policies:
    description:
      - The policies of the mesh. Each item has the keys of M(starling.mesh.policy)
        (C(name), C(description), C(enabled), C(protocol), C(ports), C(bidirectional), C(sources), C(destinations))
        with the same defaults (V(any), enabled, not bidirectional, all ports).
      - C(sources) and C(destinations) are mappings with C(groups) and/or C(peers) lists; C(destinations) may also
        name C(routes) (route names, whose prefixes the sources then reach; such a policy cannot be bidirectional).
    type: list
    elements: dict
    default: []
  routes:
    description:
      - The routes of the mesh. Each item has the keys of M(starling.mesh.route) (C(name), C(description),
        C(prefix), C(routers), C(masquerade), C(enabled)) with the same defaults (masquerade, enabled; router
        C(metric) 9999). C(prefix) and C(routers) are required.
      - When omitted (V(null)), routes are not managed. Policies may then name the routes the coordinator has
        (made with M(starling.mesh.route)), and O(exclusive) deletes none. When given, even as an empty list,
        the routes are part of the declared set (and O(exclusive=true) deletes undeclared ones).
    type: list
    elements: dict
  expect:
    description:
      - Reachability assertions, checked against the declared set before anything is applied.
      - Each item has C(from) and C(to) (a group name, C(peer:NAME) for a peer, or, as C(to), C(route:NAME) for a
        route; a plain name that is no group is looked up as a peer), C(allowed) (V(true) or V(false)), and optionally C(protocol) (V(any), V(tcp), V(udp),
        V(icmp)), C(port) (one port; the protocol defaults to V(tcp)) and C(name) (a label for messages).
      - A group subject is matched by policies that name that group. A peer subject is matched by policies that name
        the peer or one of its groups (its groups on the coordinator, with the memberships declared in O(groups)).
      - Without C(protocol) and C(port), C(allowed) means "some traffic is allowed".
    type: list
    elements: dict
    default: []
  exclusive:
    description:
      - If V(true), delete the groups and policies (and routes, when O(routes) is given) that are not declared.
      - If V(false), only create and update the declared ones.
    type: bool
    default: true
notes:
  - Reachability is computed on the endpoints policies name (groups and peers), not expanded to every peer.
    Disabled policies open nothing. Bidirectional policies count in both directions.
  - In the reachability entries, C(other) (shown as C(other-protocols)) stands for every IP protocol other than
    TCP, UDP and ICMP, which only a policy with protocol V(any) opens.
  - A route destination is C(to=route:NAME) with its C(prefix) in the entries, and C(PREFIX (route NAME\)) in the
    lines; a route whose prefix changes loses the access to the old prefix and gains it to the new one.
  - Two routes must not overlap (0.0.0.0/0, exit nodes, excepted). Because calls are applied one by one, moving a
    prefix from one route to another in the same run fails at the update; run it in two steps.
seealso:
  - module: starling.mesh.policy
  - module: starling.mesh.group
  - module: starling.mesh.route
"""

EXAMPLES = r"""
- name: Apply the mesh policy (preview first with --check --diff)
  starling.mesh.policy_set:
    groups:
      - name: dev
      - name: ci
      - name: db
        description: PostgreSQL servers
    policies:
      - name: dev-to-db
        protocol: tcp
        ports: [5432]
        sources: {groups: [dev]}
        destinations: {groups: [db]}
      - name: ci-ssh
        protocol: tcp
        ports: ["22"]
        sources: {groups: [ci]}
        destinations: {groups: [dev]}
    expect:
      - {from: ci, to: db, port: 5432, allowed: false}
      - {from: dev, to: db, port: 5432, allowed: true}
  register: policy_result

- name: Groups, a routed clinic LAN and who may reach it, as one set
  starling.mesh.policy_set:
    groups:
      - name: staff
      - name: clinic-gateways
    routes:
      - name: clinic-lan
        prefix: 198.18.40.0/24
        routers:
          - {group: clinic-gateways, metric: 100}
    policies:
      - name: staff-to-clinic-web
        protocol: tcp
        ports: [443]
        sources: {groups: [staff]}
        destinations: {routes: [clinic-lan]}
    expect:
      - {from: staff, to: "route:clinic-lan", port: 443, allowed: true}

- name: Show who gains and loses access
  ansible.builtin.debug:
    var: policy_result.reachability_lines
"""

RETURN = r"""
reachability:
  description: Access gained and lost between the current and the declared set.
  returned: always
  type: dict
  contains:
    gained:
      description:
        - Newly allowed traffic; C(ports) empty means all ports of the protocol.
        - Entries toward a route have C(to=route:NAME) and the route's C(prefix).
      type: list
      elements: dict
      sample: [{from: dev, to: db, protocol: tcp, ports: ["5432"]},
               {from: staff, to: "route:clinic-lan", prefix: 198.18.40.0/24, protocol: tcp, ports: ["443"]}]
    lost:
      description: No longer allowed traffic.
      type: list
      elements: dict
      sample: [{from: ci, to: db, protocol: any, ports: []}]
reachability_lines:
  description: The same as human-readable lines.
  returned: always
  type: list
  elements: str
  sample: ["+ dev -> db tcp/5432", "- ci -> db any"]
plan:
  description: The coordinator calls made (or, in check mode, that would be made), in order.
  returned: always
  type: list
  elements: dict
  sample: [{action: create, kind: group, name: db}, {action: update, kind: policy, name: dev-to-db, fields: [ports]}]
applied:
  description: Number of steps of RV(plan) that were applied.
  returned: always
  type: int
assertions:
  description: Each expectation with its outcome and the policies that allow the traffic.
  returned: always
  type: list
  elements: dict
  sample: [{from: ci, to: db, protocol: tcp, port: 5432, allowed: false, actual: false, ok: true, by: []}]
summary:
  description: Counts of the plan per action and kind.
  returned: always
  type: dict
  sample: {create: 1, update: 1, delete: 0}
"""

from ansible_collections.starling.mesh.plugins.module_utils._api import CoordinatorError
from ansible_collections.starling.mesh.plugins.module_utils._module import StarlingModule
from ansible_collections.starling.mesh.plugins.module_utils._policy import (
    LABEL_RE,
    PEER_NAME_RE,
    PEER_PREFIX,
    POLICY_KEYS,
    ROUTE_PREFIX,
    PolicyDataError,
    comparable_policy,
    expectation_text,
    is_allowed,
    normalize_expectation,
    normalize_policy,
    policy_refs,
    reach_diff,
    reach_lines,
    reach_map,
    route_refs,
)
from ansible_collections.starling.mesh.plugins.module_utils._route import (
    ROUTE_KEYS,
    comparable_route,
    normalize_route,
    overlap_errors,
    router_refs,
)


# ----- declared data ------------------------------------------------------------------------------
def normalize_groups(groups):
    errors = []
    out = {}
    for idx, g in enumerate(groups):
        name = g.get("name")
        if not LABEL_RE.match(name or ""):
            errors.append("groups[%d]: name %r is not valid (letters, digits, '_', '.', '-'; 1-63 characters)" % (idx, name))
            continue
        if name in out:
            errors.append("group %r is declared twice" % name)
            continue
        peers = g.get("peers")
        if peers is not None:
            bad = [p for p in peers if not PEER_NAME_RE.match(p or "")]
            if bad:
                errors.append("group %r: invalid peer names %s" % (name, ", ".join(repr(b) for b in bad)))
            peers = sorted(set(peers))
        out[name] = {"name": name, "description": g.get("description") or "", "peers": peers}
    return out, errors


def _normalize_named(items, normalize, kind, where):
    """({name: item}, errors) for declared items: each normalized (errors collected), names unique."""
    errors = []
    out = {}
    for idx, raw in enumerate(items):
        try:
            item = normalize(raw, where="%s[%d]" % (where, idx))
        except PolicyDataError as exc:
            errors.extend(exc.errors)
            continue
        if item["name"] in out:
            errors.append("%s %r is declared twice" % (kind, item["name"]))
            continue
        out[item["name"]] = item
    return out, errors


def normalize_policies(policies):
    return _normalize_named(policies, normalize_policy, "policy", "policies")


def normalize_routes(routes):
    """({name: route}, errors) for the declared routes; None when routes are not managed."""
    if routes is None:
        return None, []
    out, errors = _normalize_named(routes, normalize_route, "route", "routes")
    if not errors:
        errors.extend(overlap_errors(out.values()))
    return out, errors


# ----- planning -----------------------------------------------------------------------------------
def plan_changes(cur_groups, cur_policies, groups, policies, exclusive, cur_routes=None, routes=None):
    """Ordered steps: create/update groups, create/update routes, create/update policies, delete policies,
    delete routes, delete groups. ``routes`` None: routes are not managed."""
    steps = []
    cur_routes = cur_routes or {}
    for name in sorted(groups):
        want = groups[name]
        cur = cur_groups.get(name)
        if cur is None:
            body = {"name": name, "description": want["description"]}
            if want["peers"] is not None:
                body["peers"] = want["peers"]
            steps.append({"action": "create", "kind": "group", "name": name, "body": body})
            continue
        patch = {}
        if want["description"] != (cur.get("description") or ""):
            patch["description"] = want["description"]
        if want["peers"] is not None and want["peers"] != sorted(cur.get("peers") or []):
            patch["peers"] = want["peers"]
        if patch:
            steps.append({"action": "update", "kind": "group", "name": name, "id": cur["id"], "body": patch})
    for name in sorted(routes or {}):
        want = routes[name]
        cur = cur_routes.get(name)
        if cur is None:
            steps.append({"action": "create", "kind": "route", "name": name, "body": want})
            continue
        have = comparable_route(cur)
        patch = dict((k, want[k]) for k in ROUTE_KEYS if want[k] != have[k])
        if patch:
            steps.append({"action": "update", "kind": "route", "name": name, "id": cur["id"], "body": patch})
    for name in sorted(policies):
        want = policies[name]
        cur = cur_policies.get(name)
        if cur is None:
            steps.append({"action": "create", "kind": "policy", "name": name, "body": want})
            continue
        have = comparable_policy(cur)
        patch = dict((k, want[k]) for k in POLICY_KEYS if want[k] != have[k])
        if patch:
            steps.append({"action": "update", "kind": "policy", "name": name, "id": cur["id"], "body": patch})
    if exclusive:
        for name in sorted(set(cur_policies) - set(policies)):
            steps.append({"action": "delete", "kind": "policy", "name": name, "id": cur_policies[name]["id"]})
        if routes is not None:
            for name in sorted(set(cur_routes) - set(routes)):
                steps.append({"action": "delete", "kind": "route", "name": name, "id": cur_routes[name]["id"]})
        for name in sorted(set(cur_groups) - set(groups)):
            steps.append({"action": "delete", "kind": "group", "name": name, "id": cur_groups[name]["id"]})
    return steps


def public_step(step):
    out = {"action": step["action"], "kind": step["kind"], "name": step["name"]}
    if step["action"] == "update":
        out["fields"] = sorted(step["body"])
    return out


def group_view(group):
    return {"description": group.get("description") or "", "peers": sorted(group.get("peers") or [])}


def policy_view(policy):
    view = comparable_policy(policy)
    view.pop("name")
    return view


def route_view(route):
    view = comparable_route(route)
    view.pop("name")
    return view


COLLECTIONS = {"group": "/groups", "policy": "/policies", "route": "/routes"}


class PolicySet(object):
    def __init__(self, module):
        self.module = module
        self.client = module.client
        self.errors = []
        self.known_routes = set()

    def fail(self, msg, **extra):
        self.module.fail_json(msg=msg, **extra)

    def load_declared(self):
        p = self.module.params
        groups, gerr = normalize_groups(p["groups"])
        policies, perr = normalize_policies(p["policies"])
        routes, rerr = normalize_routes(p.get("routes"))  # .get: callers that predate routes (bench)
        expectations = []
        eerr = []
        for idx, raw in enumerate(p["expect"]):
            try:
                expectations.append(normalize_expectation(raw, idx))
            except PolicyDataError as exc:
                eerr.extend(exc.errors)
        errors = gerr + rerr + perr + eerr
        if errors:
            self.fail("policy_set: invalid data, nothing was changed: " + "; ".join(errors), errors=errors)
        return groups, policies, expectations, routes

    def check_against_server(self, groups, policies, cur_groups, exclusive, routes=None, cur_routes=None):
        errors = []
        cur_routes = cur_routes or {}
        known_groups = set(groups) if exclusive else set(groups) | set(cur_groups)
        peer_refs = set()
        for name in sorted(routes or {}):
            rt_groups, rt_peers = router_refs(routes[name])
            unknown = sorted(rt_groups - known_groups)
            if unknown:
                hint = " (declare them under groups)" if exclusive else ""
                errors.append("route %r: unknown router groups %s%s" % (name, ", ".join(unknown), hint))
            peer_refs |= rt_peers
        if routes is not None and not exclusive:
            kept = [comparable_route(r) for n, r in cur_routes.items() if n not in routes]
            errors.extend(overlap_errors(routes.values(), kept))
        for name in sorted(policies):
            pol_groups, pol_peers = policy_refs(policies[name])
            unknown = sorted(pol_groups - known_groups)
            if unknown:
                hint = " (declare them under groups)" if exclusive else ""
                errors.append("policy %r: unknown groups %s%s" % (name, ", ".join(unknown), hint))
            unknown = sorted(route_refs(policies[name]) - self.known_routes)
            if unknown:
                hint = " (declare them under routes)" if routes is not None and exclusive else ""
                errors.append("policy %r: unknown routes %s%s" % (name, ", ".join(unknown), hint))
            peer_refs |= pol_peers
        for g in groups.values():
            peer_refs |= set(g["peers"] or [])
        missing = self.client.missing_peers(peer_refs)
        if missing:
            errors.append("unknown peers: %s" % ", ".join(missing))
        if exclusive:
            doomed = set(cur_groups) - set(groups)
            # unmanaged routes stay as they are (declared ones were checked above, undeclared ones are deleted first)
            staying = [r for _n, r in sorted(cur_routes.items())] if routes is None else []
            for route in staying:
                used = sorted(doomed & router_refs(comparable_route(route))[0])
                if used:
                    errors.append(
                        "group %s would be deleted but routes route %r: declare it under groups or change the "
                        "route's routers" % (", ".join(repr(u) for u in used), route["name"])
                    )
            if doomed:
                for key in self.client.list_all("/setup-keys"):
                    used = sorted(doomed & set(key.get("auto_groups") or []))
                    if used:
                        errors.append(
                            "group %s would be deleted but is an auto-group of setup key %r: declare it under groups "
                            "or remove it from the key" % (", ".join(repr(u) for u in used), key["name"])
                        )
        return errors

    def subject(self, name, groups, cur_groups, exclusive, cache):
        """Resolve an assertion subject: a group, or a peer with its (declared) groups."""
        if name in cache:
            return cache[name]
        known_groups = set(groups) if exclusive else set(groups) | set(cur_groups)
        if name.startswith(ROUTE_PREFIX):
            route = name[len(ROUTE_PREFIX):]
            subj = {"kind": "route", "name": route, "groups": []} if route in self.known_routes else None
        elif not name.startswith(PEER_PREFIX) and name in known_groups:
            subj = {"kind": "group", "name": name, "groups": [name]}
        else:
            peer_name = name[len(PEER_PREFIX):] if name.startswith(PEER_PREFIX) else name
            peer = self.client.find_by_name("/peers", peer_name)
            if peer is None:
                subj = None
            else:
                member = set(peer.get("groups") or [])
                if exclusive:
                    member &= set(groups)
                for gname, g in groups.items():
                    if g["peers"] is not None:
                        if peer_name in g["peers"]:
                            member.add(gname)
                        else:
                            member.discard(gname)
                subj = {"kind": "peer", "name": peer_name, "groups": sorted(member)}
        cache[name] = subj
        return subj

    def evaluate(self, expectations, effective, groups, cur_groups, exclusive):
        results = []
        failures = []
        cache = {}
        for idx, exp in enumerate(expectations):
            src = self.subject(exp["from"], groups, cur_groups, exclusive, cache)
            dst = self.subject(exp["to"], groups, cur_groups, exclusive, cache)
            label = "expect[%d]%s" % (idx, " (%s)" % exp["name"] if exp["name"] else "")
            unknown = [n for n, s in ((exp["from"], src), (exp["to"], dst)) if s is None]
            if unknown:
                kind = "route" if all(u.startswith(ROUTE_PREFIX) for u in unknown) else "group or peer"
                failures.append("%s: unknown %s %s" % (label, kind, ", ".join(repr(u) for u in unknown)))
                continue
            actual, by = is_allowed(effective, src, dst, exp["protocol"], exp["port"])
            ok = actual == exp["allowed"]
            entry = {
                "name": exp["name"],
                "from": exp["from"],
                "to": exp["to"],
                "protocol": exp["protocol"] or "any",
                "port": exp["port"],
                "allowed": exp["allowed"],
                "actual": actual,
                "ok": ok,
                "by": by,
            }
            results.append(entry)
            if not ok:
                why = " (opened by %s)" % ", ".join(by) if by else ""
                failures.append("%s: expected %s, but it is %s%s" % (
                    label, expectation_text(exp), "allowed" if actual else "denied", why))
        return results, failures

    def run(self):
        p = self.module.params
        exclusive = p["exclusive"]
        groups, policies, expectations, routes = self.load_declared()
        cur_groups = dict((g["name"], g) for g in self.client.list_all("/groups"))
        cur_policies = dict((q["name"], q) for q in self.client.list_all("/policies"))
        cur_routes = dict((r["name"], r) for r in self.client.list_all("/routes"))

        # the route prefixes after the change (route names: what policies and assertions may name)
        cur_prefixes = dict((n, r.get("prefix")) for n, r in cur_routes.items())
        new_prefixes = dict(cur_prefixes)
        if routes is not None:
            if exclusive:
                new_prefixes = {}
            new_prefixes.update((n, r["prefix"]) for n, r in routes.items())
        self.known_routes = set(new_prefixes)

        errors = self.check_against_server(groups, policies, cur_groups, exclusive, routes, cur_routes)
        if errors:
            self.fail("policy_set: the declared set does not fit the coordinator, nothing was changed: " + "; ".join(errors),
                      errors=errors)

        current_set = [comparable_policy(q) for q in cur_policies.values()]
        effective = list(policies.values())
        if not exclusive:
            effective += [comparable_policy(q) for name, q in cur_policies.items() if name not in policies]
        reach = reach_diff(reach_map(current_set, cur_prefixes), reach_map(effective, new_prefixes))
        lines = reach_lines(reach)

        assertions, failures = self.evaluate(expectations, effective, groups, cur_groups, exclusive)
        steps = plan_changes(cur_groups, cur_policies, groups, policies, exclusive, cur_routes, routes)
        result = {
            "changed": bool(steps),
            "reachability": reach,
            "reachability_lines": lines,
            "plan": [public_step(s) for s in steps],
            "applied": 0,
            "assertions": assertions,
            "summary": dict((a, sum(1 for s in steps if s["action"] == a)) for a in ("create", "update", "delete")),
            "diff": self.diff(steps, cur_groups, cur_policies, groups, policies, lines, cur_routes, routes),
        }
        if failures:
            result["changed"] = False
            self.fail("policy_set: reachability assertions failed, nothing was changed: " + "; ".join(failures),
                      **dict((k, v) for k, v in result.items() if k not in ("changed", "diff")))
        if self.module.check_mode or not steps:
            return result
        for idx, step in enumerate(steps):
            try:
                self.apply(step)
            except CoordinatorError as exc:
                done = ", ".join("%s %s %r" % (s["action"], s["kind"], s["name"]) for s in steps[:idx]) or "none"
                result.pop("diff")
                result["applied"] = idx
                self.module.fail_json(
                    msg="policy_set: step %d of %d (%s %s %r) failed: %s. Applied before it: %s. The coordinator now "
                    "holds a partial update; fix the cause and run again to converge."
                    % (idx + 1, len(steps), step["action"], step["kind"], step["name"], exc.msg, done),
                    **dict(result, **exc.to_result())
                )
            result["applied"] = idx + 1
        return result

    def apply(self, step):
        collection = COLLECTIONS[step["kind"]]
        if step["action"] == "create":
            self.client.post(collection, step["body"])
        elif step["action"] == "update":
            self.client.patch(self.client.item_path(collection, step["id"]), step["body"])
        else:
            self.client.delete(self.client.item_path(collection, step["id"]))

    @staticmethod
    def diff(steps, cur_groups, cur_policies, groups, policies, lines, cur_routes=None, routes=None):
        before = {"groups": {}, "policies": {}}
        after = {"groups": {}, "policies": {}}
        if routes is not None:
            before["routes"], after["routes"] = {}, {}
        for step in steps:
            name = step["name"]
            if step["kind"] == "route":
                if name in cur_routes:
                    before["routes"][name] = route_view(cur_routes[name])
                if step["action"] != "delete":
                    after["routes"][name] = route_view(routes[name])
            elif step["kind"] == "group":
                if name in cur_groups:
                    before["groups"][name] = group_view(cur_groups[name])
                if step["action"] != "delete":
                    want = dict(groups[name])
                    if want["peers"] is None:
                        want["peers"] = (cur_groups.get(name) or {}).get("peers") or []
                    after["groups"][name] = group_view(want)
            else:
                if name in cur_policies:
                    before["policies"][name] = policy_view(cur_policies[name])
                if step["action"] != "delete":
                    after["policies"][name] = policy_view(policies[name])
        text = "reachability (+ gained, - lost):\n"
        text += "\n".join(lines) + "\n" if lines else "  (no change)\n"
        return [
            {"before_header": "coordinator", "after_header": "declared", "before": before, "after": after},
            {"prepared": text},
        ]


def main():
    module = StarlingModule(
        argument_spec=dict(
            groups=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    name=dict(type="str", required=True),
                    description=dict(type="str", default=""),
                    peers=dict(type="list", elements="str"),
                ),
            ),
            policies=dict(type="list", elements="dict", default=[]),
            routes=dict(type="list", elements="dict"),
            expect=dict(type="list", elements="dict", default=[]),
            exclusive=dict(type="bool", default=True),
        ),
    )
    try:
        module.exit_json(**PolicySet(module).run())
    except CoordinatorError as exc:
        module.fail_api(exc)


if __name__ == "__main__":
    main()
