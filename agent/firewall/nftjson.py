"""libnftables JSON commands for a `CompiledRuleset`: a full (re)build, or the diff between two models.

Everything one update needs goes into one `nft -j -f -` batch, which the kernel commits as one
transaction: packets see either the old ruleset or the new one, never a mix, and a batch that
fails changes nothing.

* Full build: `add table; delete table; add table ...` (the usual idiom for an atomic replace
  whether or not the table exists), then the sets with their elements, the regular chains
  `mesh_in`/`mesh_out` (and `mesh_fwd` on a routing peer), and the base chains
  `input`/`output`/`forward` that jump to them (and the nat chain `postrouting` when a forwarded
  route is masqueraded).
* Diff: new sets are added, changed sets get `delete element`/`add element` for exactly the
  addresses that left/joined; chains that appear are added, a chain whose rules changed is
  flushed and refilled (regular chains before base chains, so a jump target exists first), chains
  that disappear are flushed and deleted after that, and sets no rule uses any more last.
  `input`/`output` never change; `forward` changes only when forward rules appear or disappear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.firewall.model import (
    CHAIN_FWD,
    CHAIN_IN,
    CHAIN_NAT,
    CHAIN_OUT,
    FAMILY,
    TABLE,
    CompiledRuleset,
    NatSpec,
    RuleSpec,
)

Command = dict[str, Any]
# base chain -> (type, hook, priority); `postrouting` exists only when a route is masqueraded
BASE_ATTRS: dict[str, tuple[str, str, int]] = {
    "input": ("filter", "input", 0),
    "output": ("filter", "output", 0),
    "forward": ("filter", "forward", 0),
    CHAIN_NAT: ("nat", "postrouting", 100),  # priority srcnat
}
_TABLE = {"family": FAMILY, "name": TABLE}
_IN_TABLE = {"family": FAMILY, "table": TABLE}


@dataclass
class Plan:
    """One transaction: the commands and what they change (for `ApplyResult` and logs)."""

    commands: list[Command] = field(default_factory=list)
    full: bool = False
    sets_added: int = 0
    sets_removed: int = 0
    elements_added: int = 0
    elements_removed: int = 0
    chains_rebuilt: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.commands


def _match(left: Any, right: Any, op: str = "==") -> Command:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Command:
    return {"meta": {"key": key}}


def _ports_value(ports: tuple[tuple[int, int], ...]) -> Any:
    items: list[Any] = [a if a == b else {"range": [a, b]} for a, b in ports]
    return items[0] if len(items) == 1 else {"set": items}


def _ip(field_: str) -> Command:
    return {"payload": {"protocol": "ip", "field": field_}}


def prefix_value(prefix: str) -> Command:
    """An IPv4 CIDR as nft JSON (`ip daddr 0.0.0.0/0` still matches IPv4 packets only)."""
    addr, length = prefix.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def chains(model: CompiledRuleset) -> tuple[str, ...]:
    """Every chain of the model's table, regular chains first."""
    return model.regular_chains() + model.base_chains()


def rule_expr(spec: RuleSpec) -> list[Command]:
    """The expression list of one accept rule (see `RuleSpec.text()` for the same rule as text)."""
    expr = []
    if spec.direction in ("in", "forward"):
        expr.append(_match(_ip("saddr"), "@" + spec.set_name))
    if spec.direction == "out":
        expr.append(_match(_ip("daddr"), "@" + spec.set_name))
    if spec.prefix:
        expr.append(_match(_ip("daddr"), prefix_value(spec.prefix)))
    if spec.protocol in ("tcp", "udp") and spec.ports:
        expr.append(_match({"payload": {"protocol": spec.protocol, "field": "dport"}}, _ports_value(spec.ports)))
    elif spec.protocol != "any":
        expr.append(_match(_meta("l4proto"), spec.protocol))
    expr.append({"accept": None})
    return expr


def chain_exprs(model: CompiledRuleset, chain: str) -> list[tuple[list[Command], str]]:
    """(expression, comment) of every rule of `chain` in order; the guard drops everything."""
    iface = model.interface
    if chain == "input":
        return [([_match(_meta("iifname"), iface), {"jump": {"target": CHAIN_IN}}], "")]
    if chain == "output":
        return [([_match(_meta("oifname"), iface), {"jump": {"target": CHAIN_OUT}}], "")]
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    routed = [_match(_meta("iifname"), iface), _match(_meta("oifname"), iface, "!=")]
    rules: list[tuple[list[Command], str]] = []
    if chain == "forward":
        if model.rules_fwd:  # replies of flows mesh_fwd accepted; new flows in from the LAN are not established
            rules.append(([established, {"accept": None}], ""))
            rules.append(([*routed, {"jump": {"target": CHAIN_FWD}}], ""))
        return rules + [([_match(_meta(k), iface), {"drop": None}], "") for k in ("iifname", "oifname")]
    if chain == CHAIN_NAT:
        return [([*routed, *nat_expr(spec)], spec.comment) for spec in model.nat]
    if not model.guard and chain != CHAIN_FWD:
        rules.append(([established, {"accept": None}], ""))
    if not model.guard:
        rules += [(rule_expr(spec), spec.comment) for spec in model.chain_rules(chain)]
    rules.append(([{"drop": None}], ""))
    return rules


