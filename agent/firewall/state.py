"""What our table really holds (`nft -j list table inet starling`) compared with the installed
model, semantically, and the differences described in words for the audit log.

Rules are parsed back into short tokens ("accept in @s_... tcp 22,5432", "established",
"drop", "jump iifname wt0 mesh_in", "accept in @s_... out 198.18.40.0/24 tcp 8080",
"masquerade iifname wt0 oifname!= wt0 out 198.18.40.0/24"); a rule we cannot parse becomes its canonical JSON, so it
never equals anything we wrote. The expected tokens come from the very JSON we send, parsed by
the same function, so no listing is needed after our own writes (a listing with 10k+ set
elements costs 0.1-0.5 s, nft fetching every element even for `list chain`). Handles, counters
and cosmetic differences in nft's output (`in` vs `==`, a single value vs a set) do not count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.firewall.model import FAMILY, TABLE, CompiledRuleset, merge_ports, sorted_ips
from agent.firewall.nftjson import BASE_ATTRS, chain_exprs, chains

_SHOWN = 5
_PROTO_NUMBERS = {1: "icmp", 6: "tcp", 17: "udp"}


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Snapshot:
    table: dict[str, Any]
    chains: dict[str, dict[str, Any]]
    rules: dict[str, tuple[str, ...]]  # chain -> rule tokens
    sets: dict[str, dict[str, Any]]  # set -> attributes without elements
    elements: dict[str, frozenset[str]]
    other: tuple[str, ...]  # any other object found in our table (maps, counters, flowtables...)


def _values(right: Any) -> list[Any]:
    if isinstance(right, dict) and "set" in right:
        right = right["set"]
    return right if isinstance(right, list) else [right]


def _ports(right: Any) -> str | None:
    ranges = []
    for item in _values(right):
        if isinstance(item, int) and not isinstance(item, bool):
            ranges.append((item, item))
        elif isinstance(item, dict) and isinstance(item.get("range"), list) and len(item["range"]) == 2:
            ranges.append((int(item["range"][0]), int(item["range"][1])))
        else:
            return None
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in merge_ports(ranges))


def _address(right: Any) -> str | None:
    """A set reference (`@s_...`) as is; an address or prefix as CIDR (nft lists a /32 as an address)."""
    if isinstance(right, str):
        return right if right.startswith("@") or "/" in right else f"{right}/32"
    prefix = right.get("prefix") if isinstance(right, dict) else None
    if isinstance(prefix, dict) and isinstance(prefix.get("addr"), str) and isinstance(prefix.get("len"), int):
        return f"{prefix['addr']}/{prefix['len']}"
    return None


def _match_token(match: Any) -> str | None:
    if not isinstance(match, dict) or match.get("op") not in ("==", "in", "!="):
        return None
    left, right = match.get("left"), match.get("right")
    if not isinstance(left, dict):
        return None
    if "meta" in left and left["meta"].get("key") in ("iifname", "oifname") and isinstance(right, str):
        return f"{left['meta']['key']}{'!=' if match['op'] == '!=' else ''} {right}"
    if match["op"] == "!=":  # we negate interface names only
        return None
    if "ct" in left and left["ct"].get("key") == "state":
        return "ct " + ",".join(sorted(str(v) for v in _values(right)))
    payload = left.get("payload") or {}
    proto_match = ("meta" in left and left["meta"].get("key") == "l4proto") or (
        payload.get("protocol") == "ip" and payload.get("field") == "protocol"
    )
    if proto_match:
        return "proto " + str(_PROTO_NUMBERS.get(right, right) if isinstance(right, int) else right)
    if payload.get("protocol") == "ip" and payload.get("field") in ("saddr", "daddr"):
        address = _address(right)
        return None if address is None else f"{'in' if payload['field'] == 'saddr' else 'out'} {address}"
    if payload.get("protocol") in ("tcp", "udp") and payload.get("field") == "dport":
        ports = _ports(right)
        return None if ports is None else f"{payload['protocol']} {ports}"
    return None


def rule_token(rule: Mapping[str, Any]) -> str:
    """A rule of our vocabulary as a short normalized string; anything else as canonical JSON."""
    expr = rule.get("expr")
    unknown = "? " + canonical({"expr": expr, "comment": rule.get("comment")})
    if not isinstance(expr, list) or not expr:
        return unknown
    *matches, verdict = expr
    if not isinstance(verdict, dict) or len(verdict) != 1:
        return unknown
    ((kind, arg),) = verdict.items()
    if kind == "jump" and isinstance(arg, dict):
        kind = f"jump {arg.get('target')}"
    elif kind not in ("accept", "drop", "masquerade") or arg is not None:
        return unknown
    tokens = []
    for m in matches:
        token = _match_token(m.get("match") if isinstance(m, dict) else None)
        if token is None:
            return unknown
        tokens.append(token)
    if tokens == ["ct established,related"] and kind == "accept":
        return "established"
    comment = rule.get("comment") or ""
    return " ".join([kind, *tokens]) + (f" # {comment}" if comment else "")


def expected_rules(model: CompiledRuleset) -> dict[str, tuple[str, ...]]:
    return {c: tuple(rule_token({"expr": e, "comment": k}) for e, k in chain_exprs(model, c)) for c in chains(model)}


def _element(item: Any) -> str:
    return item if isinstance(item, str) else canonical(item)


def parse_listing(doc: Any) -> Snapshot:
    """Normalize the output of `nft -j list table inet starling`."""
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    snap = Snapshot({}, {}, {}, {}, {}, ())
    rules: dict[str, list[str]] = {}
    other: list[str] = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            other.append(canonical(item))
            continue
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        if not isinstance(body, dict):
            other.append(canonical(item))
        elif kind == "table":
            snap.table.update(body)
        elif kind == "chain":
            snap.chains[str(body.get("name"))] = body
        elif kind == "rule":
            rules.setdefault(str(body.get("chain")), []).append(rule_token(body))
        elif kind == "set":
            elem = body.get("elem", [])
            elem = elem if isinstance(elem, list) else [elem]
            snap.sets[str(body.get("name"))] = {k: v for k, v in body.items() if k not in ("elem", "handle")}
            snap.elements[str(body.get("name"))] = frozenset(_element(e) for e in elem)
        else:
            other.append(kind + " " + str(body.get("name", "")))
    snap.rules.update({k: tuple(v) for k, v in rules.items()})
    return Snapshot(snap.table, snap.chains, snap.rules, snap.sets, snap.elements, tuple(sorted(other)))


def _n(count: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{count} {noun if count == 1 else plural}"


def _label(name: str, model: CompiledRuleset) -> str:
    names = model.set_names.get(name, ())
    more = f" +{len(names) - 1} more" if len(names) > 1 else ""
    return f"set {name} ({names[0]}{more})" if names else f"set {name}"


def _ips(ips: frozenset[str]) -> str:
    shown = sorted_ips(ips) if all(ip.count(".") == 3 and "{" not in ip for ip in ips) else sorted(ips)
    more = f" and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else ""
    return ", ".join(shown[:_SHOWN]) + more


def _chain_problems(snap: Snapshot, model: CompiledRuleset) -> list[str]:
    problems = []
    wanted = chains(model)
    for name in sorted(set(wanted) - set(snap.chains)):
        problems.append(f"chain {name} was deleted")
    for name in sorted(set(snap.chains) - set(wanted)):
        problems.append(f"unexpected chain {name} was added")
    for name in wanted:
        attrs = snap.chains.get(name)
        if attrs is None:
            continue
        got = (attrs.get("type"), attrs.get("hook"), attrs.get("prio"), attrs.get("policy"))
        want: tuple[object, ...] = (None, None, None, None)
        if name in BASE_ATTRS:
            want = (*BASE_ATTRS[name], "accept")
        if got != want:
            problems.append(f"chain {name} is now type/hook/priority/policy {got}, expected {want}")
    for name, want_rules in expected_rules(model).items():
        got_rules = snap.rules.get(name, ())
        if name not in snap.chains or got_rules == want_rules:
            continue
        if not got_rules:
            problems.append(f"chain {name} was flushed ({_n(len(want_rules), 'rule')} gone)")
            continue
        added = [r for r in got_rules if r not in want_rules]
        missing = [r for r in want_rules if r not in got_rules]
        detail = f"; first unexpected: {added[0][:120]}" if added else ""
        what = f"{_n(len(added), 'unexpected rule')}, {_n(len(missing), 'missing rule')}"
        problems.append(f"chain {name} rules changed ({what if added or missing else 'reordered'}{detail})")
    return problems


def problems(snap: Snapshot | None, model: CompiledRuleset) -> list[str]:
    """How a listing differs from the installed model, in words (empty: no drift)."""
    if snap is None:
        return [f"table {FAMILY} {TABLE} was deleted"]
    found: list[str] = []
    flags = snap.table.get("flags") or []
    if "dormant" in (flags if isinstance(flags, list) else [flags]):
        found.append(f"table {FAMILY} {TABLE} was made dormant (disabled)")
    found += _chain_problems(snap, model)
    for name in sorted(set(model.sets) - set(snap.sets)):
        found.append(f"{_label(name, model)} was deleted")
    for name in sorted(set(snap.sets) - set(model.sets)):
        found.append(f"unexpected set {name} was added")
    for name in sorted(set(snap.sets) & set(model.sets)):
        attrs = snap.sets[name]
        if attrs.get("type") != "ipv4_addr" or attrs.get("flags") or attrs.get("timeout"):
            found.append(f"{_label(name, model)} definition changed to {canonical(attrs)[:160]}")
        got, want = snap.elements.get(name, frozenset()), model.sets[name]
        added, removed = got - want, want - got
        if added or removed:
            parts = [f"{_n(len(added), 'address')} added ({_ips(added)})"] if added else []
            parts += [f"{_n(len(removed), 'address')} removed ({_ips(removed)})"] if removed else []
            found.append(f"{_label(name, model)}: " + ", ".join(parts))
    if snap.other:
        found.append(f"unexpected objects in the table: {', '.join(snap.other)[:200]}")
    return found
