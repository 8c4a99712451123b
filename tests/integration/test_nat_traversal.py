"""NAT traversal end to end: real agents behind real NAT routers (namespaces + nftables), a real
coturn, coordinator and signal on the "public" segment (198.19.N.0/24).

Matrix: EIM<->EIM and EIM<->public go direct (WireGuard straight to the server-reflexive address);
symmetric<->symmetric goes through the TURN relay; symmetric<->EIM works (relayed: the EIM router's
stateful filter drops the symmetric side's packets from unpredictable ports). Then: coturn dies
while pairs are direct (no loss), and a symmetric NAT becomes endpoint-independent at run time
(the relayed pair upgrades to direct).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.coturn import CoturnProcess
from tests.fixtures.enroll import sealed_enroll
from tests.fixtures.mesh import Mesh, control_plane, wait_for
from tests.fixtures.natlab import NatLab, natlab
from tests.fixtures.transfer import tcp_transfer

pytestmark = pytest.mark.slow

# host name -> router kind ("public": straight on the public segment)
LAYOUT = {"e1": "eim", "e2": "eim", "s1": "symmetric", "s2": "symmetric", "p": "public"}


@pytest.fixture(scope="module")
def nat_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("nat")
    secret = secrets.token_urlsafe(24)
    with natlab() as lab, contextlib.ExitStack() as stack:
        coturn = CoturnProcess(workdir / "coturn", lab.public_gateway, secret=secret)
        coturn.start()
        stack.callback(coturn.stop)
        config = {
            # The shortest credential lifetime: relayed pairs move to a new allocation every
            # ~30 s during this suite (coturn refuses to refresh one whose credential expired).
            "mesh": {"turn_servers": [coturn.turn_url], "credential_ttl": 60},
            "secrets": {"source": "config", "turn_secret": secret},
        }
        plane = control_plane(workdir, lab.public_gateway, config=config, groups=("all",), policies=(("all", "all"),))
        coord, signal = stack.enter_context(plane)
        m = Mesh(lab, coord, signal, workdir)  # type: ignore[arg-type]
        m.coturn = coturn  # type: ignore[attr-defined]
        try:
            for name, kind in LAYOUT.items():
                if kind == "public":
                    host = lab.add_public_host(name)
                else:
                    host = lab.add_host(name, lab.add_router(f"r{name}", kind))
                m.start_agent(name, ["all"], host=host)
            yield m
        finally:
            for agent in m.agents.values():
                print(f"--- agent {agent.host.name} log ---\n{agent.log_tail(120)}")


def path_of(mesh: Mesh, src: str, dst: str) -> dict[str, object]:
    return mesh.agents[src].peer_status(dst)


def wait_path(mesh: Mesh, src: str, dst: str, path: str, timeout: float) -> float:
    try:
        return wait_for(lambda: path_of(mesh, src, dst).get("path") == path, timeout, what=f"{src}->{dst} {path}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{mesh.diagnose(src, dst)}") from None


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("e1", "e2", "direct"), ("e1", "p", "direct"), ("s1", "s2", "relayed"), ("s1", "e1", "relayed")],
)
def test_matrix(nat_mesh: Mesh, a: str, b: str, expected: str) -> None:
    nat_mesh.wait_ping(a, b, 30)
    assert nat_mesh.can_ping(b, a)
    wait_path(nat_mesh, a, b, expected, 10)
    wait_path(nat_mesh, b, a, expected, 10)
    status = path_of(nat_mesh, a, b)
    if expected == "direct":
        assert not status["proxied"]
        assert not str(status["endpoint"]).startswith("127.0.0.1"), status
    else:
        assert status["proxied"] and status["relay_server"], status
        assert "relay" in f"{status['local_candidate']} {status['remote_candidate']}", status
    tcp_transfer(nat_mesh, a, b)
    relayed = path_of(nat_mesh, a, b)["relayed_sent_bytes"]
    if expected == "direct":
        assert relayed == 0
    else:
        # Whichever side holds the allocation, 2 MB went through a relay proxy on one of the two ends.
        assert int(relayed) + int(path_of(nat_mesh, b, a)["relayed_received_bytes"]) > 0


def test_status_shows_nat_facts(nat_mesh: Mesh) -> None:
    status = nat_mesh.agents["e1"].status()
    router = nat_mesh.agents["e1"].host.router  # type: ignore[attr-defined]
    reflexive = status["nat"]["reflexive"]
    assert reflexive["mapped_to_wireguard_port"]
    # EIM masquerade keeps the port: the public mapping is the router's WAN address and our WireGuard port.
    assert reflexive["address"] == f"{router.wan_ip}:{status['listen_port']}"
    explained = nat_mesh.agents["s1"].cli("explain", "s2", "--json")
    assert explained.returncode == 0, explained.stderr
    assert "ICE selected" in explained.stdout


def test_direct_pairs_survive_coturn_dying(nat_mesh: Mesh) -> None:
    nat_mesh.wait_ping("e1", "e2", 30)
    wait_path(nat_mesh, "e1", "e2", "direct", 10)
    coturn: CoturnProcess = nat_mesh.coturn  # type: ignore[attr-defined]
    coturn.stop()
    try:
        lost = 0
        for _ in range(10):
            lost += 0 if nat_mesh.can_ping("e1", "e2", wait=1.0) else 1
            time.sleep(0.2)
        assert lost == 0
    finally:
        coturn.start()


def scrape(mesh: Mesh, name: str) -> str:
    agent = mesh.agents[name]
    code = (
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9586/metrics',timeout=5).read().decode())"
    )
    return agent.host.exec("python3", "-c", code).stdout


def test_metrics_show_paths_and_relayed_bytes(nat_mesh: Mesh) -> None:
    text = scrape(nat_mesh, "s1")
    assert 'starling_agent_peer_path{path="relayed",peer="s2"} 1.0' in text
    assert 'starling_agent_peer_path{path="direct",peer="p"} 1.0' in text
    sent = [line for line in text.splitlines() if line.startswith("starling_agent_relayed_bytes_total{")]
    assert any(float(line.rsplit(" ", 1)[1]) > 0 for line in sent), sent
    assert "starling_agent_public_mapping_known 1.0" in text


def test_relayed_pair_survives_turn_credential_renewal(nat_mesh: Mesh) -> None:
    nat_mesh.wait_ping("s1", "s2", 30)
    wait_path(nat_mesh, "s1", "s2", "relayed", 15)

    def renewals() -> int:
        """Renewal notes on both ends (the end holding the allocation notices, the controlling end acts)."""
        count = 0
        for me, other in (("s1", "s2"), ("s2", "s1")):
            doc = json.loads(nat_mesh.agents[me].cli("explain", other, "--json").stdout or "{}")
            count += int(doc.get("turn_renewals", 0))
        return count

    before = renewals()
    ping = nat_mesh.agents["s1"].host.exec(
        "ping", "-n", "-q", "-c", "90", "-i", "0.5", "-W", "1", nat_mesh.agents["s2"].mesh_ip, check=False, timeout=90
    )
    lost = re.search(r"(\d+) received", ping.stdout)
    assert lost is not None, ping.stdout
    assert renewals() > before, "no renewal happened in 45 s with a 60 s credential lifetime"
    assert int(lost.group(1)) >= 88, ping.stdout  # at most 2 of 90 lost across the move to a new allocation
    assert path_of(nat_mesh, "s1", "s2")["path"] == "relayed"


def test_relay_outage_is_shown_and_traffic_resumes(nat_mesh: Mesh) -> None:
    nat_mesh.wait_ping("s1", "s2", 30)
    wait_path(nat_mesh, "s1", "s2", "relayed", 15)
    coturn: CoturnProcess = nat_mesh.coturn  # type: ignore[attr-defined]
    coturn.stop()
    try:
        # The allocation is gone: nothing arrives through it, the agent says so instead of "relayed".
        wait_for(lambda: path_of(nat_mesh, "s1", "s2").get("path") != "relayed", 25, what="relay loss noticed")
        status = path_of(nat_mesh, "s1", "s2")
        assert status["last_error"], status
        assert nat_mesh.agents["s1"].status()["peers"]  # the agent keeps answering
    finally:
        coturn.start()
    nat_mesh.wait_ping("s1", "s2", 40, what="s1 -> s2 after the relay came back")
    wait_path(nat_mesh, "s1", "s2", "relayed", 15)


def test_roaming_to_another_network_recovers(nat_mesh: Mesh) -> None:
    """e1 moves to another NAT'ed network (new address, new public mapping): the pair recovers."""
    lab: NatLab = nat_mesh.lab  # type: ignore[assignment]
    nat_mesh.wait_ping("e1", "e2", 30)
    wait_path(nat_mesh, "e1", "e2", "direct", 10)
    host = nat_mesh.agents["e1"].host
    router = lab.add_router("re1b", "eim")
    started = time.monotonic()
    lab.move_host(host, router)  # type: ignore[arg-type]
    moved = time.monotonic() - started
    nat_mesh.wait_ping("e1", "e2", 20, what="e1 -> e2 after roaming")
    recovered = time.monotonic() - started
    assert nat_mesh.can_ping("e2", "e1")
    new_wan = lab.router("re1b").wan_ip
    e1_key = nat_mesh.agents["e1"].status()["public_key"]

    def e2_follows() -> bool:
        # The agent's view and WireGuard's own endpoint: a stale WireGuard reading once put e1's old
        # address back into WireGuard (while e1's pings died at e2's NAT and both ends said "direct").
        wg = nat_mesh.agents["e2"].wg_dump().get(e1_key, [])
        endpoint = str(path_of(nat_mesh, "e2", "e1").get("endpoint", ""))
        return endpoint.startswith(new_wan + ":") and len(wg) > 2 and wg[2].startswith(new_wan + ":")

    try:
        wait_for(e2_follows, 10, what="e2 (and its WireGuard) sends to e1's new public address")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{nat_mesh.diagnose('e2', 'e1')}") from None
    print(f"roaming recovered after {recovered:.1f} s (goal 5 s; re-plugging took {moved:.1f} s)")
    # The map stream follows too (a kept-alive connection from the old address once hung it for good:
    # e1 then missed every later map, its TURN credential expired and routes never reached it).
    e1 = nat_mesh.agents["e1"]
    with nat_mesh.api() as api:
        assert api.patch("/api/v1/settings", json={"dns_domain": "roamed.mesh.test"}).status_code == 200
        serial = api.get(f"/api/v1/peers/{e1.peer_id}/map").json()["serial"]
    wait_for(lambda: e1.status().get("map_serial", -1) >= serial, 20, what="e1 follows the map after roaming")


