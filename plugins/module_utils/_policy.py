# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Policy data: client-side validation and normalization (mirrors the coordinator's rules), the
reachability a policy set opens, the difference between two sets, and reachability assertions.

Pure functions over plain dicts: the policy and policy_set modules and the unit tests use them.

Reachability is computed on the endpoints that policies name (groups, peers written
``peer:NAME``, and routes, destinations only, written ``route:NAME`` with their prefix): a pair
``(from, to)`` holds the traffic that some enabled policy opens from ``from`` to ``to`` (both ways
for bidirectional policies), as port intervals per protocol: ``tcp`` and ``udp`` carry ports
1-65535, ``icmp`` and ``other`` (every other IP protocol, opened only by ``any``) are all-or-nothing
and use the single interval (1, 65535).
"""

from __future__ import annotations

import re

PROTOCOLS = ("any", "tcp", "udp", "icmp")
ATOMS = ("tcp", "udp", "icmp", "other")
FULL = (1, 65535)
LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
PEER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PORT_RE = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")
PEER_PREFIX = "peer:"
ROUTE_PREFIX = "route:"


class PolicyDataError(ValueError):
    """Invalid declared data; ``errors`` lists every problem found (one line each)."""

    def __init__(self, errors):
        self.errors = list(errors)
        super(PolicyDataError, self).__init__("; ".join(self.errors))


# ----- ports --------------------------------------------------------------------------------------
def parse_port(spec):
    """(start, end) of a port spec (5432, "5432", "8000-8100"); ValueError with a clear text."""
    if isinstance(spec, bool):
        raise ValueError("port %r is not a number or range" % (spec,))
    if isinstance(spec, int):
        start = end = spec
    else:
        match = PORT_RE.match(str(spec))
        if not match:
            raise ValueError("port %r is not a number or a range like 8000-8100" % (spec,))
        start = int(match.group(1))
        end = int(match.group(2) or match.group(1))
    if not (1 <= start <= 65535 and 1 <= end <= 65535):
        raise ValueError("port %r is outside 1-65535" % (spec,))
    if start > end:
        raise ValueError("port range %r starts after it ends" % (spec,))
    return start, end


def format_port(rng):
    return str(rng[0]) if rng[0] == rng[1] else "%d-%d" % (rng[0], rng[1])


def normalize_ports(ports):
    """Sorted, de-duplicated port strings, exactly as the coordinator stores and returns them."""
    return [format_port(r) for r in sorted(set(parse_port(p) for p in ports or []))]


# ----- policies -----------------------------------------------------------------------------------
def normalize_endpoints(ends, routes=False):
    """Sorted, de-duplicated names; destinations (``routes=True``) also carry ``routes``."""
    ends = ends or {}
    out = {
        "groups": sorted(set(ends.get("groups") or [])),
        "peers": sorted(set(ends.get("peers") or [])),
    }
    if routes:
        out["routes"] = sorted(set(ends.get("routes") or []))
    return out


def normalize_policy(data, where="policy"):
    """A complete policy dict (defaults filled, ports normalized) or PolicyDataError listing all problems."""
    errors = []
    if not isinstance(data, dict):
        raise PolicyDataError(["%s: must be a mapping, got %s" % (where, type(data).__name__)])
    name = data.get("name")
    if not name or not isinstance(name, str):
        errors.append("%s: name is required" % where)
        name = "?"
    elif not LABEL_RE.match(name):
        errors.append("%s: name %r is not valid (letters, digits, '_', '.', '-'; 1-63 characters)" % (where, name))
    where = "policy %r" % name if name != "?" else where
    known = set(["name", "description", "enabled", "protocol", "ports", "bidirectional", "sources", "destinations"])
    unknown = sorted(set(data) - known)
    if unknown:
        errors.append("%s: unknown keys %s" % (where, ", ".join(unknown)))
    protocol = data.get("protocol") or "any"
    if protocol not in PROTOCOLS:
        errors.append("%s: protocol %r is not one of %s" % (where, protocol, ", ".join(PROTOCOLS)))
    raw_ports = data.get("ports") or []
    if not isinstance(raw_ports, list):
        raw_ports = [raw_ports]
    ports = []
    for spec in raw_ports:
        try:
            ports.append(parse_port(spec))
        except ValueError as exc:
            errors.append("%s: invalid port: %s" % (where, exc))
    if raw_ports and protocol not in ("tcp", "udp"):
        errors.append("%s: ports need protocol tcp or udp, not %r" % (where, protocol))
    out = {
        "name": name,
        "description": data.get("description") or "",
        "enabled": _bool(data.get("enabled"), True),
        "protocol": protocol,
        "ports": [format_port(r) for r in sorted(set(ports))],
        "bidirectional": _bool(data.get("bidirectional"), False),
    }
    for side in ("sources", "destinations"):
        dest = side == "destinations"
        ends = data.get(side)
        if not isinstance(ends, dict):
            errors.append("%s: %s must be a mapping with groups and/or peers%s" % (where, side, " and/or routes" if dest else ""))
            out[side] = normalize_endpoints({}, dest)
            continue
        if not dest and ends.get("routes"):
            errors.append("%s: sources.routes: a route can only be a destination (traffic comes from peers)" % where)
        allowed = ["groups", "peers", "routes"]
        extra = sorted(set(ends) - set(allowed))
        if extra:
            errors.append("%s: %s has unknown keys %s" % (where, side, ", ".join(extra)))
        norm = normalize_endpoints(ends, dest)
        if not norm["groups"] and not norm["peers"] and not norm.get("routes"):
            errors.append("%s: %s must name at least one group or peer%s" % (where, side, " or route" if dest else ""))
        for group in norm["groups"]:
            if not isinstance(group, str) or not LABEL_RE.match(group):
                errors.append("%s: %s.groups: %r is not a valid group name" % (where, side, group))
        for peer in norm["peers"]:
            if not isinstance(peer, str) or not PEER_NAME_RE.match(peer):
                errors.append("%s: %s.peers: %r is not a valid peer name" % (where, side, peer))
        for route in norm.get("routes", []):
            if not isinstance(route, str) or not LABEL_RE.match(route):
                errors.append("%s: %s.routes: %r is not a valid route name" % (where, side, route))
        out[side] = norm
    if out["bidirectional"] and out["destinations"]["routes"]:
        errors.append(
            "%s: a policy whose destinations include routes cannot be bidirectional (routed traffic is one-way: "
            "hosts on the route's LAN cannot open connections into the mesh)" % where
        )
    if errors:
        raise PolicyDataError(errors)
    return out


def _bool(value, default):
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise PolicyDataError(["%r is not a boolean" % (value,)])


POLICY_KEYS = ("name", "description", "enabled", "protocol", "ports", "bidirectional", "sources", "destinations")


def comparable_policy(policy):
    """The fields of an API policy object that policy data declares (ids and timestamps dropped)."""
    return {
        "name": policy["name"],
        "description": policy.get("description") or "",
        "enabled": bool(policy.get("enabled", True)),
        "protocol": policy.get("protocol") or "any",
        "ports": normalize_ports(policy.get("ports") or []),
        "bidirectional": bool(policy.get("bidirectional", False)),
        "sources": normalize_endpoints(policy.get("sources")),
        "destinations": normalize_endpoints(policy.get("destinations"), routes=True),
    }


def policy_refs(policy):
    """(groups, peers) named by a normalized policy."""
    groups = set(policy["sources"]["groups"]) | set(policy["destinations"]["groups"])
    peers = set(policy["sources"]["peers"]) | set(policy["destinations"]["peers"])
    return groups, peers


def route_refs(policy):
    """Route names a normalized policy names (destinations only)."""
    return set(policy["destinations"].get("routes") or [])


# ----- intervals ----------------------------------------------------------------------------------
def merge(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1] + 1:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def subtract(a, b):
    """Intervals of ``a`` not covered by ``b`` (both merged)."""
    out = []
    for start, end in a:
        cur = start
        for bs, be in b:
            if be < cur or bs > end:
                continue
            if bs > cur:
                out.append((cur, bs - 1))
            cur = max(cur, be + 1)
            if cur > end:
                break
        if cur <= end:
            out.append((cur, end))
    return out


def access_of(policy):
    """{atom: [intervals]} opened by one policy."""
    proto = policy["protocol"]
    if proto == "any":
        return dict((atom, [FULL]) for atom in ATOMS)
    if proto == "icmp":
        return {"icmp": [FULL]}
    ports = [parse_port(p) for p in policy["ports"]] or [FULL]
    return {proto: merge(ports)}


def route_endpoint(name, prefix):
    """The reach-map endpoint of a route: its name and prefix (a changed prefix is lost and gained access)."""
    return "%s%s %s" % (ROUTE_PREFIX, name, prefix or "?")


def endpoint_names(ends, routes=None):
    names = list(ends["groups"]) + [PEER_PREFIX + p for p in ends["peers"]]
    return names + [route_endpoint(r, (routes or {}).get(r)) for r in ends.get("routes") or []]


def reach_map(policies, routes=None):
    """{(from, to): {atom: [intervals]}} for the enabled policies; ``routes`` maps route names to prefixes."""
    pairs = {}
    for pol in policies:
        if not pol.get("enabled", True):
            continue
        acc = access_of(pol)
        srcs = endpoint_names(pol["sources"], routes)
        dsts = endpoint_names(pol["destinations"], routes)
        directions = [(srcs, dsts)]
        if pol.get("bidirectional"):
            directions.append((dsts, srcs))
        for froms, tos in directions:
            for f in froms:
                for t in tos:
                    cur = pairs.setdefault((f, t), {})
                    for atom, ivs in acc.items():
                        cur[atom] = merge(cur.get(atom, []) + ivs)
    return pairs


def _entries(pair, acc):
    """Structured entries for one pair's access: one 'any' entry, or one per protocol.
    A route destination is ``to: route:NAME`` with its ``prefix``."""
    f, t = pair
    extra = {}
    if t.startswith(ROUTE_PREFIX):
        name, _sep, prefix = t.partition(" ")
        t, extra = name, {"prefix": prefix}
    if all(acc.get(atom) == [FULL] for atom in ATOMS):
        return [dict({"from": f, "to": t, "protocol": "any", "ports": []}, **extra)]
    out = []
    for atom in ATOMS:
        ivs = acc.get(atom)
        if not ivs:
            continue
        ports = [] if ivs == [FULL] or atom in ("icmp", "other") else [format_port(r) for r in ivs]
        out.append(dict({"from": f, "to": t, "protocol": atom, "ports": ports}, **extra))
    return out


def reach_diff(before, after):
    """{'gained': [...], 'lost': [...]} between two reach maps; entries sorted."""
    result = {"gained": [], "lost": []}
    for key, (mine, other) in (("gained", (after, before)), ("lost", (before, after))):
        for pair in sorted(mine):
            acc = mine[pair]
            base = other.get(pair, {})
            diff = {}
            for atom, ivs in acc.items():
                rest = subtract(ivs, base.get(atom, []))
                if rest:
                    diff[atom] = rest
            if diff:
                result[key].extend(_entries(pair, diff))
    return result


def entry_text(entry):
    proto = entry["protocol"]
    if proto == "other":
        what = "other-protocols"
    elif entry["ports"]:
        what = "%s/%s" % (proto, ",".join(entry["ports"]))
    else:
        what = proto
    to = entry["to"]
    if "prefix" in entry:
        to = "%s (route %s)" % (entry["prefix"], to[len(ROUTE_PREFIX):])
    return "%s -> %s %s" % (entry["from"], to, what)


def reach_lines(diff):
    return ["+ " + entry_text(e) for e in diff["gained"]] + ["- " + entry_text(e) for e in diff["lost"]]


# ----- assertions ---------------------------------------------------------------------------------
def normalize_expectation(raw, index):
    """A checked expectation ``{from, to, protocol, port, allowed}``; PolicyDataError otherwise."""
    where = "expect[%d]" % index
    errors = []
    if not isinstance(raw, dict):
        raise PolicyDataError(["%s: must be a mapping with from, to, allowed" % where])
    unknown = sorted(set(raw) - set(["from", "to", "protocol", "port", "allowed", "name"]))
    if unknown:
        errors.append("%s: unknown keys %s" % (where, ", ".join(unknown)))
    for key in ("from", "to"):
        if not raw.get(key) or not isinstance(raw.get(key), str):
            errors.append("%s: %s is required (a group name or peer:NAME)" % (where, key))
    if "allowed" not in raw:
        errors.append("%s: allowed (true or false) is required" % where)
    port = raw.get("port")
    protocol = raw.get("protocol")
    if port is not None:
        try:
            start, end = parse_port(port)
            if start != end:
                raise ValueError("port %r must be a single port" % (port,))
            port = start
        except ValueError as exc:
            errors.append("%s: invalid port: %s" % (where, exc))
        protocol = protocol or "tcp"
        if protocol not in ("tcp", "udp"):
            errors.append("%s: a port needs protocol tcp or udp, not %r" % (where, protocol))
    if protocol is not None and protocol not in PROTOCOLS:
        errors.append("%s: protocol %r is not one of %s" % (where, protocol, ", ".join(PROTOCOLS)))
    allowed = None
    try:
        allowed = _bool(raw.get("allowed"), None)
    except PolicyDataError:
        errors.append("%s: allowed must be true or false" % where)
    if errors:
        raise PolicyDataError(errors)
    return {
        "name": raw.get("name") or "",
        "from": raw["from"],
        "to": raw["to"],
        "protocol": protocol if protocol != "any" else None,
        "port": port,
        "allowed": allowed,
    }


def _matches(subject, ends):
    """Does a policy side ``ends`` cover ``subject`` ({'kind': 'group'|'peer'|'route', 'name', 'groups'})?"""
    if subject["kind"] == "route":
        return subject["name"] in (ends.get("routes") or [])
    if subject["kind"] == "group":
        return subject["name"] in ends["groups"]
    return subject["name"] in ends["peers"] or bool(set(subject["groups"]) & set(ends["groups"]))


def _covers(policy, protocol, port):
    pol_proto = policy["protocol"]
    if protocol is None:
        return True
    if pol_proto == "any":
        return True
    if pol_proto != protocol:
        return False
    if port is None or not policy["ports"]:
        return True
    return any(start <= port <= end for start, end in (parse_port(p) for p in policy["ports"]))


def is_allowed(policies, src, dst, protocol=None, port=None):
    """(allowed, [policy names that open it]) for subjects ``src`` -> ``dst`` under ``policies``."""
    by = []
    for pol in policies:
        if not pol.get("enabled", True):
            continue
        directions = [(pol["sources"], pol["destinations"])]
        if pol.get("bidirectional"):
            directions.append((pol["destinations"], pol["sources"]))
        for s, d in directions:
            if _matches(src, s) and _matches(dst, d) and _covers(pol, protocol, port):
                by.append(pol["name"])
                break
    return bool(by), by


def expectation_text(exp):
    what = exp["protocol"] or "any traffic"
    if exp["port"] is not None:
        what = "%s/%d" % (exp["protocol"], exp["port"])
    return "%s -> %s %s %s" % (exp["from"], exp["to"], what, "allowed" if exp["allowed"] else "denied")
