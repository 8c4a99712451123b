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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.turn
from aioice.ice import CandidatePair, StunProtocol

log = logging.getLogger("starling.agent.ice")
logging.getLogger("aioice").setLevel(logging.WARNING)  # per-check INFO lines would drown the agent's log
MESH = ipaddress.IPv4Network("100.64.0.0/10")


@dataclass
class IceParams:
    ufrag: str
    pwd: str
    candidates: list[str]  # SDP candidate lines

    def to_wire(self) -> dict[str, Any]:
        return {"ufrag": self.ufrag, "pwd": self.pwd, "candidates": self.candidates}

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
        return cls(ufrag, pwd, cands)


class _Connection(aioice.Connection):
    def __init__(self, *, address_filter: Callable[[str], bool], head_start: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._address_filter = address_filter
        self._head_start = head_start

    async def get_component_candidates(
        self,
        component: int,
        addresses: list[str],
        timeout: int = 5,  # noqa: ASYNC109 - aioice's signature
    ) -> list[aioice.Candidate]:
        return await super().get_component_candidates(
            component, [a for a in addresses if self._address_filter(a)], timeout
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


@dataclass
class SelectedPair:
    protocol: StunProtocol
    local_type: str
    local_address: tuple[str, int]
    remote_type: str
    remote_address: tuple[str, int]

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
    ) -> None:
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
            use_ipv6=False,
        )
        self.controlling = controlling
        self.turn_server = turn_server
        self.pairs_tried: list[tuple[str, str]] = []  # (pair description, result) for `starling explain`
        self.turn_error: str | None = None  # why we have no relay candidate, when TURN is configured
        self.credential_expires = 0.0  # unix time the TURN credential of this session expires

    async def gather(self) -> IceParams:
        await self.connection.gather_candidates()
        if self.turn_server is not None and "relay" not in self.local_types:
            self.turn_error = await self._turn_diagnosis()
        cands = [c.to_sdp() for c in self.connection.local_candidates]
        return IceParams(self.connection.local_username, self.connection.local_password, cands)

    async def _turn_diagnosis(self) -> str:
        """aioice drops the reason a TURN allocation failed; ask once more to be able to say why."""
        assert self.turn_server is not None
        where = f"TURN {self.turn_server[0]}:{self.turn_server[1]}"
        try:
            async with asyncio.timeout(3):
                transport, _ = await aioice.turn.create_turn_endpoint(
                    asyncio.DatagramProtocol,
                    server_addr=self.turn_server,
                    username=self.connection.turn_username,
                    password=self.connection.turn_password,
                )
            transport.close()
            return f"{where}: allocation failed during gathering, works now"
        except TimeoutError:
            return f"{where}: no answer (server down or unreachable)"
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
        return SelectedPair(
            pair.protocol,
            pair.local_candidate.type,
            (pair.local_candidate.host, pair.local_candidate.port),
            pair.remote_candidate.type,
            pair.remote_addr,
        )

    def _record_pairs(self) -> None:
        for pair in self.connection._check_list:
            local, remote = pair.local_candidate, pair.remote_candidate
            desc = f"{local.type} {local.host}:{local.port} -> {remote.type} {remote.host}:{remote.port}"
            self.pairs_tried.append((desc, pair.state.name.lower()))

    async def close(self) -> None:
        await self.connection.close()
