"""Real agents (wireguard-go) in network namespaces with a real coordinator and signal service.

Topology: a bridge 198.18.N.0/24 in the root namespace (coordinator and signal listen on .1) and
one namespace per agent. Groups alpha, beta, gamma; policies alpha<->beta and beta<->gamma.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.backoff import RECONNECT_CAP
from tests.fixtures.mesh import AgentHandle, Mesh, control_plane, wait_for
from tests.fixtures.netns import netlab

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("mesh")
    with (
        netlab() as lab,
        control_plane(
            workdir,
            lab.gateway,
            groups=("alpha", "beta", "gamma"),
            policies=(("alpha", "beta"), ("beta", "gamma")),
        ) as (coord, signal),
    ):
        m = Mesh(lab, coord, signal, workdir)
        try:
            for name, group in (("a", "alpha"), ("b", "beta"), ("c", "gamma")):
                m.start_agent(name, [group])
            yield m
        finally:
            for agent in m.agents.values():
                print(f"--- agent {agent.host.name} log ---\n{agent.log_tail()}")
                print(agent.host.exec("wg", "show", "all", check=False).stdout)


def policy_id(mesh: Mesh, name: str) -> str:
    with mesh.api() as api:
        return str(api.get("/api/v1/policies", params={"name": name}).json()["items"][0]["id"])


def test_allowed_pairs_ping_and_denied_pairs_do_not(mesh: Mesh) -> None:
    mesh.wait_ping("a", "b", 15, what="a -> b over the mesh")
    mesh.wait_ping("b", "c", 15, what="b -> c over the mesh")
    assert mesh.can_ping("c", "b") and mesh.can_ping("b", "a")
    assert not mesh.can_ping("a", "c", wait=0.5)
    status = mesh.agents["a"].status()
    assert status["management"]["connected"] and status["signal"]["connected"]
    peer = mesh.agents["a"].peer_status("b")
    assert peer["path"] == "direct" and peer["endpoint"].startswith(mesh.agents["b"].host.ip)
    metrics = (
        mesh.agents["a"]
        .host.exec(
            "python3",
            "-c",
            "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())",
            "http://127.0.0.1:9586/metrics",
            check=False,
        )
        .stdout
    )
    assert 'starling_agent_peers{path="direct"} 1.0' in metrics
    assert 'starling_agent_peer_path{path="direct",peer="b"} 1.0' in metrics
    assert "starling_agent_management_connected 1.0" in metrics
    text = mesh.agents["a"].cli("status", "-d").stdout
    assert "b  " + mesh.agents["b"].mesh_ip in text and "path:           direct" in text


def test_unrelated_change_does_not_touch_existing_tunnel(mesh: Mesh) -> None:
    mesh.wait_ping("a", "b", 15, what="a -> b")
    before = mesh.agents["a"].wg_dump()
    with mesh.api() as api:  # concerns gamma only
        api.post("/api/v1/groups", json={"name": "delta"})
        r = api.post(
            "/api/v1/policies",
            json={"name": "gamma-delta", "sources": {"groups": ["gamma"]}, "destinations": {"groups": ["delta"]}},
        )
        assert r.status_code == 201
    time.sleep(1.5)
    after = mesh.agents["a"].wg_dump()
    b_key = mesh.agents["a"].peer_status("b")["public_key"]
    # Same endpoint and same last-handshake time: no reconfiguration, no re-handshake.
    assert before[b_key][2] == after[b_key][2] and before[b_key][4] == after[b_key][4]


def test_removing_a_policy_cuts_the_pair_within_a_second(mesh: Mesh) -> None:
    mesh.wait_ping("b", "c", 15, what="b -> c")
    c_key = mesh.agents["b"].peer_status("c")["public_key"]
    pid = policy_id(mesh, "beta-gamma")
    with mesh.api() as api:
        started = time.monotonic()
        assert api.patch(f"/api/v1/policies/{pid}", json={"enabled": False}).status_code == 200
    gone = wait_for(lambda: c_key not in mesh.agents["b"].wg_dump(), 1.0, interval=0.02, what="tunnel b-c removed")
    assert time.monotonic() - started < 1.5 and gone <= 1.0
    assert not mesh.can_ping("b", "c", wait=0.5)
    with mesh.api() as api:
        api.patch(f"/api/v1/policies/{pid}", json={"enabled": True})
    mesh.wait_ping("b", "c", 15, what="b -> c again")


def test_a_new_peer_becomes_reachable(mesh: Mesh) -> None:
    mesh.start_agent("d", ["alpha"])
    mesh.wait_ping("d", "b", 15, what="d -> b")
    assert mesh.can_ping("b", "d")
    assert not mesh.can_ping("d", "c", wait=0.5)


OUTAGE = 10.0  # s: long enough for every agent's waits to reach the reconnect cap (0.2 s doubling to 4 s)
WAIT_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ [\w.]+: "
    r"(coordinator: next map stream attempt|signal: next connection attempt) in ([\d.]+)s$"
)


def logged_waits(agent: AgentHandle, since: float, until: float) -> dict[str, list[float]]:
    """The reconnect waits an agent logged (debug) between two times: its schedule during an outage."""
    waits: dict[str, list[float]] = {"coordinator": [], "signal": []}
    for line in (agent.workdir / "agent.log").read_text(errors="replace").splitlines():
        m = WAIT_LINE.match(line)
        if m:
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            if since <= at <= until:
                waits[m.group(3).split(":")[0]].append(float(m.group(4)))
    return waits


def test_traffic_survives_coordinator_and_signal_outage_and_updates_resume(mesh: Mesh) -> None:
    """Tunnels carry traffic through a control-plane outage; afterwards every agent's map stream and signal
    connection are back within ~5 s of the services' return (the one reconnect policy: waits capped at
    4 s, docs/agent.md). Prints each agent's reconnection times; asserts on the waits each agent logged
    during the outage (the schedule) and only a generous bound on the times."""
    mesh.wait_ping("a", "b", 15, what="a -> b")
    for name, handle in mesh.agents.items():

        def signal_up(h: AgentHandle = handle) -> bool:
            return bool(h.status().get("signal", {}).get("connected"))

        wait_for(signal_up, 15, what=f"{name} signal connected")
    down = time.time()
    mesh.coordinator.stop()
    # Signal dies without its close frame (1012 would make clients retry on a 1 s cap for 30 s): the
    # agents' plain schedule is what is measured.
    assert mesh.signal.process is not None
    mesh.signal.process.kill()
    mesh.signal.process.wait(10)
    mesh.signal.process = None
    try:
        wait_for(lambda: not mesh.agents["a"].status()["management"]["connected"], 10, what="a sees the outage")
        for _ in range(5):
            assert mesh.can_ping("a", "b"), "traffic stopped while the control plane was down"
        status = mesh.agents["a"].cli("status").stdout
        assert "Management:  DISCONNECTED" in status
        while time.time() - down < OUTAGE:
            assert mesh.can_ping("a", "b"), "traffic stopped while the control plane was down"
            time.sleep(0.5)
    finally:
        mesh.coordinator.start()
        coordinator_back = time.time()  # healthy (start() waited for it)
        mesh.signal.start()
        signal_back = time.time()  # healthy: it has the coordinator's signing key
    back: dict[str, dict[str, float]] = {}
    for name, agent in mesh.agents.items():

        def reconnected(agent: AgentHandle = agent) -> bool:
            st = agent.status()
            return bool(st.get("management", {}).get("connected") and st.get("signal", {}).get("connected"))

        wait_for(reconnected, 20, what=f"{name} reconnects to the coordinator and signal")
        st = agent.status()
        back[name] = {
            "management": max(0.0, st["management"]["since"] - coordinator_back),
            "signal": max(0.0, st["signal"]["since"] - signal_back),
        }
    print(f"outage {signal_back - down:.1f} s; reconnected after the services' return (s):")
    for name, t in back.items():
        print(f"  {name}: map stream {t['management']:.2f}, signal {t['signal']:.2f}")
    print(f"  max over agents: {max(max(t.values()) for t in back.values()):.2f} (goal <= 5 s)")
    for name, agent in mesh.agents.items():
        waits = logged_waits(agent, down, signal_back)
        print(f"  {name} waits during the outage: coordinator {waits['coordinator']}, signal {waits['signal']}")
        assert waits["coordinator"] and waits["signal"], f"{name} logged no reconnect attempts"
        # The schedule itself: no wait over the cap (it was 10 s for signal), whatever the jitter drew.
        assert max(waits["coordinator"] + waits["signal"]) <= RECONNECT_CAP, (name, waits)
    # A generous bound on the times (cap + connection set-up on a loaded machine), not the goal itself.
    assert max(max(t.values()) for t in back.values()) <= RECONNECT_CAP + 2.5, back
    pid = policy_id(mesh, "alpha-beta")
    with mesh.api() as api:
        api.patch(f"/api/v1/policies/{pid}", json={"enabled": False})
    wait_for(lambda: not mesh.agents["a"].peer_status("b"), 5, what="update after restart reaches a")
    with mesh.api() as api:
        api.patch(f"/api/v1/policies/{pid}", json={"enabled": True})
    mesh.wait_ping("a", "b", 15, what="a -> b restored")


def test_refused_credential_makes_the_agent_log_in_again_with_its_key(mesh: Mesh) -> None:
    """A credential the coordinator no longer accepts (here: reset in its database while it was down) makes
    the agent log in again with a sealed request proving its WireGuard key: no setup key, same peer."""
    import json
    import sqlite3

    agent = mesh.agents["a"]
    state_file = agent.workdir / "state" / "state.json"
    before = json.loads(state_file.read_text())["credential"]
    mesh.coordinator.stop()
    db = sqlite3.connect(str(mesh.coordinator.workdir / "state" / "coordinator.db"))
    with db:
        assert db.execute("UPDATE peers SET credential_hash = 'reset' WHERE id = ?", (agent.peer_id,)).rowcount == 1
    db.close()
    mesh.coordinator.start()
    wait_for(lambda: json.loads(state_file.read_text())["credential"] != before, 15, what="a logs in again")
    wait_for(lambda: agent.status()["management"]["connected"], 10, what="a back on the map stream")
    with mesh.api() as api:
        events = api.get("/api/v1/audit", params={"target_id": agent.peer_id, "action": "peer.login"}).json()["items"]
        peer = api.get(f"/api/v1/peers/{agent.peer_id}").json()
    assert events and events[0]["actor"] == "peer:" + peer["name"] and events[0]["after"]["source"]
    assert peer["mesh_ip"] == agent.mesh_ip
    mesh.wait_ping("a", "b", 15, what="a -> b after the new login")
    assert "logged in again with our key" in agent.log_tail(200)


def test_bad_input_leaves_nothing_behind(mesh: Mesh, tmp_path: Path) -> None:
    host = mesh.lab.add_host("x")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nbackend: userspace\n")
    iface = f"{mesh.lab.prefix}x"

    def up(*args: str) -> tuple[int, str]:
        r = host.exec(
            *[
                "python3" if False else __import__("sys").executable,
                "-m",
                "agent.cli",
                "--config",
                str(cfg),
                "up",
                "--foreground",
                "--interface",
                iface,
                *args,
            ],
            check=False,
            timeout=30,
        )
        return r.returncode, r.stderr

    code, err = up("--management-url", mesh.coordinator.url, "--setup-key", "ssk_wrong-key-000")
    assert code == 3 and "setup key is not valid" in err
    code, err = up("--management-url", f"http://{mesh.lab.gateway}:1", "--setup-key", "ssk_x")
    assert code == 4 and "unreachable" in err
    assert not (tmp_path / "state" / "state.json").exists() and not (tmp_path / "state" / "private.key").exists()
    assert iface not in host.exec("ip", "link").stdout
    cfg.write_text("interface: [broken\n")
    code, err = up("--management-url", mesh.coordinator.url, "--setup-key", "ssk_x")
    assert code == 2 and "cannot be read" in err
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "state.json").write_text("{corrupt")
    code, err = up()
    assert code == 2 and "corrupt" in err
    assert iface not in host.exec("ip", "link").stdout


def test_up_again_is_a_noop_and_down_removes_everything(mesh: Mesh) -> None:
    agent = mesh.agents["c"]
    again = agent.cli("up", "--foreground")
    assert again.returncode == 0 and "already up" in again.stdout
    down = agent.cli("down")
    assert down.returncode == 0, down.stderr
    assert agent.interface not in agent.host.exec("ip", "link").stdout
    assert agent.process is not None and agent.process.wait(10) == 0
    status = agent.cli("status")
    assert status.returncode == 5 and "not running" in status.stderr
    wait_for(lambda: not mesh.can_ping("b", "c", wait=0.3), 5, what="c unreachable after down")
