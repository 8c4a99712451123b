"""ICE (aioice) for one remote peer, with Starling's rules on top of the stock library.

- Host candidates never come from the mesh interface, virtual interfaces (containers, bridges,
  other VPNs) or the overlay range: those addresses mean nothing to the remote peer, and a relay
  attempt toward one can tear down a TURN allocation.
- Pairs that involve a relay candidate start `head_start` seconds late: stock aioice nominates the
  first pair that succeeds (aggressive nomination), and a TURN pair often wins that race against a
  working direct pair.
- `connect()` is bounded by the caller's deadline (aioice itself takes ~64 s to give up).

The session is signalled as one message each way (`ice-offer` / `ice-answer`) carrying the
ufrag, password and all candidates (gathering finishes before the offer is sent).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.turn
from aioice.ice import CandidatePair, StunProtocol

from agent.nat.stream import ChannelStream, FramingError
from agent.nat.transport import TurnEndpoint

log = logging.getLogger("starling.agent.ice")
logging.getLogger("aioice").setLevel(logging.WARNING)  # per-check INFO lines would drown the agent's log
MESH = ipaddress.IPv4Network("100.64.0.0/10")


@dataclass
class IceParams:
    ufrag: str
    pwd: str
    candidates: list[str]  # SDP candidate lines
    # The sender reaches nothing over UDP beyond its LAN (no UDP answer from the relay): only pairs with
    # its relay candidate can work across networks, so relay pairs need (almost) no head start. Older
    # agents neither send nor read it.
    relay_only: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"ufrag": self.ufrag, "pwd": self.pwd, "candidates": self.candidates}
        if self.relay_only:
            wire["relay_only"] = True
        return wire

    @classmethod
    def from_wire(cls, body: Any) -> IceParams:
        """Validate an offer/answer from the remote peer; ValueError on anything malformed."""
        if not isinstance(body, dict):
            raise ValueError("ICE parameters must be an object")
        ufrag, pwd, cands = body.get("ufrag"), body.get("pwd"), body.get("candidates")
        if not isinstance(ufrag, str) or not 4 <= len(ufrag) <= 256:
            raise ValueError("bad ICE ufrag")
        if not isinstance(pwd, str) or not 22 <= len(pwd) <= 256:
            raise ValueError("bad ICE password")
        if not isinstance(cands, list) or len(cands) > 32 or not all(isinstance(c, str) for c in cands):
            raise ValueError("bad ICE candidate list")
        return cls(ufrag, pwd, cands, body.get("relay_only") is True)


class _Connection(aioice.Connection):
    def __init__(
        self, *, address_filter: Callable[[str], bool], head_start: float, gather_limit: float = 5.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._address_filter = address_filter
        self._head_start = head_start
        self.gather_limit = gather_limit

    async def get_component_candidates(
        self,
        component: int,
        addresses: list[str],
        timeout: int = 5,  # noqa: ASYNC109 - aioice's signature
    ) -> list[aioice.Candidate]:
        # aioice waits `timeout` s for STUN/TURN answers, then keeps what it has (float works too).
        limit: Any = min(float(timeout), self.gather_limit)
        return await super().get_component_candidates(
            component, [a for a in addresses if self._address_filter(a)], limit
        )

    async def check_start(self, pair: CandidatePair) -> None:
        if "relay" in (pair.local_candidate.type, pair.remote_candidate.type) and self._head_start > 0:
            await asyncio.sleep(self._head_start)
            if self._nominated:
                return  # a direct pair won during the head start
        await super().check_start(pair)


def usable_remote(candidate: aioice.Candidate) -> bool:
    try:
        ip = ipaddress.ip_address(candidate.host)
    except ValueError:
        return False  # mDNS names and the like: not used between agents
    return ip.version == 4 and ip not in MESH and not ip.is_loopback and not ip.is_multicast and not ip.is_unspecified


def install_framer(inner: Any) -> ChannelStream:
    """Replace the `data_received` of an aioice TURN-over-TCP/TLS client with a `ChannelStream` that
    hands each message to the client's `datagram_received` (which demultiplexes ChannelData and STUN,
    as for UDP). Bytes aioice buffered already are carried over. A stream that loses its framing is
    closed: the allocation is gone with it, and the fallback notices (`PairProxy.broken`)."""
    existing = getattr(inner, "_starling_framer", None)
    if isinstance(existing, ChannelStream):
        return existing
    transport = inner.transport
    peer = transport.get_extra_info("peername") if transport is not None else None

    def deliver(message: bytes) -> None:
        inner.datagram_received(message, peer)

    framer = ChannelStream(deliver)

    def data_received(data: bytes) -> None:
        try:
            framer.feed(data)
        except FramingError as exc:
            log.warning("TURN stream to %s: %s: closing it", peer, exc)
            inner.transport.close()

    leftover = bytes(getattr(inner, "buffer", b""))
    inner.buffer = b""
    inner.data_received = data_received
    inner._starling_framer = framer
    if leftover:
        data_received(leftover)
    return framer


@dataclass
class SelectedPair:
    protocol: StunProtocol
    local_type: str
    local_address: tuple[str, int]
    remote_type: str
    remote_address: tuple[str, int]
    turn_transport: str | None = None  # our side's relay: "udp", "tcp" or "tls" (None: our side is no relay)

    @property
    def relayed(self) -> bool:
        return "relay" in (self.local_type, self.remote_type)

    def describe(self) -> str:
        local = f"{self.local_type} {self.local_address[0]}:{self.local_address[1]}"
        return f"{local} -> {self.remote_type} {self.remote_address[0]}:{self.remote_address[1]}"


class IceSession:
    """One ICE negotiation with one peer: gather, exchange parameters, connect, expose the pair."""

    def __init__(
        self,
        *,
        controlling: bool,
        address_filter: Callable[[str], bool],
        stun_server: tuple[str, int] | None,
        turn_server: tuple[str, int] | None,
        turn_username: str | None,
        turn_password: str | None,
        head_start: float = 0.8,
        turn_endpoint: TurnEndpoint | None = None,
        turn_tls: ssl.SSLContext | None = None,
    ) -> None:
        # TURN over TCP or TLS (RFC 8656): aioice connects the stream itself (`turn_transport="tcp"`,
        # `turn_ssl`: a context verifies the relay's certificate against the agent's ca_file or the
        # system's CAs, and the host name or IP address of the URL).
        stream = turn_endpoint is not None and turn_endpoint.stream
        tls: ssl.SSLContext | bool = False
        if turn_endpoint is not None and turn_endpoint.transport == "tls":
            tls = turn_tls or ssl.create_default_context()
        self.connection = _Connection(
            address_filter=address_filter,
            # Only the controlling side nominates, so only its checks need the head start; delaying
            # the controlled side's checks would only delay its own completion behind the peer's.
            head_start=head_start if controlling else 0.0,
            ice_controlling=controlling,
            stun_server=stun_server,
            turn_server=turn_server,
            turn_username=turn_username,
            turn_password=turn_password,
            turn_ssl=tls,  # aioice passes it on to create_connection(ssl=...)
            turn_transport="tcp" if stream else "udp",
            use_ipv6=False,
        )
        self.controlling = controlling
        self.turn_server = turn_server
        self.turn_endpoint = turn_endpoint or (TurnEndpoint("udp", *turn_server) if turn_server else None)
        self._turn_tls = tls
        self.relay_only = False  # set by the caller: our UDP reaches no relay (see IceParams.relay_only)
        self.pairs_tried: list[tuple[str, str]] = []  # (pair description, result) for `starling explain`
        self.turn_error: str | None = None  # why we have no relay candidate, when TURN is configured
        self.credential_expires = 0.0  # unix time the TURN credential of this session expires

    async def gather(self, limit: float = 4.0, diagnosis_limit: float = 2.0) -> IceParams:
        """Gather (STUN/TURN answers awaited at most `limit` s), then, when TURN gave no relay candidate,
        find out why (at most `diagnosis_limit` s more): a caller's bound must cover both."""
        self.connection.gather_limit = limit
        await self.connection.gather_candidates()
        if self.turn_server is not None and "relay" not in self.local_types:
            self.turn_error = await self._turn_diagnosis(diagnosis_limit)
        self._frame_streams()
        cands = [c.to_sdp() for c in self.connection.local_candidates]
        return IceParams(self.connection.local_username, self.connection.local_password, cands, self.relay_only)

    def shorten_head_start(self, seconds: float) -> None:
        """At most `seconds` of head start for direct pairs (one side reaches nothing over UDP beyond its
        LAN: only LAN pairs could beat the relay, and they answer within milliseconds)."""
        self.connection._head_start = min(self.connection._head_start, seconds)

    def _frame_streams(self) -> None:
        """Give TURN-over-TCP/TLS clients Starling's stream framer (agent.nat.stream) instead of aioice's,
        which copies the rest of its buffer once per message."""
        for protocol in self.connection._protocols:
            if getattr(protocol, "local_candidate", None) is None or protocol.local_candidate.type != "relay":
                continue
            inner = getattr(protocol.transport, "_TurnTransport__inner_protocol", None)
            if inner is not None and hasattr(inner, "data_received"):
                install_framer(inner)

    async def _turn_diagnosis(self, limit: float) -> str:
        """aioice drops the reason a TURN allocation failed; ask once more to be able to say why."""
        assert self.turn_server is not None and self.turn_endpoint is not None
        where = f"TURN {self.turn_endpoint.label()}"
        stream = self.turn_endpoint.stream
        try:
            async with asyncio.timeout(limit):
                transport, _ = await aioice.turn.create_turn_endpoint(
                    asyncio.DatagramProtocol,
                    server_addr=self.turn_server,
                    username=self.connection.turn_username,
                    password=self.connection.turn_password,
                    ssl=self._turn_tls if stream else None,
                    transport="tcp" if stream else "udp",
                )
            transport.close()
            return f"{where}: allocation failed during gathering, works now"
        except TimeoutError:
            return f"{where}: no answer within {limit:g} s (server down or unreachable)"
        except ssl.SSLCertVerificationError as exc:
            return f"{where}: TLS certificate not trusted: {exc.verify_message} (agent ca_file?)"
        except ConnectionRefusedError:
            return f"{where}: connection refused (nothing listens there)"
        except Exception as exc:  # any failure is the diagnosis
            text = str(exc)
            if "401" in text:
                return f"{where}: credentials refused ({text}); is the coordinator's TURN secret coturn's?"
            return f"{where}: {text or type(exc).__name__}"

    @property
    def local_types(self) -> list[str]:
        return sorted({c.type for c in self.connection.local_candidates})

    async def set_remote(self, params: IceParams) -> int:
        """Add the remote's credentials and candidates; returns how many candidates were usable."""
        self.connection.remote_username, self.connection.remote_password = params.ufrag, params.pwd
        used = 0
        for line in params.candidates:
            try:
                candidate = aioice.Candidate.from_sdp(line)
            except (ValueError, IndexError):
                continue
            if candidate.transport.lower() != "udp" or not usable_remote(candidate):
                continue
            await self.connection.add_remote_candidate(candidate)
            used += 1
        await self.connection.add_remote_candidate(None)  # end of candidates
        return used

    async def connect(self, limit: float) -> SelectedPair:
        """Run the checks; ConnectionError (after at most `limit` seconds) when no pair works."""
        try:
            async with asyncio.timeout(limit):
                await self.connection.connect()
        except TimeoutError:
            raise ConnectionError(f"ICE found no working pair within {limit:g} s") from None
        finally:
            self._record_pairs()
        pair = self.connection._nominated.get(1)  # aioice exposes no accessor for the selected pair
        if pair is None:
            raise ConnectionError("ICE completed without a nominated pair")
        local_relay = pair.local_candidate.type == "relay" and self.turn_endpoint is not None
        return SelectedPair(
            pair.protocol,
            pair.local_candidate.type,
            (pair.local_candidate.host, pair.local_candidate.port),
            pair.remote_candidate.type,
            pair.remote_addr,
            self.turn_endpoint.transport if local_relay and self.turn_endpoint else None,
        )

    def _record_pairs(self) -> None:
        for pair in self.connection._check_list:
            local, remote = pair.local_candidate, pair.remote_candidate
            desc = f"{local.type} {local.host}:{local.port} -> {remote.type} {remote.host}:{remote.port}"
            self.pairs_tried.append((desc, pair.state.name.lower()))

    async def close(self) -> None:
        await self.connection.close()
