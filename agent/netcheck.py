"""`starling netcheck`: what this host's network lets the mesh do, measured now.

Runs without the agent: the STUN/TURN servers are the relays of the agent's cached network map
(`map.json` in the state dir) plus any `--server URL`. It measures, from one ordinary UDP socket:

* **UDP reachability**: does any STUN server answer a binding request?
* **public mapping**: the address:port the servers saw for that socket;
* **NAT mapping behaviour**: the same socket asks every distinct server address (and the alternate
  address an RFC 5780 server names in OTHER-ADDRESS). One mapping for all destinations:
  endpoint-independent (hole punching works); a mapping per destination: endpoint-dependent
  ("symmetric": direct paths to peers behind NAT fail, the relay carries them). With only one
  server address answering it says so ("unknown (one STUN server)");
* **each relay's latency per transport it advertises**: UDP STUN round trip; for
  `?transport=tcp` the TCP connect time and a STUN binding over the stream; for `turns:`/`stuns:`
  the TCP connect, the TLS handshake (verified with the agent's `ca_file`, else the system CAs) and
  a STUN binding inside TLS;
* **IPv6**: a binding to each server address that is IPv6; without one it says so.

Nothing here needs root, nftables or the agent's credentials (STUN bindings need no TURN credential).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from agent.nat.stun import ServerUrl, StunClient, StunError, StunTimeout, binding_request
from agent.nat.stun import parse_url as parse_url  # (re-exported: `starling netcheck --server` checks URLs)
from agent.nat.transport import stream_binding

SAMPLES = 3  # STUN round trips per server and transport (each one a fresh transaction, sent once)
TIMEOUT = 1.0  # s to wait for one answer / one connect / one TLS handshake


# ----- targets ------------------------------------------------------------------------------------
Target = ServerUrl  # one server URL as netcheck probes it (`parse_url`: the agent's one URL parser)


def targets_of(urls: Iterable[str]) -> tuple[list[Target], list[str]]:
    """Distinct targets of the URLs (same host, port and transport once) and the URLs that did not parse."""
    seen: dict[tuple[str, int, str], Target] = {}
    bad: list[str] = []
    for url in urls:
        try:
            t = parse_url(url)
        except ValueError as exc:
            bad.append(str(exc))
            continue
        seen.setdefault((t.host, t.port, t.transport), t)
    return list(seen.values()), bad


# ----- results ------------------------------------------------------------------------------------
class ProbeResult(TypedDict):
    """One STUN server address probed over UDP from the mapping socket."""

    server: str  # ip:port ([ip]:port for IPv6)
    via: str  # the URL it came from, or "OTHER-ADDRESS of <server>"
    mapped: str | None
    rtt_ms: float | None  # median of the answered samples
    samples_ms: list[float]
    error: str | None


class RelayResult(TypedDict):
    url: str
    transport: str  # udp | tcp | tls
    address: str | None  # the address probed (the URL's host resolved)
    connect_ms: float | None  # tcp/tls: TCP connect time
    tls_handshake_ms: float | None  # tls: handshake time
    stun_rtt_ms: float | None  # median STUN binding round trip over this transport
    samples_ms: list[float]
    error: str | None


class MappingResult(TypedDict):
    behaviour: str  # endpoint-independent | endpoint-dependent | unknown
    detail: str
    servers: int  # distinct server addresses that answered


class Ipv6Result(TypedDict):
    works: bool | None  # None: not testable (no IPv6 server)
    detail: str
    mapped: str | None


class Report(TypedDict):
    started: float
    duration_ms: float
    sources: list[str]  # where the server URLs came from
    udp: bool
    local_port: int | None
    public_mapping: str | None
    port_preserved: bool | None
    mapping: MappingResult
    probes: list[ProbeResult]
    relays: list[RelayResult]
    ipv6: Ipv6Result
    wireguard_mapping: str | None  # the running agent's WireGuard port mapping (from its status), if any
    errors: list[str]


def _fmt_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _median(samples: Sequence[float]) -> float | None:
    return round(statistics.median(samples), 3) if samples else None


def classify_mapping(probes: Sequence[ProbeResult]) -> MappingResult:
    """NAT mapping behaviour from the mappings one socket got from distinct server addresses."""
    answered = [p for p in probes if p["mapped"]]
    servers = len({p["server"] for p in answered})
    if not answered:
        return {"behaviour": "unknown", "detail": "no STUN answer", "servers": 0}
    if servers < 2:
        return {
            "behaviour": "unknown",
            "detail": f"one STUN server ({answered[0]['server']}): a second server address is needed to compare",
            "servers": servers,
        }
    mappings = {p["mapped"] for p in answered}
    pairs = ", ".join(f"{p['server']} -> {p['mapped']}" for p in answered)
    if len(mappings) == 1:
        return {
            "behaviour": "endpoint-independent",
            "detail": f"same mapping {answered[0]['mapped']} toward {servers} server addresses ({pairs})",
            "servers": servers,
        }
    hosts = {p["server"].rpartition(":")[0] for p in answered}
    how = "two ports of one server" if len(hosts) == 1 else f"{len(hosts)} servers"
    return {
        "behaviour": "endpoint-dependent",
        "detail": f"a new mapping per destination ({how}: {pairs}); direct paths to peers behind NAT need the relay",
        "servers": servers,
    }


# ----- STUN transactions --------------------------------------------------------------------------
@dataclass
class UdpProber:
    """Binding requests from ONE UDP socket (one local port: the mappings are comparable)."""

    family: int = socket.AF_INET
    client: StunClient | None = None
    local_port: int | None = None
    other: dict[str, tuple[str, int]] = field(default_factory=dict)  # server -> its OTHER-ADDRESS (RFC 5780)

    async def open(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.client = StunClient(sock)
        try:
            sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.setblocking(False)
            self.local_port = sock.getsockname()[1]
            await self.client.open()  # before the concurrent transactions
        except BaseException:
            self.close()
            raise

    async def probe(self, server: tuple[str, int], via: str, samples: int = SAMPLES) -> ProbeResult:
        """`samples` sequential transactions to one server, each sent once: mapping, RTTs, the first error."""
        assert self.client is not None
        rtts: list[float] = []
        mapped: tuple[str, int] | None = None
        error: str | None = None
        for _ in range(samples):
            try:
                rtt, answer = await self.client.exchange(server, limit=TIMEOUT, rto=None)
            except StunTimeout:
                error = error or f"no answer within {TIMEOUT:g} s"
                continue
            except (StunError, OSError) as exc:
                error = error or str(exc)
                continue
            rtts.append(rtt)
            mapped = answer.mapped or mapped
            if answer.other is not None:
                self.other[_fmt_addr(*server)] = answer.other
        return {
            "server": _fmt_addr(*server),
            "via": via,
            "mapped": _fmt_addr(*mapped) if mapped else None,
            "rtt_ms": _median(rtts),
            "samples_ms": [round(r, 3) for r in rtts],
            "error": None if rtts else error,
        }

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


async def _resolve(host: str, port: int, family: int = socket.AF_INET) -> tuple[str, int] | None:
    """The first address of `host` in `family` (None: it has none)."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        want = 4 if family == socket.AF_INET else 6
        return (str(ip), port) if ip.version == want else None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    return (str(infos[0][4][0]), port) if infos else None


