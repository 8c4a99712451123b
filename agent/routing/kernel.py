"""`KernelRoutes`: the `RouteTable` on Linux, through pyroute2's IPRoute (rtnetlink) and /proc/sys.

What the agent owns, and nothing else is ever changed or removed:

* **Prefix routes**: `<prefix> dev <mesh> scope link proto 83` in the main table. `ROUTE_PROTO` (83,
  0x53, "S") is a protocol number no routing daemon uses (see /etc/iproute2/rt_protos); only routes
  with it are the agent's. A prefix is not installed, and the report says why, when it overlaps a
  network the host is directly on (an address or link-scope route of another interface), when it
  contains an exit bypass address, or when the main table already has a route for exactly that
  prefix that the agent does not own (`ip route replace` would overwrite it). Re-checked on every apply.
* **Exit node**, like wg-quick: table `EXIT_TABLE` (52100) holds `default dev <mesh> proto 83`; rules
  `PRIO_BYPASS` (5210) `to <bypass>/32 lookup main` per bypass address, `PRIO_MAIN` (5220)
  `lookup main suppress_prefixlength 0` (connected networks, the mesh range and the prefix routes still
  win; only main's default route is skipped), `PRIO_EXIT` (5230) `[not fwmark M] lookup 52100`. The
  agent owns priorities 5200-5299 (`PRIORITY_RANGE`) for the tables main and 52100, and marks its rules
  `proto 83` too (kernel >= 4.17). The exit rule has a fwmark condition when the plan names one
  (the daemon passes WireGuard's `FWMARK`, agent/wg/backend.py); the bypass rules for the peers'
  underlay endpoints keep WireGuard's own packets out of the tunnel either way.
  Order: bypass and main rules first, then the table, then the exit rule (removal in reverse), so
  that at no moment does the agent's own traffic go into the tunnel.
* **Forwarding**: a routing peer needs `net.ipv4.ip_forward=1`. Writing it also rewrites every
  interface's `forwarding` and `conf.all.accept_redirects` (kernel `inet_forward_change`), so the
  agent keeps all those values as they were before and restores each of them (also across a restart
  when `state_file` is given). Already on: left alone. rp_filter is not changed: in a strict check the
  source of routed traffic arriving on the mesh interface is a mesh address (routed back through the
  mesh interface), and replies from a route or an exit node arrive on the mesh interface from an
  address whose route is the mesh interface (the prefix route, or table 52100 for the exit node), so
  strict reverse-path filtering passes on both sides (tests/integration/test_routing_kernel.py).

The blocking calls must run in a worker thread (pyroute2's sync IPRoute runs its own event loop).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import netlink
from agent.config import write_private
from agent.routing.plan import (
    ConnectedNet,
    RoutingPlan,
    connected_networks,
    overlap_reason,
    underlay_reason,
)
from agent.routing.port import ExitState, PrefixState, RoutingError, RoutingReport

ROUTE_PROTO = 83  # 0x53 "S": the agent's routes and rules (rtnetlink protocol field)
MAIN_TABLE = 254
EXIT_TABLE = 52100
PRIO_BYPASS = 5210
PRIO_MAIN = 5220
PRIO_EXIT = 5230
PRIORITY_RANGE = range(5200, 5300)
SCOPE_LINK = 253
RTN_UNICAST = 1
FIB_RULE_INVERT = 0x2
DEFAULT = ipaddress.IPv4Network("0.0.0.0/0")
_UNSET = 0xFFFFFFFF  # a rule attribute the kernel reports as "not set" (e.g. suppress_prefixlength)
FORWARD = "net/ipv4/ip_forward"


@dataclass(frozen=True, slots=True)
class KRoute:
    """An IPv4 route as rtnetlink describes it (the fields the agent looks at)."""

    table: int
    dst: ipaddress.IPv4Network
    oif: int | None
    proto: int = ROUTE_PROTO
    scope: int = SCOPE_LINK
    metric: int = 0
    tos: int = 0
    type: int = RTN_UNICAST
    gateway: str | None = None

    @property
    def key(self) -> tuple[int, ipaddress.IPv4Network, int, int]:
        """What `ip route replace` matches on: one route per key."""
        return (self.table, self.dst, self.metric, self.tos)

    def describe(self, names: dict[int, str]) -> str:
        text = "default" if self.dst == DEFAULT else str(self.dst)
        if self.gateway:
            text += f" via {self.gateway}"
        if self.oif is not None:
            text += f" dev {names.get(self.oif, self.oif)}"
        if self.table != MAIN_TABLE:
            text += f" table {self.table}"
        return text + f" proto {self.proto}" + (f" metric {self.metric}" if self.metric else "")


@dataclass(frozen=True, slots=True)
class KRule:
    """An IPv4 policy routing rule (the fields the agent sets)."""

    priority: int
    table: int
    dst: ipaddress.IPv4Network | None = None
    suppress_prefixlength: int | None = None
    fwmark: int | None = None
    invert: bool = False
    protocol: int | None = ROUTE_PROTO

    def describe(self) -> str:
        parts = [f"{self.priority}:", "not" if self.invert else "", f"to {self.dst}" if self.dst else "from all"]
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}")
        parts.append("lookup " + ("main" if self.table == MAIN_TABLE else str(self.table)))
        if self.suppress_prefixlength is not None:
            parts.append(f"suppress_prefixlength {self.suppress_prefixlength}")
        return " ".join(p for p in parts if p)

    @property
    def ours(self) -> bool:
        return (
            self.priority in PRIORITY_RANGE
            and self.table in (MAIN_TABLE, EXIT_TABLE)
            and self.protocol in (ROUTE_PROTO, None)
        )


class Rtnl(Protocol):
    """The rtnetlink operations the agent's routing needs (pyroute2 here, a fake in unit tests)."""

    def links(self) -> dict[int, str]: ...

    def addresses(self) -> list[tuple[int, str, int]]: ...

    def routes(self, table: int) -> list[KRoute]: ...

    def rules(self) -> list[KRule]: ...

    def route_replace(self, route: KRoute) -> None: ...

    def route_delete(self, route: KRoute) -> None: ...

    def rule_add(self, rule: KRule) -> None: ...

    def rule_delete(self, rule: KRule) -> None: ...


