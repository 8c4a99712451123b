"""Which transport reaches the TURN relay: UDP first, then TCP, then TLS (RFC 8656 §3.1).

The map's relays carry URLs (`starling_proto.netmap.RelayCredential.urls`):

    turn:HOST:PORT?transport=udp     TURN over UDP (the default without ?transport=)
    turn:HOST:PORT?transport=tcp     TURN over TCP (coturn's listening-port, 3478)
    turns:HOST:PORT?transport=tcp    TURN over TLS (coturn's tls-listening-port, 443 where UDP is blocked)
    stun:HOST:PORT                   STUN only

(Agents before TCP/TLS support skip every URL with `transport=tcp`; the coordinator adds it to
`turns:` URLs that lack it, so an old agent never mistakes a TLS port for a UDP STUN server.)

`RelayPicker.pick()` asks each TURN endpoint for a STUN binding (no credentials needed), UDP at
once and TCP/TLS `STAGGER` later unless UDP answered by then ("happy eyeballs"), and returns the
first endpoint in preference order that answered; an endpoint that has not answered `PATIENCE` after
its start is passed over when a less preferred one has. Where UDP is blocked this costs one UDP
probe time (`UDP_LIMIT`), where only TCP 443 leaves about `STAGGER + PATIENCE`: never a failed
TURN allocation. The choice is cached (shorter when it is not UDP,
so that a lifted block is noticed), shared by all peers, and every probe's result is kept for
`starling explain` ("udp 198.19.0.1:3478: no answer; tcp 198.19.0.1:3478: connection refused").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from agent.nat.stun import (
    StunError,
    StunTimeout,
    Transport,
    UnsupportedTransport,
    binding,
    binding_request,
    parse_url,
    read_answer,
)

RANK: dict[str, int] = {"udp": 0, "tcp": 1, "tls": 2}
UDP_LIMIT = 1.5  # s for the UDP binding (retransmitted at 0.25, 0.75 s): a loaded host may answer late
STREAM_LIMIT = 2.5  # s for TCP connect (+ TLS handshake) + binding
STAGGER = 0.25  # s head start of UDP over TCP/TLS
PATIENCE = 1.0  # s a preferred endpoint may take once a less preferred one has answered
KEEP_UDP = 60.0  # s a UDP choice is reused without asking again
KEEP_STREAM = 15.0  # s a TCP/TLS choice is reused (then UDP is asked again: the block may be gone)
KEEP_NONE = 3.0  # s "no endpoint answered" is reused


@dataclass(frozen=True, slots=True)
class TurnEndpoint:
    """One way to reach one TURN server."""

    transport: Transport
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def stream(self) -> bool:
        return self.transport != "udp"

    def label(self) -> str:
        """What status and explain show: "198.19.0.1:443 (tls)"."""
        return f"{self.host}:{self.port} ({self.transport})"


def parse_turn_url(url: str) -> TurnEndpoint | None:
    """The TURN endpoint a URL names; None for STUN-only URLs, DTLS (`turns:...?transport=udp`, not
    supported) and unknown schemes. ValueError for a malformed address."""
    if url.split(":", 1)[0].lower() not in ("turn", "turns"):
        return None
    try:
        server = parse_url(url)
    except UnsupportedTransport:
        return None
    return TurnEndpoint(server.transport, server.host, server.port)


def turn_endpoints(urls: Iterable[str]) -> list[TurnEndpoint]:
    """Every usable TURN endpoint of `urls`, in preference order: UDP, TCP, TLS (URL order within one)."""
    found: list[TurnEndpoint] = []
    for url in urls:
        try:
            endpoint = parse_turn_url(url)
        except ValueError:
            continue
        if endpoint is not None and endpoint not in found:
            found.append(endpoint)
    return sorted(found, key=lambda e: RANK[e.transport])  # stable: URL order within a transport


def udp_stun_server(urls: Iterable[str]) -> tuple[str, int] | None:
    """The first UDP STUN server of `urls` (a `stun:` URL or a `turn:` URL over UDP: coturn answers both)."""
    for url in urls:
        if url.split(":", 1)[0].lower() not in ("stun", "turn"):
            continue
        with contextlib.suppress(ValueError):
            server = parse_url(url)
            if server.transport == "udp":
                return server.address
    return None


# ----- probes -------------------------------------------------------------------------------------


@dataclass
class Probe:
    """One endpoint's answer to a STUN binding: round trip in ms, or why there was none."""

    endpoint: TurnEndpoint
    rtt_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.rtt_ms is not None

    def describe(self) -> str:
        result = f"answered in {self.rtt_ms:.1f} ms" if self.rtt_ms is not None else self.error or "not tried"
        return f"{self.endpoint.transport} {self.endpoint.host}:{self.endpoint.port}: {result}"