async def stream_relay(target: Target, tls: ssl.SSLContext | None, samples: int = SAMPLES) -> RelayResult:
    """TCP (and TLS) connect time and STUN round trips over the stream to one relay."""
    result: RelayResult = {
        "url": target.url,
        "transport": target.transport,
        "address": None,
        "connect_ms": None,
        "tls_handshake_ms": None,
        "stun_rtt_ms": None,
        "samples_ms": [],
        "error": None,
    }
    server = await _resolve(target.host, target.port) or await _resolve(target.host, target.port, socket.AF_INET6)
    if server is None:
        result["error"] = f"cannot resolve {target.host}"
        return result
    result["address"] = _fmt_addr(*server)
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    writer: asyncio.StreamWriter | None = None
    stage = "TCP connect"
    try:
        started = time.perf_counter()
        async with asyncio.timeout(TIMEOUT * 2):
            await loop.sock_connect(sock, server)
        result["connect_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if target.transport == "tls":
            stage = "TLS handshake"
            context = tls or ssl.create_default_context()
            started = time.perf_counter()
            async with asyncio.timeout(TIMEOUT * 3):
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=context, server_hostname=target.host, ssl_handshake_timeout=TIMEOUT * 3
                )
            result["tls_handshake_ms"] = round((time.perf_counter() - started) * 1000, 3)
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        stage = "STUN binding"
        rtts = []
        for _ in range(samples):
            async with asyncio.timeout(TIMEOUT):
                rtts.append(await stream_binding(reader, writer))
        result["samples_ms"] = [round(r, 3) for r in rtts]
        result["stun_rtt_ms"] = _median(rtts)
    except TimeoutError:
        result["error"] = f"{stage}: no answer within the time limit"
    except ssl.SSLError as exc:
        result["error"] = f"{stage}: {exc.reason or exc}"
    except (OSError, StunError, asyncio.IncompleteReadError) as exc:
        result["error"] = f"{stage}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        else:
            sock.close()
    return result