class PyrouteRtnl:
    """`Rtnl` over one pyroute2 IPRoute socket (blocking; use in a worker thread)."""

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr

    def links(self) -> dict[int, str]:
        return {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in self.ipr.get_links()}

    def addresses(self) -> list[tuple[int, str, int]]:
        out = []
        for a in self.ipr.get_addr(family=socket.AF_INET):
            address = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
            if address:
                out.append((int(a["index"]), str(address), int(a["prefixlen"])))
        return out

    def routes(self, table: int) -> list[KRoute]:
        out = []
        for r in self.ipr.get_routes(family=socket.AF_INET, table=table):
            if (r.get_attr("RTA_TABLE") or r["table"]) != table:
                continue
            dst = ipaddress.IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")
            oif = r.get_attr("RTA_OIF")
            out.append(
                KRoute(
                    table=table,
                    dst=dst,
                    oif=int(oif) if oif is not None else None,
                    proto=int(r["proto"]),
                    scope=int(r["scope"]),
                    metric=int(r.get_attr("RTA_PRIORITY") or 0),
                    tos=int(r["tos"]),
                    type=int(r["type"]),
                    gateway=r.get_attr("RTA_GATEWAY"),
                )
            )
        return out

    def rules(self) -> list[KRule]:
        out = []
        for r in self.ipr.get_rules(family=socket.AF_INET):
            dst = r.get_attr("FRA_DST")
            suppress = r.get_attr("FRA_SUPPRESS_PREFIXLEN")
            fwmark = r.get_attr("FRA_FWMARK")
            out.append(
                KRule(
                    priority=int(r.get_attr("FRA_PRIORITY") or 0),
                    table=int(r.get_attr("FRA_TABLE") or r["table"]),
                    dst=ipaddress.IPv4Network(f"{dst}/{r['dst_len']}") if dst else None,
                    suppress_prefixlength=None if suppress in (None, _UNSET) else int(suppress),
                    fwmark=None if fwmark is None else int(fwmark),
                    invert=bool(r["flags"] & FIB_RULE_INVERT),
                    protocol=r.get_attr("FRA_PROTOCOL"),
                )
            )
        return out

    @staticmethod
    def _route_args(route: KRoute) -> dict[str, object]:
        args: dict[str, object] = {
            "family": socket.AF_INET,
            "table": route.table,
            "dst": str(route.dst.network_address),
            "dst_len": route.dst.prefixlen,
            "proto": route.proto,
            "tos": route.tos,
        }
        if route.oif is not None:
            args["oif"] = route.oif
        if route.metric:
            args["priority"] = route.metric
        return args

    def route_replace(self, route: KRoute) -> None:
        self.ipr.route("replace", scope=route.scope, type=route.type, **self._route_args(route))

    def route_delete(self, route: KRoute) -> None:
        self.ipr.route("del", scope=route.scope, type=route.type, **self._route_args(route))

    @staticmethod
    def _rule_args(rule: KRule) -> dict[str, object]:
        args: dict[str, object] = {"family": socket.AF_INET, "priority": rule.priority, "table": rule.table}
        if rule.protocol is not None:
            args["protocol"] = rule.protocol
        if rule.dst is not None:
            args["dst"] = str(rule.dst.network_address)
            args["dst_len"] = rule.dst.prefixlen
        if rule.suppress_prefixlength is not None:
            args["suppress_prefixlen"] = rule.suppress_prefixlength
        if rule.fwmark is not None:
            args["fwmark"] = rule.fwmark
        if rule.invert:
            args["flags"] = FIB_RULE_INVERT
        return args

    def rule_add(self, rule: KRule) -> None:
        self.ipr.rule("add", **self._rule_args(rule))

    def rule_delete(self, rule: KRule) -> None:
        self.ipr.rule("del", **self._rule_args(rule))