async def stream_binding(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """One STUN binding over a TCP or TLS stream (RFC 8489 §6.2.2: messages back to back, each
    `20 + length` bytes); its round trip in ms. StunError for an error answer or garbage."""
    payload, transaction_id = binding_request()
    started = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    while True:
        header = await reader.readexactly(20)
        data = header + await reader.readexactly(header[2] << 8 | header[3])
        if data[8:20] == transaction_id:  # (another transaction's answer: skipped)
            rtt = (time.perf_counter() - started) * 1000
            read_answer(data, transaction_id)
            return rtt


async def probe_udp(endpoint: TurnEndpoint, limit: float = UDP_LIMIT) -> Probe:
    """A STUN binding over UDP from a fresh socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    started = time.monotonic()
    try:
        sock.bind(("0.0.0.0", 0))
        await binding(sock, endpoint.address, limit=limit)
    except StunTimeout:
        return Probe(endpoint, error=f"no answer within {limit:g} s (UDP blocked, or the server is down)")
    except StunError as exc:
        return Probe(endpoint, error=str(exc))
    except OSError as exc:
        sock.close()
        return Probe(endpoint, error=_os_error(exc))
    return Probe(endpoint, rtt_ms=(time.monotonic() - started) * 1000)


async def probe_stream(endpoint: TurnEndpoint, tls: ssl.SSLContext | None, limit: float = STREAM_LIMIT) -> Probe:
    """Connect over TCP (and TLS for `tls` endpoints), send a STUN binding, read the answer."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    stage = "connect"
    try:
        async with asyncio.timeout(limit):
            context = (tls or ssl.create_default_context()) if endpoint.transport == "tls" else None
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=context)
            stage = "answer"
            await stream_binding(reader, writer)
    except TimeoutError:
        where = "TCP connect" if stage == "connect" else "STUN answer"
        if endpoint.transport == "tls" and stage == "connect":
            where = "TCP connect or TLS handshake"
        return Probe(endpoint, error=f"no {where} within {limit:g} s (blocked, or the server is down)")
    except ssl.SSLCertVerificationError as exc:
        return Probe(endpoint, error=f"TLS certificate not trusted: {exc.verify_message} (agent ca_file?)")
    except ssl.SSLError as exc:
        return Probe(endpoint, error=f"TLS handshake failed: {exc.reason or exc}")
    except asyncio.IncompleteReadError:
        return Probe(endpoint, error="the server closed the connection without answering STUN")
    except (StunError, ValueError) as exc:
        return Probe(endpoint, error=f"bad STUN answer: {exc}")
    except OSError as exc:
        return Probe(endpoint, error=_os_error(exc))
    finally:
        if writer is not None:
            writer.close()
    return Probe(endpoint, rtt_ms=(time.monotonic() - started) * 1000)


def _os_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return exc.strerror or str(exc) or type(exc).__name__


async def probe(endpoint: TurnEndpoint, tls: ssl.SSLContext | None = None) -> Probe:
    if endpoint.transport == "udp":
        return await probe_udp(endpoint)
    return await probe_stream(endpoint, tls)


# ----- the choice ---------------------------------------------------------------------------------