# ----- the whole check ----------------------------------------------------------------------------
@dataclass
class Netcheck:
    urls: list[str]
    sources: list[str] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    wireguard_mapping: str | None = None

    async def run(self) -> Report:
        started, t0 = time.time(), time.perf_counter()
        targets, errors = targets_of(self.urls)
        udp_targets = [t for t in targets if t.transport == "udp"]
        stream_targets = [t for t in targets if t.transport != "udp"]
        binding_request()  # aioice's codec imported before any timing starts
        prober = UdpProber()
        await prober.open()
        try:
            # Resolve each UDP target to IPv4 (the mesh underlay) and IPv6 (the IPv6 check).
            v4: dict[str, tuple[tuple[str, int], str]] = {}  # "ip:port" -> (address, URL)
            v6: dict[str, tuple[str, int]] = {}
            resolved: dict[str, str | None] = {}  # URL -> its IPv4 "ip:port"
            for t in udp_targets:
                addr4 = await _resolve(t.host, t.port)
                addr6 = await _resolve(t.host, t.port, socket.AF_INET6)
                resolved[t.url] = _fmt_addr(*addr4) if addr4 else None
                if addr4 is not None:
                    v4.setdefault(_fmt_addr(*addr4), (addr4, t.url))
                if addr6 is not None:
                    v6.setdefault(_fmt_addr(*addr6), addr6)
                if addr4 is None and addr6 is None:
                    errors.append(f"{t.url}: cannot resolve {t.host}")
            probes = list(await asyncio.gather(*(prober.probe(addr, url) for addr, url in v4.values())))
            # RFC 5780 servers name an alternate address: one more destination for the mapping test.
            extra = {_fmt_addr(*o): (o, s) for s, o in prober.other.items() if _fmt_addr(*o) not in v4}
            probes += await asyncio.gather(*(prober.probe(o, f"OTHER-ADDRESS of {s}") for o, s in extra.values()))
            ipv6 = await self._ipv6(v6)
            # One at a time, after the UDP probes: concurrent connects would time each other's scheduling.
            streams = [await stream_relay(t, self.tls) for t in stream_targets]
        finally:
            prober.close()
        relays: list[RelayResult] = []
        by_server = {p["server"]: p for p in probes}
        for t in udp_targets:
            key = resolved.get(t.url)
            p = by_server.get(key) if key else None
            relays.append(
                {
                    "url": t.url,
                    "transport": "udp",
                    "address": p["server"] if p else None,
                    "connect_ms": None,
                    "tls_handshake_ms": None,
                    "stun_rtt_ms": p["rtt_ms"] if p else None,
                    "samples_ms": p["samples_ms"] if p else [],
                    "error": (p["error"] if p else f"cannot resolve {t.host} to IPv4"),
                }
            )
        relays += streams
        mapped = next((p["mapped"] for p in probes if p["mapped"]), None)
        port_preserved = None
        if mapped is not None and prober.local_port:
            port_preserved = int(mapped.rpartition(":")[2]) == prober.local_port
        if not targets:
            errors.append("no STUN/TURN server to probe")
        return {
            "started": started,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
            "sources": self.sources,
            "udp": any(p["mapped"] for p in probes),
            "local_port": prober.local_port,
            "public_mapping": mapped,
            "port_preserved": port_preserved,
            "mapping": classify_mapping(probes),
            "probes": probes,
            "relays": relays,
            "ipv6": ipv6,
            "wireguard_mapping": self.wireguard_mapping,
            "errors": errors,
        }

    async def _ipv6(self, servers: dict[str, tuple[str, int]]) -> Ipv6Result:
        if not servers:
            return {"works": None, "detail": "no IPv6 relay/STUN server", "mapped": None}
        prober = UdpProber(socket.AF_INET6)
        try:
            await prober.open()
        except OSError as exc:
            return {"works": False, "detail": f"no IPv6 socket: {exc.strerror or exc}", "mapped": None}
        try:
            results = await asyncio.gather(*(prober.probe(a, key, samples=2) for key, a in servers.items()))
        finally:
            prober.close()
        ok = [r for r in results if r["mapped"]]
        if ok:
            return {"works": True, "detail": f"STUN over IPv6 answered by {ok[0]['server']}", "mapped": ok[0]["mapped"]}
        errs = "; ".join(f"{r['server']}: {r['error']}" for r in results)
        return {"works": False, "detail": f"no IPv6 STUN answer ({errs})", "mapped": None}


