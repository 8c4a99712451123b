"""The routing-peer choice (agent.routing.choice): metric order, failover when a router falls silent,
hysteresis on fail-back, and exit nodes used only when chosen."""

from __future__ import annotations

from agent.routing.choice import FAILBACK_HOLD, ROUTER_SILENCE, RouteChoice
from starling_proto.routes import RouteEntry, RouterRef

LAN = RouteEntry("r1", "clinic", "198.18.40.0/24", (RouterRef("gw1", 10), RouterRef("gw2", 20)))
EXIT = RouteEntry("r9", "exit", "0.0.0.0/0", (RouterRef("gw1", 10), RouterRef("gw3", 10)))


class Routers:
    """Feeds RouteChoice like the watchdog does: every 0.5 s, rx grows for routers that are alive."""

    def __init__(self, choice: RouteChoice, *names: str) -> None:
        self.choice, self.rx = choice, dict.fromkeys(names, 0)
        self.alive = dict.fromkeys(names, True)
        self.now = 1000.0

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.5)):
            self.now += 0.5
            for name in self.rx:
                if self.alive[name]:
                    self.rx[name] += 32
                self.choice.observe(name, self.rx[name], True, self.now)


def test_best_metric_wins_and_failover_is_immediate_after_silence() -> None:
    choice = RouteChoice()
    routers = Routers(choice, "gw1", "gw2")
    routers.run(2)
    decision = choice.decide([LAN], {"gw1", "gw2"}, None, routers.now)
    assert decision.routes[0].active == "gw1" and decision.allowed == {"gw1": ("198.18.40.0/24",)}
    assert decision.prefixes == ("198.18.40.0/24",)
    routers.alive["gw1"] = False
    silent_for = 0.0
    while choice.decide([LAN], {"gw1", "gw2"}, None, routers.now).routes[0].active == "gw1":
        routers.run(0.5)
        silent_for += 0.5
        assert silent_for < 10, "never failed over"
    assert ROUTER_SILENCE <= silent_for <= ROUTER_SILENCE + 1.0
    state = choice.decide([LAN], {"gw1", "gw2"}, None, routers.now).routes[0]
    assert state.active == "gw2" and "failover" in state.reason and choice.changes == 1


def test_failback_waits_for_the_hold_time() -> None:
    choice = RouteChoice()
    routers = Routers(choice, "gw1", "gw2")
    routers.alive["gw1"] = False
    routers.run(5)
    assert choice.decide([LAN], {"gw1", "gw2"}, None, routers.now).routes[0].active == "gw2"
    routers.alive["gw1"] = True
    routers.run(FAILBACK_HOLD - 1.5)
    assert choice.decide([LAN], {"gw1", "gw2"}, None, routers.now).routes[0].active == "gw2"  # still holding
    routers.run(2.0)
    state = choice.decide([LAN], {"gw1", "gw2"}, None, routers.now).routes[0]
    assert state.active == "gw1" and state.reason == "a better routing peer is back"


def test_no_router_up_picks_the_best_by_metric_so_traffic_can_start() -> None:
    choice = RouteChoice()
    state = choice.decide([LAN], {"gw1", "gw2"}, None, 5.0).routes[0]
    assert state.active == "gw1" and "no routing peer is up" in state.reason
    choice.observe("gw1", 100, True, 6.0)  # it comes up: the reason says so (not the start-up one)
    assert choice.decide([LAN], {"gw1", "gw2"}, None, 6.0).routes[0].reason == "up"
    assert choice.decide([LAN], set(), None, 5.0).routes[0].active is None


def test_exit_routes_are_used_only_when_chosen() -> None:
    choice = RouteChoice()
    nobody = choice.decide([LAN, EXIT], {"gw1", "gw2", "gw3"}, None, 5.0)
    assert nobody.exit_node is None and "0.0.0.0/0" not in sum(nobody.allowed.values(), ())
    chosen = choice.decide([LAN, EXIT], {"gw1", "gw2", "gw3"}, "gw3", 5.0)
    assert chosen.exit_node == "gw3" and chosen.allowed["gw3"] == ("0.0.0.0/0",)
    assert chosen.prefixes == ("198.18.40.0/24",)  # the exit route is not a plain prefix route
    stranger = choice.decide([LAN, EXIT], {"gw1", "gw2", "gw3"}, "gw2", 5.0)
    assert stranger.exit_node is None and "not offered" in stranger.exit_reason


def test_a_route_that_left_the_map_is_forgotten() -> None:
    choice = RouteChoice()
    choice.decide([LAN], {"gw1"}, None, 1.0)
    assert choice.active == {"r1": "gw1"}
    assert choice.decide([], {"gw1"}, None, 2.0).routes == () and choice.active == {}
