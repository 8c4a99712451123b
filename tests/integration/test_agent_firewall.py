"""Zero trust on every peer: real agents enforce their maps' rules with nftables (issue 5).

Groups dev, db, ci; policy dev -> db tcp/5432 and a bidirectional dev <-> ci (any). Servers in the
db namespace listen on tcp/5432, tcp/22 and udp/5432.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.mesh import AgentHandle, Mesh, control_plane, wait_for
from tests.fixtures.netns import netlab

pytestmark = pytest.mark.slow

SERVER = r"""
import socket, threading
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(b"hi"); c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, addr = s.recvfrom(100); s.sendto(data, addr)
for p in (5432, 5433, 22):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
udp(5432)
"""

TCP_PROBE = (
    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.7); print(s.recv(2))"
)
UDP_PROBE = (
    "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.7); "
    "s.sendto(b'x', (sys.argv[1], int(sys.argv[2]))); print(s.recvfrom(10))"
)


def tcp_ok(src: AgentHandle, dst: AgentHandle, port: int) -> bool:
    return src.host.exec(sys.executable, "-c", TCP_PROBE, dst.mesh_ip, str(port), check=False).returncode == 0


def udp_ok(src: AgentHandle, dst: AgentHandle, port: int) -> bool:
    return src.host.exec(sys.executable, "-c", UDP_PROBE, dst.mesh_ip, str(port), check=False).returncode == 0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("fwmesh")
    policies = (
        {
            "name": "dev-db",
            "protocol": "tcp",
            "ports": [5432],
            "sources": {"groups": ["dev"]},
            "destinations": {"groups": ["db"]},
        },
        {"name": "dev-ci", "bidirectional": True, "sources": {"groups": ["dev"]}, "destinations": {"groups": ["ci"]}},
    )
    with (
        netlab() as lab,
        control_plane(workdir, lab.gateway, groups=("dev", "db", "ci"), policies=policies) as (coord, signal),
    ):
        m = None
        try:
            m = Mesh(lab, coord, signal, workdir)
            for name in ("dev", "db", "ci"):
                m.start_agent(name, [name])
            db = m.agents["db"]
            db.host.exec("nft", "add", "table", "inet", "docker_like")
            db.host.exec(
                "nft",
                "add",
                "chain",
                "inet",
                "docker_like",
                "docker_user",
                "{ type filter hook forward priority 0; policy accept; }",
            )
            db.host.exec(
                "nft",
                "add",
                "rule",
                "inet",
                "docker_like",
                "docker_user",
                "ip",
                "saddr",
                "198.18.0.0/15",
                "counter",
                "accept",
            )
            db.host.popen([sys.executable, "-c", SERVER], workdir / "servers.log")
            wait_for(lambda: m.agents["dev"].peer_status("db").get("path") == "direct", 20, what="dev-db tunnel")
            wait_for(lambda: tcp_ok(m.agents["dev"], db, 5432), 10, what="dev -> db:5432")
            yield m
        finally:
            for agent in m.agents.values() if m else []:
                print(f"--- {agent.host.name} ---\n{agent.log_tail(30)}")


def unrelated_table(mesh: Mesh) -> str:
    return mesh.agents["db"].host.exec("nft", "list", "table", "inet", "docker_like").stdout


def test_only_what_the_policy_allows_passes(mesh: Mesh) -> None:
    dev, db, ci = (mesh.agents[n] for n in ("dev", "db", "ci"))
    assert tcp_ok(dev, db, 5432)
    assert not tcp_ok(dev, db, 22), "tcp/22 must be blocked"
    assert not udp_ok(dev, db, 5432), "udp must be blocked"
    assert not dev.host.ping(db.mesh_ip, wait=0.5), "icmp must be blocked"
    assert not db.host.ping(dev.mesh_ip, wait=0.5), "the policy is dev -> db only: db may not initiate"
    assert not ci.host.ping(db.mesh_ip, wait=0.5) and not tcp_ok(ci, db, 5432)  # no policy: nothing
    status = db.status()["firewall"]
    assert status["mode"] == "enforce" and status["state"] == "enforcing"
    assert "Firewall:    enforcing" in db.cli("status").stdout


def test_bidirectional_policy_allows_both_ways(mesh: Mesh) -> None:
    dev, ci = mesh.agents["dev"], mesh.agents["ci"]
    wait_for(lambda: dev.host.ping(ci.mesh_ip), 15, what="dev -> ci")
    assert ci.host.ping(dev.mesh_ip)


def test_policy_change_cuts_new_connections_within_a_second(mesh: Mesh) -> None:
    dev, db = mesh.agents["dev"], mesh.agents["db"]
    before = unrelated_table(mesh)
    with mesh.api() as api:
        pid = api.get("/api/v1/policies", params={"name": "dev-db"}).json()["items"][0]["id"]
        started = time.monotonic()
        api.patch(f"/api/v1/policies/{pid}", json={"ports": [5433]})
    wait_for(lambda: not tcp_ok(dev, db, 5432), 1.5, interval=0.05, what="5432 closed")
    assert time.monotonic() - started < 2.0
    assert tcp_ok(dev, db, 5433)
    with mesh.api() as api:
        api.patch(f"/api/v1/policies/{pid}", json={"ports": [5432]})
    wait_for(lambda: tcp_ok(dev, db, 5432), 3, what="5432 open again")
    assert unrelated_table(mesh) == before, "the agent touched a table it does not own"


def test_flushed_table_is_restored_and_audited(mesh: Mesh) -> None:
    dev, db = mesh.agents["dev"], mesh.agents["db"]
    db.host.exec("nft", "flush", "table", "inet", "starling")
    started = time.monotonic()
    wait_for(
        lambda: "5432" in db.host.exec("nft", "list", "table", "inet", "starling").stdout, 5, what="table restored"
    )
    assert time.monotonic() - started < 5
    assert tcp_ok(dev, db, 5432) and not tcp_ok(dev, db, 22)
    with mesh.api() as api:
        wait_for(
            lambda: bool(api.get("/api/v1/audit", params={"action": "peer.firewall.drift"}).json()["items"]),
            5,
            what="drift audit event",
        )
    db.host.exec("nft", "delete", "table", "inet", "starling")
    wait_for(
        lambda: db.host.exec("nft", "list", "table", "inet", "starling", check=False).returncode == 0,
        5,
        what="deleted table restored",
    )
    assert "docker_like" in db.host.exec("nft", "list", "tables").stdout


def test_disabled_firewall_is_shown_and_installs_nothing(mesh: Mesh) -> None:
    agent = mesh.start_agent("open", ["ci"], extra=["--disable-firewall"])
    wait_for(lambda: agent.status().get("map_serial", -1) >= 0, 10, what="map")
    assert "DISABLED" in agent.cli("status").stdout
    assert agent.host.exec("nft", "list", "table", "inet", "starling", check=False).returncode != 0
