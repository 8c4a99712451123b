# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Route data: client-side validation and normalization (mirrors the coordinator's rules) and the
comparable form of an API route object.

Pure functions over plain dicts: the route and policy_set modules, the inventory plugin and the unit
tests use them. A route is an IPv4 prefix behind routing peers (``routers``: each names exactly one
``peer`` or ``group`` with a ``metric``, 1-9999, default 9999, lower preferred); ``0.0.0.0/0`` makes
its routing peers exit nodes.
"""

from __future__ import annotations

import ipaddress

from ansible.module_utils.common.text.converters import to_text

from ansible_collections.starling.mesh.plugins.module_utils._policy import LABEL_RE, PEER_NAME_RE, PolicyDataError, _bool

EXIT_PREFIX = "0.0.0.0/0"
MESH = ipaddress.ip_network(u"100.64.0.0/10")
METRIC_MIN, METRIC_MAX, METRIC_DEFAULT = 1, 9999, 9999
FORBIDDEN = (
    (u"127.0.0.0/8", "loopback"),
    (u"169.254.0.0/16", "link-local"),
    (u"224.0.0.0/3", "multicast or reserved"),
    (u"0.0.0.0/8", "'this network'"),
)
ROUTE_KEYS = ("name", "description", "prefix", "routers", "masquerade", "enabled")
ROUTER_KINDS = ("peer", "group")


def check_prefix(value):
    """The prefix text if it can be a route (mirrors the coordinator): canonical IPv4, not overlapping the mesh
    range, loopback, link-local, multicast/reserved or 0.0.0.0/8, except 0.0.0.0/0 (an exit node); ValueError
    saying why otherwise. Overlaps between routes are checked against the coordinator's routes."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError("%r is not an IPv4 prefix like 198.18.40.0/24" % (value,))
    try:
        net = ipaddress.ip_network(to_text(value), strict=True)
    except ValueError as exc:
        raise ValueError("%r is not an IPv4 prefix in canonical form (%s)" % (value, exc))
    if net.version != 4:
        raise ValueError("%r is not an IPv4 prefix (only IPv4 routes are supported)" % (value,))
    if to_text(net) != value:
        raise ValueError("%r is not in canonical form (write %s)" % (value, net))
    if value == EXIT_PREFIX:
        return value
    if net.overlaps(MESH):
        raise ValueError("%s overlaps the mesh range %s: mesh addresses are routed by the mesh itself" % (value, MESH))
    for bad, what in FORBIDDEN:
        if net.overlaps(ipaddress.ip_network(bad)):
            raise ValueError("%s overlaps %s (%s): not routable through the mesh" % (value, bad, what))
    return value


def router_key(router):
    """Sort key: peers first, then groups, by name."""
    return (0 if router.get("peer") else 1, router.get("peer") or router.get("group") or "")


def normalize_routers(routers, where="routers"):
    """(sorted list of {peer|group, metric}, [errors]). Router order carries no meaning."""
    errors = []
    out = []
    seen = set()
    if not isinstance(routers, list):
        return [], ["%s must be a list of {peer or group, metric}" % where]
    if not routers:
        errors.append("%s: a route needs at least one routing peer (a peer or a group)" % where)
    for idx, raw in enumerate(routers):
        here = "%s[%d]" % (where, idx)
        if not isinstance(raw, dict):
            errors.append("%s: must be a mapping with peer or group, and metric" % here)
            continue
        unknown = sorted(set(raw) - set(["peer", "group", "metric"]))
        if unknown:
            errors.append("%s: unknown keys %s" % (here, ", ".join(unknown)))
        peer, group = raw.get("peer"), raw.get("group")
        if bool(peer) == bool(group):
            errors.append("%s: name exactly one of peer or group" % here)
            continue
        if peer and (not isinstance(peer, str) or not PEER_NAME_RE.match(peer)):
            errors.append("%s: %r is not a valid peer name" % (here, peer))
        if group and (not isinstance(group, str) or not LABEL_RE.match(group)):
            errors.append("%s: %r is not a valid group name" % (here, group))
        metric = raw.get("metric")
        if metric is None:
            metric = METRIC_DEFAULT
        try:
            if isinstance(metric, bool):
                raise ValueError()
            metric = int(metric)
        except (TypeError, ValueError):
            errors.append("%s: metric %r is not a number" % (here, metric))
            continue
        if not METRIC_MIN <= metric <= METRIC_MAX:
            errors.append("%s: metric %d is outside %d-%d" % (here, metric, METRIC_MIN, METRIC_MAX))
        key = ("peer", peer) if peer else ("group", group)
        if key in seen:
            errors.append("%s: %s %r is named twice" % (here, key[0], key[1]))
            continue
        seen.add(key)
        out.append({key[0]: key[1], "metric": metric})
    return sorted(out, key=router_key), errors


