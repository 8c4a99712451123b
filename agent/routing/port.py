"""The kernel routing part as the daemon sees it (`RouteTable`), and what it reports.

The methods are blocking (netlink, /proc/sys): the daemon calls them in a worker thread
(`await asyncio.to_thread(routes.apply, plan)`), never inside the event loop. `apply` makes the
kernel match a `RoutingPlan` and says what is installed now; `remove` restores the host as it was
before the first apply; `status` reads the kernel again without changing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypedDict

from agent.routing.plan import RoutingPlan


class PrefixJson(TypedDict):
    prefix: str
    installed: bool
    reason: str


class ExitJson(TypedDict):
    installed: bool
    table: int
    bypass: list[str]
    fwmark: int | None
    reason: str


class RoutingJson(TypedDict):
    interface: str
    prefixes: list[PrefixJson]
    exit: ExitJson | None
    forwarding: bool
    forwarding_changed: bool
    writes: int
    errors: list[str]


@dataclass(frozen=True, slots=True)
class PrefixState:
    """One route prefix: installed through the mesh interface, or not, and why (`reason`)."""

    prefix: str
    installed: bool
    reason: str = ""

    def to_json(self) -> PrefixJson:
        return {"prefix": self.prefix, "installed": self.installed, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ExitState:
    """The exit node's routing: its table and rules are all in place (`installed`), or why not."""

    installed: bool
    table: int
    bypass: tuple[str, ...]
    fwmark: int | None = None
    reason: str = ""

    def to_json(self) -> ExitJson:
        return {
            "installed": self.installed,
            "table": self.table,
            "bypass": list(self.bypass),
            "fwmark": self.fwmark,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class RoutingReport:
    """What the kernel holds now for a plan. `writes`: netlink and sysctl writes this call made
    (0 for a second apply of the same plan, and always 0 for `status`). `forwarding`: IPv4 forwarding
    is on; `forwarding_changed`: the agent turned it on and will restore the previous value.
    `errors`: what could not be changed (an apply with errors also raises `RoutingError`)."""

    interface: str
    prefixes: tuple[PrefixState, ...] = ()
    exit: ExitState | None = None
    forwarding: bool = False
    forwarding_changed: bool = False
    writes: int = 0
    errors: tuple[str, ...] = ()

    @property
    def installed(self) -> tuple[str, ...]:
        return tuple(p.prefix for p in self.prefixes if p.installed)

    @property
    def skipped(self) -> dict[str, str]:
        """Prefixes not installed -> why."""
        return {p.prefix: p.reason for p in self.prefixes if not p.installed}

    def to_json(self) -> RoutingJson:
        return {
            "interface": self.interface,
            "prefixes": [p.to_json() for p in self.prefixes],
            "exit": self.exit.to_json() if self.exit else None,
            "forwarding": self.forwarding,
            "forwarding_changed": self.forwarding_changed,
            "writes": self.writes,
            "errors": list(self.errors),
        }

    def summary(self) -> str:
        """One line for `starling status`, e.g. "2 routes via wt0, 1 skipped; exit node on (3 bypass)"."""
        parts = [f"{len(self.installed)} route(s) via {self.interface}"]
        if self.skipped:
            parts[0] += f", {len(self.skipped)} not installed"
        if self.exit is not None:
            if self.exit.installed:
                parts.append(f"exit node on (table {self.exit.table}, {len(self.exit.bypass)} bypass)")
            else:
                parts.append(f"exit node not installed: {self.exit.reason}")
        if self.forwarding:
            parts.append("IPv4 forwarding on")
        if self.errors:
            parts.append(f"{len(self.errors)} error(s)")
        return "; ".join(parts)


class RoutingError(Exception):
    """A change the kernel refused, naming the route or rule; `report` is what is installed now."""

    def __init__(self, message: str, report: RoutingReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class RouteTable(Protocol):
    def apply(self, plan: RoutingPlan) -> RoutingReport:
        """Make the kernel match `plan` (idempotent: no write when it already does). Raises
        `RoutingError` (with the report of what is installed now) when some change failed."""
        ...

    def remove(self) -> None:
        """Remove every route and rule of the agent and restore the sysctls it changed."""
        ...

    def status(self) -> RoutingReport:
        """The last applied plan checked against the kernel now, without writing anything."""
        ...
