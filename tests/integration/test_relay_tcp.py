"""TURN over TCP and over TLS on 443, end to end: real agents behind NAT routers that let no UDP out
("no-udp": hotel WiFi) or only TCP to port 443 ("tcp443"), a real coturn with UDP, TCP and TLS
listeners (certificate from a test CA that the agents trust through `ca_file`), the coordinator and
signal on the lab's public segment.

A peer behind such a router joins relayed over TCP, or over TLS when only TCP 443 leaves; ping and a
TCP transfer pass; when the block is lifted the pair upgrades to direct (the re-probe), or, where the
NATs allow no direct path, moves its allocation from TCP to UDP. With the relay down, `explain` names
the relay and every transport tried, and the error clears when the path is back.

The "tcp443" routers also let through the coordinator's and signal's TCP ports: the tests run them on
other ports, standing in for their HTTPS/WSS listeners on 443.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.fixtures.coturn import CoturnProcess, stun_mapped_from, turn_allocate_from
from tests.fixtures.mesh import Mesh, control_plane, wait_for
from tests.fixtures.natlab import NatHost, NatLab, Router, natlab
from tests.fixtures.transfer import tcp_transfer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def relay_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("relaytcp")
    secret = secrets.token_urlsafe(24)
    with natlab() as lab, contextlib.ExitStack() as stack:
        coturn = CoturnProcess(workdir / "coturn", lab.public_gateway, secret=secret, tls_port=443)
        coturn.start()
        stack.callback(coturn.stop)
        config = {
            "mesh": {"turn_servers": coturn.turn_urls, "credential_ttl": 600},
            "secrets": {"source": "config", "turn_secret": secret},
        }
        plane = control_plane(workdir, lab.public_gateway, config=config, groups=("all",), policies=(("all", "all"),))
        coord, signal = stack.enter_context(plane)
        m = Mesh(lab, coord, signal, workdir)  # type: ignore[arg-type]
        m.coturn = coturn  # type: ignore[attr-defined]
        m.control_ports = (urlsplit(coord.url).port, signal.port)  # type: ignore[attr-defined]
        try:
            start_agent(m, "p", lab.add_public_host("p"))
            yield m
        finally:
            for agent in m.agents.values():
                print(f"--- agent {agent.host.name} log ---\n{agent.log_tail(100)}")


def start_agent(mesh: Mesh, name: str, host: NatHost) -> float:
    """Start an agent that trusts the relay's test CA; returns the seconds enrollment took."""
    started = time.monotonic()
    coturn: CoturnProcess = mesh.coturn  # type: ignore[attr-defined]
    mesh.start_agent(name, ["all"], host=host, config={"ca_file": str(coturn.ca_file)})
    return time.monotonic() - started


def restricted_host(mesh: Mesh, name: str, egress: str, kind: str = "eim") -> tuple[NatHost, Router]:
    lab: NatLab = mesh.lab  # type: ignore[assignment]
    allow = tuple(mesh.control_ports) if egress == "tcp443" else ()  # type: ignore[attr-defined]
    router = lab.add_router(f"r{name}", kind, egress=egress, allow_tcp=allow)  # type: ignore[arg-type]
    return lab.add_host(name, router), router


def peer(mesh: Mesh, src: str, dst: str) -> dict[str, object]:
    return mesh.agents[src].peer_status(dst)


def wait_relayed(mesh: Mesh, src: str, dst: str, transport: str, timeout: float) -> None:
    def there() -> bool:
        st = peer(mesh, src, dst)
        return st.get("path") == "relayed" and st.get("relay_transport") == transport

    try:
        wait_for(there, timeout, what=f"{src} -> {dst} relayed over {transport}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{mesh.diagnose(src, dst)}") from None