# ----- output -------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def format_report(r: Report) -> str:
    answered = sum(1 for p in r["probes"] if p["mapped"])
    lines = [f"Sources:         {', '.join(r['sources']) or 'none'}"]
    if r["udp"]:
        lines.append(f"UDP:             yes (STUN answered by {answered} of {len(r['probes'])} server addresses)")
    elif r["probes"]:
        lines.append(f"UDP:             NO: no STUN server answered ({r['probes'][0]['error']})")
    else:
        lines.append("UDP:             not tested (no UDP STUN/TURN server)")
    if r["public_mapping"]:
        kept = {True: ", port preserved", False: ", port changed", None: ""}[r["port_preserved"]]
        lines.append(f"Public mapping:  {r['public_mapping']} (probe socket, local port {r['local_port']}{kept})")
    else:
        lines.append("Public mapping:  unknown")
    mapping = r["mapping"]
    behaviour = mapping["behaviour"]
    if behaviour == "unknown":
        lines.append(f"NAT mapping:     unknown ({mapping['detail']})")
    else:
        lines.append(f"NAT mapping:     {behaviour}: {mapping['detail']}")
    if r["wireguard_mapping"]:
        lines.append(f"WireGuard port:  {r['wireguard_mapping']} (the running agent's STUN mapping)")
    ipv6 = r["ipv6"]
    works = {True: "yes", False: "NO", None: "unknown"}[ipv6["works"]]
    lines.append(f"IPv6:            {works}: {ipv6['detail']}")
    if r["relays"]:
        lines.append("Relays and STUN servers:")
        width = max(len(x["url"]) for x in r["relays"])
        for x in r["relays"]:
            parts = []
            if x["connect_ms"] is not None:
                parts.append(f"connect {_ms(x['connect_ms'])}")
            if x["tls_handshake_ms"] is not None:
                parts.append(f"TLS handshake {_ms(x['tls_handshake_ms'])}")
            if x["stun_rtt_ms"] is not None:
                parts.append(f"STUN {_ms(x['stun_rtt_ms'])}")
            if x["error"]:
                parts.append(f"ERROR {x['error']}")
            lines.append(f"  {x['url']:<{width}}  {x['transport']:<3}  {', '.join(parts) or '-'}")
    for err in r["errors"]:
        lines.append(f"Note:            {err}")
    lines.append(f"(measured in {r['duration_ms']:.0f} ms)")
    return "\n".join(lines)