@contextlib.contextmanager
def pyroute_rtnl() -> Iterator[Rtnl]:
    with netlink.iproute() as ipr:
        yield PyrouteRtnl(ipr)


class Sysctl:
    """Reads and writes /proc/sys (of the calling process's network namespace) under `root`."""

    def __init__(self, root: Path = Path("/proc/sys")) -> None:
        self.root = root

    def read(self, key: str) -> str | None:
        try:
            return (self.root / key).read_text().strip()
        except OSError:
            return None

    def write(self, key: str, value: str) -> None:
        (self.root / key).write_text(value + "\n")

    def forwarding_keys(self) -> list[str]:
        """Every value that writing ip_forward rewrites: each interface's (and default's) forwarding
        and all.accept_redirects."""
        conf = self.root / "net/ipv4/conf"
        names = sorted(n for n in os.listdir(conf) if n != "all") if conf.is_dir() else []
        return ["net/ipv4/conf/all/accept_redirects", *(f"net/ipv4/conf/{n}/forwarding" for n in names)]


def _why(exc: BaseException) -> str:
    args: tuple[object, ...] = exc.args
    if len(args) == 2 and isinstance(args[0], int):  # pyroute2 NetlinkError(code, message)
        code, message = args
        return f"{message} (errno {code})"
    return str(exc) or type(exc).__name__


class _Session:
    """One apply or remove: counts writes, collects errors (each naming its route or rule)."""

    def __init__(self, nl: Rtnl) -> None:
        self.nl = nl
        self.writes = 0
        self.errors: list[str] = []
        self.names = nl.links()

    def write(self, what: str, fn: Callable[[], None]) -> bool:
        self.writes += 1
        try:
            fn()
        except Exception as exc:  # netlink, OSError: each becomes one line of the RoutingError
            self.errors.append(f"{what}: {_why(exc)}")
            return False
        return True

    def add_rule(self, rule: KRule) -> bool:
        return self.write(f"cannot add rule '{rule.describe()}'", lambda: self.nl.rule_add(rule))

    def delete_rule(self, rule: KRule) -> bool:
        return self.write(f"cannot delete rule '{rule.describe()}'", lambda: self.nl.rule_delete(rule))

    def replace_route(self, route: KRoute) -> bool:
        what = f"cannot install route '{route.describe(self.names)}'"
        return self.write(what, lambda: self.nl.route_replace(route))

    def delete_route(self, route: KRoute) -> bool:
        what = f"cannot delete route '{route.describe(self.names)}'"
        return self.write(what, lambda: self.nl.route_delete(route))


