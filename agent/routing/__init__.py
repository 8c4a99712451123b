"""Kernel routing for the mesh (issue 16): route prefixes through the mesh interface, an exit node in a
table of its own with rules that keep the agent's underlay traffic out of the tunnel, and IPv4
forwarding for a routing peer. The daemon decides the plan (`RoutingPlan`); a `RouteTable` (on Linux
`KernelRoutes`, pyroute2) makes the kernel match it and restores the host on `remove()`.
"""

from agent.routing.kernel import (
    EXIT_TABLE,
    PRIO_BYPASS,
    PRIO_EXIT,
    PRIO_MAIN,
    PRIORITY_RANGE,
    ROUTE_PROTO,
    KernelRoutes,
)
from agent.routing.plan import ConnectedNet, ExitPlan, RoutingPlan, connected_networks, overlap_reason
from agent.routing.port import ExitState, PrefixState, RouteTable, RoutingError, RoutingReport

__all__ = [
    "EXIT_TABLE",
    "PRIORITY_RANGE",
    "PRIO_BYPASS",
    "PRIO_EXIT",
    "PRIO_MAIN",
    "ROUTE_PROTO",
    "ConnectedNet",
    "ExitPlan",
    "ExitState",
    "KernelRoutes",
    "PrefixState",
    "RouteTable",
    "RoutingError",
    "RoutingPlan",
    "RoutingReport",
    "connected_networks",
    "overlap_reason",
]