def explain(mesh: Mesh, src: str, dst: str) -> dict[str, object]:
    result = mesh.agents[src].cli("explain", dst, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_udp_blocked_peer_joins_relayed_over_tcp_and_upgrades_when_unblocked(relay_mesh: Mesh) -> None:
    m, coturn = relay_mesh, relay_mesh.coturn  # type: ignore[attr-defined]
    host, router = restricted_host(m, "h", "no-udp")
    # The router really drops UDP: STUN to the relay gets no answer from behind it.
    assert stun_mapped_from(host, [coturn.address], timeout=0.5) == [None]
    started = time.monotonic()
    start_agent(m, "h", host)
    first_ping = m.wait_ping("h", "p", 30)
    took = time.monotonic() - started
    assert m.can_ping("p", "h")
    wait_relayed(m, "h", "p", "tcp", 10)
    st = peer(m, "h", "p")
    assert st["relay_server"] == f"{coturn.listen_ip}:{coturn.port}" and st["proxied"], st
    assert st["last_error"] is None, st
    detail = m.agents["h"].cli("status", "-d").stdout
    assert f"relayed via {coturn.listen_ip}:{coturn.port} (tcp)" in detail, detail
    history = "\n".join(str(h) for h in explain(m, "h", "p")["history"])  # type: ignore[attr-defined]
    assert f"TURN via {coturn.listen_ip}:{coturn.port} (tcp)" in history, history
    assert f"udp {coturn.listen_ip}:{coturn.port}: no answer" in history, history
    seconds = tcp_transfer(m, "h", "p", 8_000_000, timeout=60)
    print(
        f"UDP blocked: first ping over TURN/TCP {took:.2f} s after agent start ({first_ping:.2f} s after enrollment);"
        f" 8 MB in {seconds:.2f} s = {8 * 8 / seconds:.0f} Mbit/s"
    )
    # The block is lifted: the re-probe finds the direct path (EIM <-> public), WireGuard-native again.
    router.set_egress("open")
    lifted = time.monotonic()

    def direct() -> bool:
        s = peer(m, "h", "p")
        return s.get("path") == "direct" and not s.get("proxied")

    try:
        wait_for(direct, 30, what="h -> p direct after the UDP block was lifted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{m.diagnose('h', 'p')}") from None
    print(f"UDP unblocked: direct after {time.monotonic() - lifted:.1f} s")
    assert m.can_ping("h", "p") and peer(m, "h", "p")["relay_transport"] is None


def test_only_tcp_443_peer_joins_relayed_over_tls(relay_mesh: Mesh) -> None:
    m, coturn = relay_mesh, relay_mesh.coturn  # type: ignore[attr-defined]
    host, router = restricted_host(m, "t", "tcp443")
    user, password = coturn.credentials("probe")
    # Behind this router TURN over TCP on the relay's main port fails, TURN over TLS on 443 works.
    tcp = turn_allocate_from(host, coturn.address, user, password, timeout=2, transport="tcp")
    assert "error" in tcp, tcp
    tls = turn_allocate_from(
        host, (coturn.listen_ip, 443), user, password, timeout=5, transport="tls", ca=coturn.ca_file
    )
    assert "relayed" in tls, tls
    started = time.monotonic()
    start_agent(m, "t", host)
    first_ping = m.wait_ping("t", "p", 30)
    took = time.monotonic() - started
    wait_relayed(m, "t", "p", "tls", 10)
    st = peer(m, "t", "p")
    assert st["relay_server"] == f"{coturn.listen_ip}:443", st
    assert f"relayed via {coturn.listen_ip}:443 (tls)" in m.agents["t"].cli("status", "-d").stdout
    history = "\n".join(str(h) for h in explain(m, "t", "p")["history"])  # type: ignore[attr-defined]
    assert f"tcp {coturn.listen_ip}:{coturn.port}: no answer within" in history, history
    assert f"tls {coturn.listen_ip}:443: answered" in history, history
    seconds = tcp_transfer(m, "t", "p", 8_000_000, timeout=60)
    print(
        f"Only TCP 443: first ping over TURN/TLS {took:.2f} s after agent start ({first_ping:.2f} s after"
        f" enrollment); 8 MB in {seconds:.2f} s = {8 * 8 / seconds:.0f} Mbit/s"
    )
    router.set_egress("open")
    wait_for(
        lambda: (s := peer(m, "t", "p")).get("path") == "direct" and not s.get("proxied"),
        30,
        what="t -> p direct after the 443-only filter was lifted",
    )
    assert m.can_ping("t", "p")


def test_relayed_pair_moves_from_tcp_to_udp_when_udp_returns(relay_mesh: Mesh) -> None:
    """A pair that can never go direct (symmetric NAT <-> EIM NAT) stays relayed, but its allocation
    moves from TURN over TCP to TURN over UDP once UDP leaves the network again; traffic keeps flowing."""
    m = relay_mesh
    lab: NatLab = m.lab  # type: ignore[assignment]
    start_agent(m, "e", lab.add_host("e", lab.add_router("re", "eim")))
    host, router = restricted_host(m, "s", "no-udp", kind="symmetric")
    start_agent(m, "s", host)
    m.wait_ping("s", "e", 30)
    wait_relayed(m, "s", "e", "tcp", 10)
    tcp_seconds = tcp_transfer(m, "s", "e", 8_000_000, timeout=60)
    router.set_egress("open")
    lifted = time.monotonic()
    ping = subprocess.Popen(
        ["ip", "netns", "exec", host.ns, "ping", "-n", "-q", "-i", "0.2", "-W", "1", m.agents["e"].mesh_ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_relayed(m, "s", "e", "udp", 45)
        moved = time.monotonic() - lifted
        time.sleep(1.0)
    finally:
        ping.send_signal(signal.SIGINT)  # ping prints its statistics on SIGINT (not on SIGTERM)
        out, _ = ping.communicate(timeout=10)
    udp_seconds = tcp_transfer(m, "s", "e", 8_000_000, timeout=60)
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert counts is not None, out
    transmitted, received = int(counts.group(1)), int(counts.group(2))
    print(
        f"TURN/TCP -> TURN/UDP after {moved:.1f} s; ping every 0.2 s meanwhile: {received}/{transmitted} answered;"
        f" 8 MB relayed over TCP {8 * 8 / tcp_seconds:.0f} Mbit/s, over UDP {8 * 8 / udp_seconds:.0f} Mbit/s"
    )
    assert received >= transmitted - 3, out  # make before break: at most a few pings lost in the move
    assert peer(m, "s", "e")["path"] == "relayed" and m.can_ping("s", "e")


def test_explain_names_a_dead_relay_and_every_transport_then_clears(relay_mesh: Mesh) -> None:
    """The relay is down while a peer behind a UDP-blocking router joins: `explain` says which relay and
    what each transport got; when the relay returns the peer joins over TCP and the error is gone."""
    m, coturn = relay_mesh, relay_mesh.coturn  # type: ignore[attr-defined]
    host, _router = restricted_host(m, "d", "no-udp")
    coturn.stop()
    try:
        start_agent(m, "d", host)

        def named() -> bool:
            return "unreachable" in str(peer(m, "d", "p").get("last_error"))

        try:
            wait_for(named, 30, what="the dead relay named in last_error")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{m.diagnose('d', 'p')}") from None
        error = str(peer(m, "d", "p")["last_error"])
        ip = coturn.listen_ip
        assert f"relay {ip} unreachable" in error, error
        assert f"udp {ip}:{coturn.port}: no answer" in error, error
        assert f"tcp {ip}:{coturn.port}: connection refused" in error, error
        assert f"tls {ip}:443: connection refused" in error, error
        assert "TimeoutError" not in error
        text = m.agents["d"].cli("explain", "p").stdout
        assert f"relay {ip} unreachable" in text, text
    finally:
        coturn.start()
    m.wait_ping("d", "p", 40, what="d -> p after the relay came back")
    wait_relayed(m, "d", "p", "tcp", 15)
    assert peer(m, "d", "p")["last_error"] is None
