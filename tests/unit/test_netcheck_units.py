"""`starling netcheck` without a network: URL parsing, mapping classification, output, and a full run
against STUN responders on loopback (UDP, TCP and TLS, one of them naming an RFC 5780 OTHER-ADDRESS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aioice import stun

from agent import cli
from agent.netcheck import Netcheck, ProbeResult, Report, classify_mapping, format_report, parse_url, targets_of
from tests.fixtures.pki import self_signed


def test_parse_url_schemes_transports_and_ports() -> None:
    t = parse_url("turn:198.19.0.1:3478?transport=udp")
    assert (t.host, t.port, t.transport, t.scheme) == ("198.19.0.1", 3478, "udp", "turn")
    assert parse_url("turn:relay.example.org?transport=tcp").transport == "tcp"
    assert parse_url("turn:relay.example.org?transport=tcp").port == 3478
    tls = parse_url("turns:relay.example.org:443?transport=tcp")
    assert (tls.port, tls.transport) == (443, "tls")
    assert parse_url("turns:relay.example.org").port == 5349
    assert parse_url("stun:[2001:db8::1]:3479").host == "2001:db8::1"
    assert parse_url("stun:[2001:db8::1]").port == 3478
    assert parse_url("198.19.0.9:3480").transport == "udp"
    for bad in ("turn:h:3478?transport=sctp", "turns:h:443?transport=udp", "turn:h:notaport", "turn::3478"):
        with pytest.raises(ValueError):
            parse_url(bad)
    targets, errors = targets_of(["turn:a:1", "stun:a:1", "turn:a:1?transport=tcp", "turn:a:x"])
    assert [(t.host, t.port, t.transport) for t in targets] == [("a", 1, "udp"), ("a", 1, "tcp")]
    assert len(errors) == 1 and "bad port" in errors[0]


def _probe(server: str, mapped: str | None) -> ProbeResult:
    return {
        "server": server,
        "via": "test",
        "mapped": mapped,
        "rtt_ms": 1.0 if mapped else None,
        "samples_ms": [1.0] if mapped else [],
        "error": None if mapped else "no answer within 1 s",
    }


def test_classify_mapping() -> None:
    same = [_probe("198.19.0.11:3478", "198.19.0.2:40000"), _probe("198.19.0.12:3478", "198.19.0.2:40000")]
    assert classify_mapping(same)["behaviour"] == "endpoint-independent"
    moved = [_probe("198.19.0.11:3478", "198.19.0.3:5001"), _probe("198.19.0.11:3479", "198.19.0.3:6123")]
    result = classify_mapping(moved)
    assert result["behaviour"] == "endpoint-dependent" and "two ports of one server" in result["detail"]
    other_ip = [_probe("198.19.0.11:3478", "198.19.0.3:5001"), _probe("198.19.0.99:3478", "198.19.0.4:5001")]
    assert classify_mapping(other_ip)["behaviour"] == "endpoint-dependent"
    one = classify_mapping([_probe("198.19.0.11:3478", "198.19.0.2:1"), _probe("198.19.0.12:3478", None)])
    assert one["behaviour"] == "unknown" and one["detail"].startswith("one STUN server") and one["servers"] == 1
    # The same server twice (two URLs for one address) is still one server.
    twice = classify_mapping([_probe("198.19.0.11:3478", "198.19.0.2:1"), _probe("198.19.0.11:3478", "198.19.0.2:9")])
    assert twice["behaviour"] == "unknown"
    assert classify_mapping([_probe("198.19.0.11:3478", None)]) == {
        "behaviour": "unknown",
        "detail": "no STUN answer",
        "servers": 0,
    }


# ----- loopback STUN servers -------------------------------------------------------------------------
Mapper = Callable[[tuple[str, int]], tuple[str, int]]


def _reply(data: bytes, mapped: tuple[str, int], other: tuple[str, int] | None) -> bytes:
    request = stun.parse_message(data)
    reply = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE, transaction_id=request.transaction_id
    )
    reply.attributes["XOR-MAPPED-ADDRESS"] = mapped
    if other is not None:
        reply.attributes["OTHER-ADDRESS"] = other
    return bytes(reply)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, mapper: Mapper, other: tuple[str, int] | None = None) -> None:
        self.mapper, self.other, self.seen = mapper, other, 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        self.transport.sendto(_reply(data, self.mapper(self.transport.get_extra_info("sockname")), self.other), addr)


async def _stream_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            header = await reader.readexactly(20)
            data = header + await reader.readexactly(int.from_bytes(header[2:4], "big"))
            writer.write(_reply(data, ("198.19.0.2", 40000), None))
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _servers(mapper: Mapper, tls_dir: Path) -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    # b: the "alternate address" a names in OTHER-ADDRESS (not in the URL list).
    b_transport, b = await loop.create_datagram_endpoint(lambda: _Udp(mapper), local_addr=("127.0.0.1", 0))
    b_addr = b_transport.get_extra_info("sockname")
    a_transport, a = await loop.create_datagram_endpoint(lambda: _Udp(mapper, b_addr), local_addr=("127.0.0.1", 0))
    tcp = await asyncio.start_server(_stream_client, "127.0.0.1", 0)
    cert, key = self_signed(tls_dir)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    tls = await asyncio.start_server(_stream_client, "127.0.0.1", 0, ssl=server_ctx)
    try:
        yield {
            "a": a_transport.get_extra_info("sockname"),
            "b": b_addr,
            "a_proto": a,
            "b_proto": b,
            "tcp": tcp.sockets[0].getsockname()[1],
            "tls": tls.sockets[0].getsockname()[1],
            "ca": ssl.create_default_context(cafile=str(cert)),
        }
    finally:
        a_transport.close()
        b_transport.close()
        tcp.close()
        tls.close()


async def _check(mapper: Mapper, tls_dir: Path, *, other: bool = True) -> tuple[Report, dict[str, Any]]:
    async with _servers(mapper, tls_dir) as s:
        urls = [
            f"turn:127.0.0.1:{s['a'][1]}?transport=udp",
            f"turn:127.0.0.1:{s['tcp']}?transport=tcp",
            f"turns:127.0.0.1:{s['tls']}?transport=tcp",
        ]
        if not other:
            s["a_proto"].other = None
        report = await Netcheck(urls, ["test"], tls=s["ca"]).run()
        return report, s


def test_netcheck_endpoint_independent_with_other_address_tcp_and_tls(tmp_path: Path) -> None:
    report, s = asyncio.run(_check(lambda _server: ("198.19.0.2", 40000), tmp_path))
    assert report["udp"] is True
    assert report["public_mapping"] == "198.19.0.2:40000"
    assert report["mapping"]["behaviour"] == "endpoint-independent", report["mapping"]
    assert report["mapping"]["servers"] == 2  # the URL's server and its OTHER-ADDRESS
    assert [p["via"] for p in report["probes"]][1] == f"OTHER-ADDRESS of 127.0.0.1:{s['a'][1]}"
    assert s["a_proto"].seen == 3 and s["b_proto"].seen == 3  # three single-send transactions each
    by_transport = {r["transport"]: r for r in report["relays"]}
    assert set(by_transport) == {"udp", "tcp", "tls"}
    udp, tcp, tls = by_transport["udp"], by_transport["tcp"], by_transport["tls"]
    assert udp["stun_rtt_ms"] is not None and len(udp["samples_ms"]) == 3 and udp["connect_ms"] is None
    assert tcp["connect_ms"] is not None and tcp["stun_rtt_ms"] is not None and tcp["tls_handshake_ms"] is None
    assert tls["connect_ms"] is not None and tls["tls_handshake_ms"] is not None and tls["stun_rtt_ms"] is not None
    assert all(r["error"] is None for r in report["relays"]), report["relays"]
    assert report["ipv6"] == {"works": None, "detail": "no IPv6 relay/STUN server", "mapped": None}
    text = format_report(report)
    assert "NAT mapping:     endpoint-independent" in text
    assert "TLS handshake" in text and "IPv6:            unknown: no IPv6 relay/STUN server" in text
    json.dumps(report)  # --json must not fail


def test_netcheck_endpoint_dependent_and_one_server(tmp_path: Path) -> None:
    report, _ = asyncio.run(_check(lambda server: ("198.19.0.3", 20000 + server[1] % 1000), tmp_path))
    assert report["mapping"]["behaviour"] == "endpoint-dependent", report["mapping"]
    assert "two ports of one server" in report["mapping"]["detail"]
    report, _ = asyncio.run(_check(lambda _server: ("198.19.0.2", 40000), tmp_path, other=False))
    assert report["mapping"]["behaviour"] == "unknown"
    assert "NAT mapping:     unknown (one STUN server" in format_report(report)


def test_netcheck_reports_dead_servers_and_untrusted_tls(tmp_path: Path) -> None:
    async def scenario() -> Report:
        async with _servers(lambda _s: ("198.19.0.2", 1), tmp_path) as s:
            dead_udp = f"stun:127.0.0.1:{s['b'][1]}"
            s["b_proto"].datagram_received = lambda data, addr: None  # silent server
            urls = [dead_udp, "turn:127.0.0.1:9?transport=tcp", f"turns:127.0.0.1:{s['tls']}"]
            return await Netcheck(urls, ["test"], tls=ssl.create_default_context()).run()

    report = asyncio.run(scenario())
    assert report["udp"] is False and report["public_mapping"] is None
    errors = {r["transport"]: r["error"] for r in report["relays"]}
    assert "no answer" in str(errors["udp"])
    assert str(errors["tcp"]).startswith("TCP connect")
    assert str(errors["tls"]).startswith("TLS handshake") and "CERTIFICATE_VERIFY_FAILED" in str(errors["tls"])
    assert "UDP:             NO" in format_report(report)


def test_cli_netcheck_usage_errors_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert cli.main(["--config", str(config), "netcheck"]) == cli.EXIT_USAGE
    assert "no STUN/TURN server to probe" in capsys.readouterr().err
    assert cli.main(["--config", str(config), "netcheck", "--server", "turn:h:1?transport=sctp"]) == cli.EXIT_USAGE
    # The cached map's relays are probed (a dead port here: the check still runs and exits 0).
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "map.json").write_text(json.dumps({"relays": [{"urls": ["stun:127.0.0.1:9"]}]}))
    assert cli.main(["--config", str(config), "netcheck", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["udp"] is False and out["sources"][0].endswith("map.json (1 URL(s))")
    assert out["relays"][0]["url"] == "stun:127.0.0.1:9"