def _chain_inputs(model: CompiledRuleset, chain: str) -> object:
    """What `chain_exprs(model, chain)` is made from, besides the interface: equal inputs, equal
    rules. `diff` compares these rather than rendering each chain of both models."""
    if chain in ("input", "output"):
        return ()
    if chain == "forward":
        return bool(model.rules_fwd)
    if chain == CHAIN_NAT:
        return model.nat
    return (model.guard, model.chain_rules(chain))


def nat_expr(spec: NatSpec) -> list[Command]:
    verdict: Command = {"masquerade": None} if spec.masquerade else {"accept": None}
    return [_match(_ip("daddr"), prefix_value(spec.prefix)), verdict]


def _add_rules(model: CompiledRuleset, chain: str) -> list[Command]:
    out: list[Command] = []
    for expr, comment in chain_exprs(model, chain):
        rule: dict[str, Any] = {**_IN_TABLE, "chain": chain, "expr": expr}
        if comment:
            rule["comment"] = comment
        out.append({"add": {"rule": rule}})
    return out


def _elements(verb: str, name: str, ips: set[str] | frozenset[str]) -> Command:
    return {verb: {"element": {**_IN_TABLE, "name": name, "elem": sorted(ips)}}}


def _add_set(name: str, ips: frozenset[str]) -> list[Command]:
    out: list[Command] = [{"add": {"set": {**_IN_TABLE, "name": name, "type": "ipv4_addr"}}}]
    if ips:
        out.append(_elements("add", name, ips))
    return out


def delete_table() -> list[Command]:
    """Delete our table whether or not it exists (add-then-delete), in one transaction."""
    return [{"add": {"table": dict(_TABLE)}}, {"delete": {"table": dict(_TABLE)}}]


def _add_chain(name: str) -> Command:
    if name not in BASE_ATTRS:
        return {"add": {"chain": {**_IN_TABLE, "name": name}}}
    kind, hook, prio = BASE_ATTRS[name]
    return {"add": {"chain": {**_IN_TABLE, "name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}}


def full_build(model: CompiledRuleset) -> Plan:
    commands = [*delete_table(), {"add": {"table": dict(_TABLE)}}]
    for name in sorted(model.sets):
        commands += _add_set(name, model.sets[name])
    every = chains(model)
    commands += [_add_chain(chain) for chain in every]
    for chain in every:
        commands += _add_rules(model, chain)
    return Plan(
        commands,
        full=True,
        sets_added=len(model.sets),
        elements_added=model.element_count,
        chains_rebuilt=every,
    )


def diff(old: CompiledRuleset | None, new: CompiledRuleset) -> Plan:
    """The commands that turn `old` (installed) into `new`; a full build when there is no usable `old`."""
    if old is None or old.interface != new.interface:
        return full_build(new)
    plan = Plan()
    commands = plan.commands
    for name in sorted(new.sets):
        ips = new.sets[name]
        before = old.sets.get(name)
        if before == ips:
            continue
        if before is None:
            commands += _add_set(name, ips)
            plan.sets_added += 1
            plan.elements_added += len(ips)
            continue
        gone, joined = before - ips, ips - before
        if gone:
            commands.append(_elements("delete", name, gone))
            plan.elements_removed += len(gone)
        if joined:
            commands.append(_elements("add", name, joined))
            plan.elements_added += len(joined)
    rebuilt = []
    old_chains, new_chains = chains(old), chains(new)
    for chain in new_chains:
        if chain not in old_chains:
            commands.append(_add_chain(chain))
        elif _chain_inputs(old, chain) == _chain_inputs(new, chain):
            continue
        else:
            commands.append({"flush": {"chain": {**_IN_TABLE, "name": chain}}})
        commands += _add_rules(new, chain)
        rebuilt.append(chain)
    for chain in old_chains:
        if chain not in new_chains:  # nothing jumps to it any more: `forward` was rebuilt above
            commands.append({"flush": {"chain": {**_IN_TABLE, "name": chain}}})
            commands.append({"delete": {"chain": {**_IN_TABLE, "name": chain}}})
            rebuilt.append(chain)
    plan.chains_rebuilt = tuple(rebuilt)
    for name in sorted(set(old.sets) - set(new.sets)):
        commands.append({"delete": {"set": {**_IN_TABLE, "name": name}}})
        plan.sets_removed += 1
        plan.elements_removed += len(old.sets[name])
    return plan