def test_malformed_nat_messages_from_a_peer_change_nothing(nat_mesh: Mesh) -> None:
    """A real, enrolled peer (its own key, through signal, end-to-end encrypted) sends garbage ICE
    parameters and unusable candidates to s1: s1 refuses them, says so in `explain`, keeps its paths."""
    import asyncio

    import httpx
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from agent.signal_client import SignalClient
    from agent.signal_crypto import SignalCrypto

    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    setup_key = nat_mesh.setup_key(["all"], "key-mallory")
    r = sealed_enroll(nat_mesh.coordinator.url, {"setup_key": setup_key, "hostname": "mallory"}, private_key=key)
    assert r.status_code == 200, r.text
    credential = r.json()["credential"]
    target = nat_mesh.agents["s1"].status()["public_key"]
    wait_for(lambda: bool(nat_mesh.agents["s1"].peer_status("mallory")), 10, what="mallory in s1's map")

    async def send_garbage() -> None:
        async def token() -> str:
            async with httpx.AsyncClient(base_url=nat_mesh.coordinator.url, timeout=10) as http:
                resp = await http.post("/api/v1/peer/signal-token", headers={"Authorization": f"Bearer {credential}"})
                return str(resp.json()["token"])

        async def ignore(*_: object) -> None:
            return None

        client = SignalClient(nat_mesh.signal.ws_url, token, SignalCrypto(private), ignore, ignore)
        runner = asyncio.create_task(client.run())
        try:
            for _ in range(100):
                if client.connected:
                    break
                await asyncio.sleep(0.05)
            assert client.connected
            junk = [
                (
                    "offer",
                    {
                        "candidates": [
                            {"address": "127.0.0.1:51820"},
                            {"address": "100.64.0.9:1"},
                            {"address": "198.19.0.1:0"},
                            {"address": "not-an-address"},
                            7,
                        ]
                    },
                ),
                ("ice-offer", {"ufrag": "x", "pwd": "short", "candidates": "nope"}),
                ("ice-offer", {"ufrag": "abcd", "pwd": "p" * 22, "candidates": ["garbage sdp"] * 40}),
                ("probe-offer", {"ufrag": None}),
                ("no-such-kind", {"a": 1}),
            ]
            for kind, body in junk:
                assert await client.send(target, kind, body)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="too large"):
                await client.send(target, "offer", {"pad": "x" * 200_000})
            await asyncio.sleep(1.0)
        finally:
            await client.close()
            runner.cancel()

    asyncio.run(send_garbage())
    explained = nat_mesh.agents["s1"].cli("explain", "mallory", "--json")
    assert explained.returncode == 0, explained.stderr
    doc = json.loads(explained.stdout)
    assert doc["peer"]["candidates"] == []  # loopback, overlay, port 0 and nonsense: all dropped
    assert any("refused ice-offer" in line for line in doc["history"]), doc["history"]
    # s1 is unharmed: its other paths still work.
    nat_mesh.wait_ping("s1", "e1", 15)
    nat_mesh.wait_ping("s1", "p", 15)
    with nat_mesh.api() as api:
        api.delete(f"/api/v1/peers/{r.json()['peer']['id']}")


