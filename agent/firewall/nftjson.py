"""libnftables JSON commands for a `CompiledRuleset`: a full (re)build, or the diff between two models.

Everything one update needs goes into one `nft -j -f -` batch, which the kernel commits as one
transaction: packets see either the old ruleset or the new one, never a mix, and a batch that
fails changes nothing.

* Full build: `add table; delete table; add table ...` (the usual idiom for an atomic replace
  whether or not the table exists), then the sets with their elements, the regular chains
  `mesh_in`/`mesh_out`, and the base chains `input`/`output`/`forward` that jump to them.
* Diff: new sets are added, changed sets get `delete element`/`add element` for exactly the
  addresses that left/joined, a chain whose rules changed is flushed and refilled, and sets no
  rule uses any more are deleted after that. The base chains never change between models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.firewall.model import CHAIN_IN, CHAIN_OUT, FAMILY, TABLE, CompiledRuleset, RuleSpec

Command = dict[str, Any]
BASE_CHAINS = ("input", "output", "forward")
REGULAR_CHAINS = (CHAIN_IN, CHAIN_OUT)
ALL_CHAINS = REGULAR_CHAINS + BASE_CHAINS
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


def rule_expr(spec: RuleSpec) -> list[Command]:
    """The expression list of one accept rule (see `RuleSpec.text()` for the same rule as text)."""
    addr = "saddr" if spec.direction == "in" else "daddr"
    expr = [_match({"payload": {"protocol": "ip", "field": addr}}, "@" + spec.set_name)]
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
    if chain == "forward":
        return [([_match(_meta(k), iface), {"drop": None}], "") for k in ("iifname", "oifname")]
    rules: list[tuple[list[Command], str]] = []
    if not model.guard:
        established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
        rules.append(([established, {"accept": None}], ""))
        rules += [(rule_expr(spec), spec.comment) for spec in model.chain_rules(chain)]
    rules.append(([{"drop": None}], ""))
    return rules


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


def full_build(model: CompiledRuleset) -> Plan:
    commands = [*delete_table(), {"add": {"table": dict(_TABLE)}}]
    for name in sorted(model.sets):
        commands += _add_set(name, model.sets[name])
    for chain in REGULAR_CHAINS:
        commands.append({"add": {"chain": {**_IN_TABLE, "name": chain}}})
    for hook in BASE_CHAINS:
        base = {**_IN_TABLE, "name": hook, "type": "filter", "hook": hook, "prio": 0, "policy": "accept"}
        commands.append({"add": {"chain": base}})
    for chain in ALL_CHAINS:
        commands += _add_rules(model, chain)
    return Plan(
        commands,
        full=True,
        sets_added=len(model.sets),
        elements_added=model.element_count,
        chains_rebuilt=ALL_CHAINS,
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
    for chain in REGULAR_CHAINS:
        if old.guard != new.guard or old.chain_rules(chain) != new.chain_rules(chain):
            commands.append({"flush": {"chain": {**_IN_TABLE, "name": chain}}})
            commands += _add_rules(new, chain)
            rebuilt.append(chain)
    plan.chains_rebuilt = tuple(rebuilt)
    for name in sorted(set(old.sets) - set(new.sets)):
        commands.append({"delete": {"set": {**_IN_TABLE, "name": name}}})
        plan.sets_removed += 1
        plan.elements_removed += len(old.sets[name])
    return plan