class KernelRoutes:
    """The `RouteTable` for Linux. `interface`: the mesh interface, what `status()` names before the
    first apply (each plan names its interface; the agent's routes are found by their protocol, so a
    plan for another interface moves them). `rtnl`: opens the netlink connection (one per call);
    `state_file`: where the sysctl values to restore are kept, so that a restarted agent still
    restores them (None: kept in memory only)."""

    def __init__(
        self,
        interface: str = "",
        *,
        rtnl: Callable[[], AbstractContextManager[Rtnl]] = pyroute_rtnl,
        sysctl: Sysctl | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.interface = interface
        self._rtnl = rtnl
        self.sysctl = sysctl or Sysctl()
        self.state_file = state_file
        self._plan: RoutingPlan | None = None
        self._skipped: dict[str, str] = {}
        self._saved: dict[str, str] = self._load_saved()

    # -- public API (RouteTable) ------------------------------------------------------------------

    def apply(self, plan: RoutingPlan) -> RoutingReport:
        with self._kernel() as nl:
            s = _Session(nl)
            oif = next((i for i, n in s.names.items() if n == plan.interface), None)
            if oif is None:
                raise RoutingError(
                    f"interface {plan.interface} does not exist: no route changed",
                    RoutingReport(plan.interface, errors=(f"interface {plan.interface} does not exist",)),
                )
            self._plan, self.interface = plan, plan.interface
            prefixes = self._sync_prefixes(s, plan, oif)
            exit_state = self._sync_exit(s, plan, oif)
        forwarding, changed = self._sync_forwarding(s, plan.forwarding)
        self._skipped = {p.prefix: p.reason for p in prefixes if not p.installed}
        report = RoutingReport(plan.interface, prefixes, exit_state, forwarding, changed, s.writes, tuple(s.errors))
        if s.errors:
            raise RoutingError("routing: " + "; ".join(s.errors), report)
        return report

    def remove(self) -> None:
        with self._kernel() as nl:
            s = _Session(nl)
            self._drop_exit(s, [r for r in nl.rules() if r.ours], nl.routes(EXIT_TABLE))
            for route in nl.routes(MAIN_TABLE):
                if route.proto == ROUTE_PROTO:
                    s.delete_route(route)
        self._restore_forwarding(s)
        self._plan = None
        self._skipped = {}
        if s.errors:
            raise RoutingError("routing: " + "; ".join(s.errors))

    def status(self) -> RoutingReport:
        plan = self._plan
        forwarding = self.sysctl.read(FORWARD) == "1"
        if plan is None:
            return RoutingReport(self.interface, forwarding=forwarding, forwarding_changed=bool(self._saved))
        with self._kernel() as nl:
            names = nl.links()
            oif = next((i for i, n in names.items() if n == plan.interface), None)
            ours = {r.dst: r for r in nl.routes(MAIN_TABLE) if r.proto == ROUTE_PROTO and r.oif == oif}
            prefixes = []
            for prefix in plan.prefixes:
                net = ipaddress.IPv4Network(prefix)
                if prefix in self._skipped:
                    prefixes.append(PrefixState(prefix, False, self._skipped[prefix]))
                elif oif is not None and net in ours:
                    prefixes.append(PrefixState(prefix, True))
                else:
                    reason = "missing from the kernel (removed from outside?): the next apply restores it"
                    prefixes.append(PrefixState(prefix, False, reason))
            exit_state = None
            if plan.exit is not None:
                have_rules = {r for r in nl.rules() if r.ours}
                have_table = set(nl.routes(EXIT_TABLE))
                complete = oif is not None and set(self._exit_rules(plan)) <= have_rules
                complete = complete and self._exit_route(oif or 0) in have_table
                why = (
                    ""
                    if complete
                    else "rules or table incomplete (changed from outside?): the next apply restores them"
                )
                exit_state = ExitState(complete, EXIT_TABLE, plan.exit.bypass, plan.exit.fwmark, why)
        return RoutingReport(plan.interface, tuple(prefixes), exit_state, forwarding, bool(self._saved))

    @contextlib.contextmanager
    def _kernel(self) -> Iterator[Rtnl]:
        """The netlink connection; a failure to open it or to read from it is a RoutingError (writes
        are collected one by one by `_Session`)."""
        try:
            with self._rtnl() as nl:
                yield nl
        except RoutingError:
            raise
        except Exception as exc:  # pyroute2 NetlinkError, OSError: the kernel's state cannot be read
            raise RoutingError(f"routing: cannot read the kernel's routes and rules: {_why(exc)}") from exc

    # -- prefix routes ----------------------------------------------------------------------------

    def _sync_prefixes(self, s: _Session, plan: RoutingPlan, oif: int) -> tuple[PrefixState, ...]:
        main = s.nl.routes(MAIN_TABLE)
        connected = self._connected(s, main, plan.interface)
        bypass = plan.exit.bypass if plan.exit else ()
        foreign = {r.dst: r for r in main if r.proto != ROUTE_PROTO and r.metric == 0 and r.tos == 0}
        states: dict[str, PrefixState] = {}
        wanted: dict[tuple[int, ipaddress.IPv4Network, int, int], KRoute] = {}
        for net in plan.networks:
            reason = overlap_reason(net, connected) or underlay_reason(net, bypass)
            if reason is None and net in foreign:
                other = foreign[net].describe(s.names)
                reason = f"{net}: the host already has a route for it ({other}) that the agent does not own"
            if reason:
                states[str(net)] = PrefixState(str(net), False, reason)
            else:
                route = KRoute(MAIN_TABLE, net, oif)
                wanted[route.key] = route
        have: dict[tuple[int, ipaddress.IPv4Network, int, int], KRoute] = {}
        for route in (r for r in main if r.proto == ROUTE_PROTO):
            if route.key in wanted and route.key not in have:
                have[route.key] = route  # kept (`replace` below fixes it if it differs)
            else:  # stale first: a route that now overlaps a LAN goes before anything is added
                s.delete_route(route)
        for key, route in wanted.items():
            ok = have.get(key) == route or s.replace_route(route)
            reason = "" if ok else f"cannot install: {s.errors[-1]}"
            states[str(route.dst)] = PrefixState(str(route.dst), ok, reason)
        return tuple(states[p] for p in plan.prefixes)

    @staticmethod
    def _connected(s: _Session, main: list[KRoute], mesh: str) -> list[ConnectedNet]:
        addresses = [(s.names.get(i, str(i)), a, plen) for i, a, plen in s.nl.addresses()]
        link_routes = [
            (s.names.get(r.oif, str(r.oif)), str(r.dst.network_address), r.dst.prefixlen)
            for r in main
            if r.scope == SCOPE_LINK and r.type == RTN_UNICAST and r.oif is not None and r.proto != ROUTE_PROTO
        ]
        return connected_networks(addresses, link_routes, mesh)

    # -- exit node --------------------------------------------------------------------------------

    @staticmethod
    def _exit_rules(plan: RoutingPlan) -> list[KRule]:
        assert plan.exit is not None
        rules = [KRule(PRIO_BYPASS, MAIN_TABLE, ipaddress.IPv4Network(f"{a}/32")) for a in plan.exit.bypass]
        rules.append(KRule(PRIO_MAIN, MAIN_TABLE, suppress_prefixlength=0))
        mark = plan.exit.fwmark
        rules.append(KRule(PRIO_EXIT, EXIT_TABLE, fwmark=mark, invert=mark is not None))
        return rules

    @staticmethod
    def _exit_route(oif: int) -> KRoute:
        return KRoute(EXIT_TABLE, DEFAULT, oif)

    def _sync_exit(self, s: _Session, plan: RoutingPlan, oif: int) -> ExitState | None:
        have_rules = [r for r in s.nl.rules() if r.ours]
        table = [r for r in s.nl.routes(EXIT_TABLE) if r.proto == ROUTE_PROTO]
        if plan.exit is None:
            self._drop_exit(s, have_rules, table)
            return None
        errors_before = len(s.errors)
        want = self._exit_rules(plan)
        *outside, exit_rule = want
        ok = all(rule in have_rules or s.add_rule(rule) for rule in outside)
        route = self._exit_route(oif)
        for stale in table:
            if stale.key != route.key:  # same key: `replace` updates it without a gap
                ok = s.delete_route(stale) and ok
        ok = ok and (route in table or s.replace_route(route))
        ok = ok and (exit_rule in have_rules or s.add_rule(exit_rule))
        for rule in sorted((r for r in have_rules if r not in want), key=lambda r: -r.priority):
            ok = s.delete_rule(rule) and ok
        reason = "" if ok else "; ".join(s.errors[errors_before:]) or "incomplete"
        return ExitState(ok, EXIT_TABLE, plan.exit.bypass, plan.exit.fwmark, reason)

    @staticmethod
    def _drop_exit(s: _Session, rules: list[KRule], table: list[KRoute]) -> None:
        """Exit rule first, then the table, then the main and bypass rules: never a moment where the
        agent's own traffic (to a bypass address) would follow the table."""
        by_priority = sorted(rules, key=lambda r: -r.priority)
        for rule in (r for r in by_priority if r.table == EXIT_TABLE):
            s.delete_rule(rule)
        for route in table:
            if route.proto == ROUTE_PROTO:
                s.delete_route(route)
        for rule in (r for r in by_priority if r.table != EXIT_TABLE):
            s.delete_rule(rule)

    # -- forwarding -------------------------------------------------------------------------------

    def _sync_forwarding(self, s: _Session, want: bool) -> tuple[bool, bool]:
        """(forwarding on, changed by the agent)."""
        if not want:
            self._restore_forwarding(s)
            return self.sysctl.read(FORWARD) == "1", False
        if self.sysctl.read(FORWARD) != "1":
            if not self._saved:
                saved = {FORWARD: self.sysctl.read(FORWARD) or "0"}
                for key in self.sysctl.forwarding_keys():
                    value = self.sysctl.read(key)
                    if value is not None:
                        saved[key] = value
                self._saved = saved
                self._store_saved()
            self._write_sysctl(s, FORWARD, "1", "set")
        return self.sysctl.read(FORWARD) == "1", bool(self._saved)

    def _restore_forwarding(self, s: _Session) -> None:
        if not self._saved:
            return
        saved, failed = self._saved, False
        for key in (FORWARD, *sorted(k for k in saved if k != FORWARD)):
            current = self.sysctl.read(key)
            if current is None or current == saved[key]:
                continue  # an interface that is gone, or a value that is already right
            failed |= not self._write_sysctl(s, key, saved[key], "restore")
        if not failed:
            self._saved = {}
            self._store_saved()

    def _write_sysctl(self, s: _Session, key: str, value: str, verb: str) -> bool:
        return s.write(f"cannot {verb} {key.replace('/', '.')}={value}", lambda: self.sysctl.write(key, value))

    def _load_saved(self) -> dict[str, str]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as exc:
            raise RoutingError(f"{self.state_file}: unreadable routing state ({exc})") from None
        saved = data.get("sysctl") if isinstance(data, dict) else None
        if not isinstance(saved, dict) or not all(isinstance(v, str) for v in saved.values()):
            raise RoutingError(f"{self.state_file}: not a routing state file")
        return {str(k): v for k, v in saved.items()}

    def _store_saved(self) -> None:
        if self.state_file is None:
            return
        if not self._saved:
            self.state_file.unlink(missing_ok=True)
            return
        write_private(self.state_file, json.dumps({"sysctl": self._saved}, indent=1, sort_keys=True))