def test_a_peer_behind_symmetric_nat_reaches_a_lan_behind_a_routing_peer_behind_nat(nat_mesh: Mesh) -> None:
    """Routes through NAT: s1 (symmetric NAT) reaches a plain host on a LAN behind e1 (EIM NAT), whose
    pair with s1 goes through the TURN relay; s2, without a policy, gets no route."""
    lab: NatLab = nat_mesh.lab  # type: ignore[assignment]
    subnet = f"198.18.{lab.lan_base + 90}"  # beyond every router LAN of this lab (at most 80 routers)
    ns = f"{lab.prefix}-clinic"
    lab._add_namespace(ns)
    e1 = nat_mesh.agents["e1"].host
    run_in = ["ip", "netns", "exec", ns]
    subprocess.run(
        ["ip", "link", "add", "clinic0", "netns", e1.ns, "type", "veth", "peer", "name", "eth0", "netns", ns],
        check=True,
    )
    e1.exec("ip", "addr", "add", f"{subnet}.1/24", "dev", "clinic0")
    e1.exec("ip", "link", "set", "clinic0", "up")
    subprocess.run([*run_in, "ip", "addr", "add", f"{subnet}.10/24", "dev", "eth0"], check=True)
    subprocess.run([*run_in, "ip", "link", "set", "eth0", "up"], check=True)
    with nat_mesh.api() as api:
        r = api.post(
            "/api/v1/routes", json={"name": "nat-clinic", "prefix": f"{subnet}.0/24", "routers": [{"peer": "e1"}]}
        )
        assert r.status_code == 201, r.text
        route_id = r.json()["id"]
        body = {"name": "s1-clinic", "sources": {"peers": ["s1"]}, "destinations": {"routes": ["nat-clinic"]}}
        r = api.post("/api/v1/policies", json=body)
        assert r.status_code == 201, r.text
        policy_id = r.json()["id"]
    try:
        s1 = nat_mesh.agents["s1"]
        nat_mesh.wait_ping("s1", "e1", 40, what="s1 -> e1 over the mesh (before the route)")
        try:
            wait_for(lambda: s1.host.ping(f"{subnet}.10"), 40, what="s1 pings the clinic host through e1")
        except AssertionError as exc:
            e1_agent = nat_mesh.agents["e1"]
            facts = [
                f"s1 routing: {s1.status().get('routing')}",
                f"e1 routing: {e1_agent.status().get('routing')}",
                "s1 route get: " + s1.host.exec("ip", "route", "get", f"{subnet}.10", check=False).stdout,
                "e1 nft:\n" + e1.exec("nft", "list", "table", "inet", "starling", check=False).stdout,
                "e1 forwarding: " + e1.exec("sysctl", "net.ipv4.ip_forward", check=False).stdout,
            ]
            raise AssertionError(f"{exc}\n" + "\n".join(facts) + "\n" + nat_mesh.diagnose("s1", "e1")) from None
        path = path_of(nat_mesh, "s1", "e1")
        routing = s1.status()["routing"]
        assert [(r["name"], r["active_router"], r["installed"]) for r in routing["routes"]] == [
            ("nat-clinic", "e1", True)
        ]
        print(f"routed through NAT: s1 -> e1 is {path.get('path')} (proxied={path.get('proxied')})")
        assert nat_mesh.agents["s2"].status()["routing"]["routes"] == []
        assert not nat_mesh.agents["s2"].host.ping(f"{subnet}.10", wait=1.0)
    finally:
        with nat_mesh.api() as api:
            api.delete(f"/api/v1/policies/{policy_id}")
            api.delete(f"/api/v1/routes/{route_id}")
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_symmetric_nat_turning_eim_upgrades_to_direct(nat_mesh: Mesh) -> None:
    lab: NatLab = nat_mesh.lab  # type: ignore[assignment]
    nat_mesh.wait_ping("s1", "s2", 30)
    wait_path(nat_mesh, "s1", "s2", "relayed", 15)
    started = time.monotonic()
    lab.router("rs1").set_kind("eim")
    lab.router("rs2").set_kind("eim")
    wait_for(
        lambda: (st := path_of(nat_mesh, "s1", "s2")).get("path") == "direct" and not st.get("proxied"),
        25,
        what="s1 -> s2 direct, WireGuard-native (no proxy)",
    )
    upgraded = time.monotonic() - started
    assert nat_mesh.can_ping("s1", "s2")
    # The other side switches by its own confirmation or follows WireGuard's roaming within a pass or two.
    wait_for(lambda: not path_of(nat_mesh, "s2", "s1").get("proxied"), 5, what="s2 -> s1 off the proxy too")
    print(f"relay -> direct upgrade after {upgraded:.1f} s (goal 10 s; bench/dataplane measures it)")