def normalize_route(data, where="route"):
    """A complete route dict (defaults filled, routers sorted) or PolicyDataError listing all problems."""
    errors = []
    if not isinstance(data, dict):
        raise PolicyDataError(["%s: must be a mapping, got %s" % (where, type(data).__name__)])
    name = data.get("name")
    if not name or not isinstance(name, str):
        errors.append("%s: name is required" % where)
        name = "?"
    elif not LABEL_RE.match(name):
        errors.append("%s: name %r is not valid (letters, digits, '_', '.', '-'; 1-63 characters)" % (where, name))
    where = "route %r" % name if name != "?" else where
    unknown = sorted(set(data) - set(ROUTE_KEYS))
    if unknown:
        errors.append("%s: unknown keys %s" % (where, ", ".join(unknown)))
    prefix = data.get("prefix")
    try:
        check_prefix(prefix)
    except ValueError as exc:
        errors.append("%s: prefix: %s" % (where, exc))
    routers, rerr = normalize_routers(data.get("routers"), "%s: routers" % where)
    errors.extend(rerr)
    out = {"name": name, "description": data.get("description") or "", "prefix": prefix, "routers": routers}
    for key in ("masquerade", "enabled"):
        try:
            out[key] = _bool(data.get(key), True)
        except PolicyDataError:
            errors.append("%s: %s must be true or false" % (where, key))
    if errors:
        raise PolicyDataError(errors)
    return out


def comparable_route(route):
    """The fields of an API route object that route data declares (ids, timestamps, exit_node dropped)."""
    routers = []
    for r in route.get("routers") or []:
        kind = "peer" if r.get("peer") else "group"
        metric = r.get("metric")
        routers.append({kind: r.get(kind), "metric": METRIC_DEFAULT if metric is None else int(metric)})
    return {
        "name": route["name"],
        "description": route.get("description") or "",
        "prefix": route.get("prefix"),
        "routers": sorted(routers, key=router_key),
        "masquerade": bool(route.get("masquerade", True)),
        "enabled": bool(route.get("enabled", True)),
    }


def router_refs(route):
    """(groups, peers) named as routers of a normalized route."""
    groups = set(r["group"] for r in route["routers"] if r.get("group"))
    peers = set(r["peer"] for r in route["routers"] if r.get("peer"))
    return groups, peers


def overlaps(prefix, other):
    """Whether two route prefixes cover common addresses; 0.0.0.0/0 (exit nodes) overlaps nothing."""
    if EXIT_PREFIX in (prefix, other):
        return False
    try:
        return ipaddress.ip_network(to_text(prefix)).overlaps(ipaddress.ip_network(to_text(other)))
    except ValueError:
        return False


def overlap_errors(routes, others=()):
    """Errors for declared ``routes`` overlapping each other or one of ``others`` (both normalized)."""
    errors = []
    routes = sorted(routes, key=lambda r: r["name"])
    for idx, route in enumerate(routes):
        for other in routes[idx + 1:] + [o for o in others if o["name"] != route["name"]]:
            if overlaps(route["prefix"], other["prefix"]):
                errors.append("route %r: %s overlaps route %r (%s)" % (route["name"], route["prefix"], other["name"], other["prefix"]))
    return errors


def index_routes(routes):
    """``{"peer": {name: [(route, metric)]}, "group": {name: [(route, metric)]}}`` of an API /routes listing,
    so that each peer's routes are found without scanning every route."""
    index = {"peer": {}, "group": {}}
    for route in routes or []:
        for r in route.get("routers") or []:
            for kind in ("peer", "group"):
                if r.get(kind):
                    index[kind].setdefault(r[kind], []).append((route, r.get("metric") or METRIC_DEFAULT))
    return index


def routes_of_peer(peer, index):
    """The routes ``peer`` (an API peer object) is a routing peer of, directly or through one of its groups
    (``index`` from ``index_routes``): ``[{name, prefix, metric, masquerade, enabled, exit_node}]`` sorted by
    name; the lowest metric wins when the peer is named more than once."""
    found = {}
    hits = list(index["peer"].get(peer.get("name"), []))
    for group in peer.get("groups") or []:
        hits.extend(index["group"].get(group, []))
    for route, metric in hits:
        name = route.get("name") or ""
        if name in found:
            found[name]["metric"] = min(found[name]["metric"], metric)
            continue
        found[name] = {
            "name": route.get("name"),
            "prefix": route.get("prefix"),
            "metric": metric,
            "masquerade": bool(route.get("masquerade", True)),
            "enabled": bool(route.get("enabled", True)),
            "exit_node": route.get("prefix") == EXIT_PREFIX,
        }
    return [found[n] for n in sorted(found)]
