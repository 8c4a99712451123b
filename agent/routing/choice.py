"""Which routing peer carries each route, decided from what the tunnels show (`RouteChoice`).

Pure logic over observations, with the time passed in: the daemon feeds it WireGuard's receive
counters and link states each watchdog pass and asks for a `RoutingDecision`.

* A routing peer is **up** when its tunnel is live (a fresh handshake) and something arrived from it
  within `ROUTER_SILENCE`. Routing peers send a keepalive every `ROUTE_KEEPALIVE` seconds to the peers
  their routes serve (the daemon configures that on the router side), so silence means it is gone.
* Per route, the active router is the up router with the lowest metric (ties: the smaller peer id).
  When the active one goes down, the best other up router takes over at once (failover). When a
  better router comes back, traffic moves back only after it has been up for `FAILBACK_HOLD` seconds
  (hysteresis: a flapping router does not drag traffic back and forth). With no router up, the
  current choice stays (or the best by metric is chosen), so that traffic starts the handshake.
* Exit routes (`0.0.0.0/0`) are never chosen automatically: only the exit node this peer opted into
  (`exit_node`, a peer id) is used, and only if one of the map's exit routes lists it as a router.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from starling_proto.routes import EXIT_PREFIX, RouteEntry

ROUTE_KEEPALIVE = 1  # s: a routing peer's keepalive interval towards the peers its routes serve
ROUTER_SILENCE = 3.0  # s without anything from a routing peer: it is down
FAILBACK_HOLD = 10.0  # s a better routing peer must be up before traffic moves back to it
EXIT = str(EXIT_PREFIX)


@dataclass(slots=True)
class RouterHealth:
    rx: int = -1  # WireGuard's rx bytes at the last observation (-1: none yet)
    heard_at: float = -1e9  # monotonic time something last arrived
    up_since: float = 0.0  # monotonic time it came up (0: down)


@dataclass(frozen=True, slots=True)
class RouteState:
    """One route as this peer uses it: the active router (None: none), why, and the candidates."""

    route_id: str
    name: str
    prefix: str
    active: str | None
    reason: str
    routers: tuple[tuple[str, int, bool], ...]  # (peer id, metric, up)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    routes: tuple[RouteState, ...] = ()
    allowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # peer id -> routed prefixes
    exit_node: str | None = None  # the peer id traffic leaves the mesh through (None: no exit node)
    exit_reason: str = ""

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Route prefixes that go through the mesh interface (the exit route is separate)."""
        return tuple(sorted({s.prefix for s in self.routes if s.active and s.prefix != EXIT}))


class RouteChoice:
    """Router health and the active router per route (state survives between decisions)."""

    def __init__(self) -> None:
        self.health: dict[str, RouterHealth] = {}
        self.active: dict[str, str] = {}  # route id -> peer id
        self.why: dict[str, str] = {}  # route id -> why the active router was chosen (kept while it stays)
        self.changes = 0  # how many times an active router changed (metrics, tests)

    def observe(self, peer_id: str, rx_bytes: int, live: bool, mono: float) -> None:
        """One reading of a peer's tunnel: `live` = fresh handshake, `rx_bytes` = WireGuard's counter."""
        h = self.health.setdefault(peer_id, RouterHealth())
        if live and (h.rx < 0 or rx_bytes > h.rx):
            h.heard_at = mono
        if not live:
            h.heard_at = -1e9
        h.rx = rx_bytes
        up = live and mono - h.heard_at <= ROUTER_SILENCE
        if up and not h.up_since:
            h.up_since = mono
        elif not up:
            h.up_since = 0.0

    def is_up(self, peer_id: str) -> bool:
        h = self.health.get(peer_id)
        return h is not None and h.up_since > 0

    def forget(self, peer_ids: Iterable[str]) -> None:
        for pid in peer_ids:
            self.health.pop(pid, None)

    def decide(
        self, routes: Iterable[RouteEntry], present: set[str], exit_node: str | None, mono: float
    ) -> RoutingDecision:
        """The active router of every route; `present` = peer ids we have a link to; `exit_node` = the
        exit node this peer opted into (a peer id, None: none)."""
        states: list[RouteState] = []
        allowed: dict[str, list[str]] = {}
        exits: list[RouteEntry] = []
        seen: set[str] = set()
        for route in sorted(routes, key=lambda r: r.id):
            seen.add(route.id)
            if route.exit_node:
                exits.append(route)
                continue
            state = self._one(route, present, mono)
            states.append(state)
            if state.active is not None:
                allowed.setdefault(state.active, []).append(route.prefix)
        for gone in set(self.active) - seen:
            del self.active[gone]
            self.why.pop(gone, None)
        exit_peer, exit_reason = self._exit(exits, present, exit_node)
        for route in exits:
            active = exit_peer if any(r.peer_id == exit_peer for r in route.routers) else None
            reason = exit_reason if active else "exit route: used only when this peer chooses one of its routers"
            states.append(self._state(route, active, reason, present))
        if exit_peer is not None:
            allowed.setdefault(exit_peer, []).append(EXIT)
        return RoutingDecision(
            tuple(states), {pid: tuple(sorted(set(p))) for pid, p in allowed.items()}, exit_peer, exit_reason
        )

    def _state(self, route: RouteEntry, active: str | None, reason: str, present: set[str]) -> RouteState:
        routers = tuple((r.peer_id, r.metric, self.is_up(r.peer_id)) for r in route.routers if r.peer_id in present)
        return RouteState(route.id, route.name, route.prefix, active, reason, routers)

    def _one(self, route: RouteEntry, present: set[str], mono: float) -> RouteState:
        candidates = sorted((r.metric, r.peer_id) for r in route.routers if r.peer_id in present)
        if not candidates:
            self.active.pop(route.id, None)
            self.why.pop(route.id, None)
            return self._state(route, None, "none of its routing peers is in this peer's map", present)
        metric_of = {pid: metric for metric, pid in candidates}
        up = [(metric, pid) for metric, pid in candidates if self.is_up(pid)]
        current = self.active.get(route.id)
        if current is not None and current not in metric_of:
            current = None
        if current is not None and self.is_up(current):
            ready = [
                (m, p) for m, p in up if m < metric_of[current] and mono - self.health[p].up_since >= FAILBACK_HOLD
            ]
            chosen, reason = (min(ready)[1], "a better routing peer is back") if ready else (current, "up")
        elif up:
            chosen = min(up)[1]
            reason = "up" if current is None else f"failover: {current} is down"
        elif current is not None:
            chosen, reason = current, "no routing peer is up yet; keeping the current one"
        else:
            chosen, reason = candidates[0][1], "no routing peer is up yet; trying the best by metric"
        if chosen != self.active.get(route.id):
            if route.id in self.active:
                self.changes += 1
            self.active[route.id] = chosen
            self.why[route.id] = reason
        elif reason == "up" and self.why.get(route.id, "").startswith(("failover", "a better")):
            reason = self.why[route.id]  # why this router carries the route, while it stays up
        else:
            self.why[route.id] = reason
        return self._state(route, chosen, reason, present)

    @staticmethod
    def _exit(exits: list[RouteEntry], present: set[str], exit_node: str | None) -> tuple[str | None, str]:
        if not exit_node:
            return None, "no exit node chosen"
        if not any(r.peer_id == exit_node for route in exits for r in route.routers):
            return (
                None,
                f"exit node {exit_node} is not offered to this peer (no policy allows an exit route through it)",
            )
        if exit_node not in present:
            return None, f"exit node {exit_node} is not in this peer's map"
        return exit_node, "chosen by this peer"