def test_wrong_turn_secret_is_reported_not_fatal(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The coordinator hands out TURN credentials coturn refuses: two peers behind symmetric NATs
    cannot connect, and both agents say exactly why (and keep running)."""
    workdir = tmp_path_factory.mktemp("natbad")
    with natlab() as lab, contextlib.ExitStack() as stack:
        coturn = CoturnProcess(workdir / "coturn", lab.public_gateway, secret=secrets.token_urlsafe(24))
        coturn.start()
        stack.callback(coturn.stop)
        config = {
            "mesh": {"turn_servers": [coturn.turn_url]},
            "secrets": {"source": "config", "turn_secret": "not-the-coturn-secret"},
        }
        plane = control_plane(workdir, lab.public_gateway, config=config, groups=("all",), policies=(("all", "all"),))
        coord, signal = stack.enter_context(plane)
        m = Mesh(lab, coord, signal, workdir)  # type: ignore[arg-type]
        for name in ("x1", "x2"):
            m.start_agent(name, ["all"], host=lab.add_host(name, lab.add_router(f"r{name}", "symmetric")))

        def reported() -> bool:
            return "credentials refused" in str(path_of(m, "x1", "x2").get("last_error"))

        try:
            wait_for(reported, 30, what="TURN refusal reported")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{m.diagnose('x1', 'x2')}") from None
        assert path_of(m, "x1", "x2")["path"] in ("connecting", "lost")
        assert not m.can_ping("x1", "x2", wait=0.5)
        # STUN needs no credentials: the public mapping is still known.
        assert m.agents["x1"].status()["nat"]["reflexive"]["address"]
        explained = m.agents["x1"].cli("explain", "x2")
        assert explained.returncode == 0 and "credentials refused" in explained.stdout, explained.stdout