@dataclass
class Pick:
    """The result of one round of probes."""

    endpoint: TurnEndpoint | None  # the endpoint to allocate on (None: none answered)
    probes: list[Probe] = field(default_factory=list)
    # False only when TCP/TLS answered and UDP did not: this network lets no UDP out, so server-reflexive
    # candidates (UDP STUN) cannot work either.
    udp_ok: bool = True
    at: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.probes) or "no TURN endpoint"

    def error(self) -> str | None:
        """Why no TURN endpoint is usable (None when one is)."""
        if self.endpoint is not None:
            return None
        hosts = sorted({p.endpoint.host for p in self.probes})
        return f"relay {', '.join(hosts) or '?'} unreachable: {self.describe()}"

    def keep(self) -> float:
        if self.endpoint is None:
            return KEEP_NONE
        return KEEP_UDP if self.endpoint.transport == "udp" else KEEP_STREAM


class RelayPicker:
    """Picks (and caches) the TURN endpoint to allocate on, for all peers of one agent."""

    def __init__(self, tls: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self.tls = tls
        self.last: Pick | None = None
        self._key: tuple[TurnEndpoint, ...] = ()
        self._running: asyncio.Task[Pick] | None = None
        self.rounds = 0

    def cached(self, endpoints: Sequence[TurnEndpoint]) -> Pick | None:
        last = self.last
        if last is None or tuple(endpoints) != self._key or time.monotonic() - last.at > last.keep():
            return None
        return last

    def forget(self) -> None:
        """Ask again next time (a relay allocation failed on the picked endpoint, the path was lost)."""
        self.last = None

    def warm(self, endpoints: Sequence[TurnEndpoint]) -> None:
        """Start a round in the background unless a fresh result or a round exists."""
        if endpoints and self.cached(endpoints) is None and (self._running is None or self._running.done()):
            self._start(endpoints)

    async def pick(self, endpoints: Sequence[TurnEndpoint]) -> Pick:
        if not endpoints:
            return Pick(None, udp_ok=True)
        cached = self.cached(endpoints)
        if cached is not None:
            return cached
        running = self._running
        if running is None or running.done() or self._key != tuple(endpoints):
            running = self._start(endpoints)
        return await asyncio.shield(running)

    def _start(self, endpoints: Sequence[TurnEndpoint]) -> asyncio.Task[Pick]:
        key = tuple(endpoints)
        task = asyncio.create_task(self._round(key))
        self._running, self._key = task, key

        def done(t: asyncio.Task[Pick]) -> None:
            if not t.cancelled() and t.exception() is None and self._key == key:
                self.last = t.result()

        task.add_done_callback(done)
        return task

    async def _round(self, endpoints: tuple[TurnEndpoint, ...]) -> Pick:
        self.rounds += 1
        tls = self.tls()
        udp_answered = asyncio.Event()

        async def run(endpoint: TurnEndpoint) -> Probe:
            if endpoint.stream and any(e.transport == "udp" for e in endpoints):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STAGGER):
                        await udp_answered.wait()
                        return Probe(endpoint, error="not needed (UDP answered)")
            result = await probe(endpoint, tls)
            if result.ok and endpoint.transport == "udp":
                udp_answered.set()
            return result

        started = time.monotonic()
        tasks = [asyncio.create_task(run(e)) for e in endpoints]
        with_udp = any(e.transport == "udp" for e in endpoints)
        probes: list[Probe] = []
        try:
            for index, (endpoint, task) in enumerate(zip(endpoints, tasks, strict=True)):
                # Wait for this endpoint's answer; but once a less preferred one answered, only until
                # PATIENCE after this one's start (a blocked TCP port hangs until STREAM_LIMIT).
                patience = started + (STAGGER if endpoint.stream and with_udp else 0.0) + PATIENCE
                while not task.done():
                    later = [t for t in tasks[index + 1 :] if t.done() and not t.cancelled() and t.result().ok]
                    if later and time.monotonic() >= patience:
                        break
                    await asyncio.wait({task}, timeout=0.05)
                if not task.done():
                    probes.append(Probe(endpoint, error=f"no answer within {PATIENCE:g} s (a fallback answered)"))
                    continue
                result = task.result()
                probes.append(result)
                if result.ok:
                    udp_ok = endpoint.transport == "udp" or not with_udp
                    return Pick(endpoint, probes, udp_ok=udp_ok)
            # Nothing answered: the relay is down or unreachable (or this host too busy to tell). That is
            # no evidence against UDP: callers still try the first endpoint with their own time limits.
            return Pick(None, probes, udp_ok=True)
        finally:
            for task in tasks:
                task.cancel()
