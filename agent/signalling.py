"""The agent's side of signal (`Signalling`): the connection (URL from the map or agent.yaml, token from
the coordinator, sealed with our WireGuard key), our offers to peers (the `agent.link.Offers` port),
and routing what peers send to their links. Candidates from a peer our map does not hold yet are
kept a short while (the map may be a moment behind signal)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent.keys import decode_key
from agent.link import PeerLink
from agent.peers import Candidate, PathState, PeerConnection, parse_candidates
from agent.status import ServiceStatus

if TYPE_CHECKING:  # websockets is imported when signal starts
    from agent.signal_client import SignalClient

log = logging.getLogger("starling.agent")
PENDING_TTL = 30.0  # s candidates from a peer not (yet) in our map are kept


class LinkDirectory(Protocol):
    """The agent's links, by the peer's current public key."""

    def link_for_key(self, public_key: str) -> PeerLink | None: ...

    def all_links(self) -> list[PeerLink]: ...


class CandidateSource(Protocol):
    async def fresh_candidates(self, max_age: float = 2.0) -> list[Candidate]: ...


class Signalling:
    def __init__(
        self,
        *,
        url: Callable[[], str | None],
        token: Callable[[], Awaitable[str]],
        private_key: Callable[[], str],
        candidates: CandidateSource,
        links: LinkDirectory,
        status: ServiceStatus,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.url, self.token, self.private_key = url, token, private_key
        self.candidates, self.links, self.status, self.tls = candidates, links, status, tls
        self.client: SignalClient | None = None
        self.url_known = asyncio.Event()  # set when a map arrives (it may carry the URL)
        self._pending: dict[str, tuple[float, list[Candidate]]] = {}
        self._reoffer_pending = False  # our candidates changed while signal was down

    # ----- the Offers port ----------------------------------------------------------------------
    async def offer(self, conn: PeerConnection, kind: str) -> bool:
        if self.client is None or not self.client.connected:
            return False
        cands = await self.candidates.fresh_candidates()
        sent = bool(await self.client.send(conn.public_key, kind, {"candidates": [c.to_wire() for c in cands]}))
        log.debug("%s to %s: %s (%s)", kind, conn.name, [c.address for c in cands], "sent" if sent else "not sent")
        return sent

    async def reoffer_all(self, why: str) -> None:
        """Our candidates changed (roaming, new public mapping): tell every peer at once."""
        links = self.links.all_links()
        if links:
            log.info("%s: offering new candidates to %d peers", why, len(links))
        for link in links:
            if not await link.offer_now():
                self._reoffer_pending = True  # signal is down (redialling): offer when it is back

    def pending_for(self, public_key: str) -> list[Candidate] | None:
        """Candidates this peer sent before our map had it (taken: given once)."""
        held = self._pending.pop(public_key, None)
        return held[1] if held else None

    # ----- what peers send ----------------------------------------------------------------------
    async def on_message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        candidates = parse_candidates(body.get("candidates") if isinstance(body, dict) else None)
        link = self.links.link_for_key(sender)
        log.debug("%s from %s: %s", kind, link.conn.name if link else sender, [c.address for c in candidates])
        if link is None:
            now = time.monotonic()
            self._pending[sender] = (now, candidates)
            for key in [k for k, (t, _) in self._pending.items() if now - t > PENDING_TTL]:
                del self._pending[key]
            return
        await link.receive(kind, body, candidates)

    async def on_offline(self, target: str, _msg_id: str) -> None:
        link = self.links.link_for_key(target)
        if link is not None:
            link.peer_offline()

    # ----- the connection -----------------------------------------------------------------------
    def redial(self, why: str) -> None:
        if self.client is not None:
            self.client.redial(why)

    def renew_identity(self) -> None:
        """Signal admits us by our public key and seals messages with our private key: reconnect."""
        if self.client is None:
            return
        from agent.signal_crypto import SignalCrypto

        self.client.set_crypto(SignalCrypto(decode_key(self.private_key())))
        self.client.redial("key rotated")

    async def run(self) -> None:
        """Connect to signal and keep connected; offer to the peers waiting whenever it (re)connects. A new
        URL in the map (coordinator `signal_url`) is dialled instead of the old one."""
        while True:
            await self._serve(await self._wait_url())

    async def _wait_url(self) -> str:
        while True:
            self.url_known.clear()  # before reading: a map applied from here on wakes the wait below
            url = self.url()
            if url:
                return url
            self.status.set(False, "no signal URL (coordinator settings.signal_url or agent signal_url)")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.url_known.wait()

    async def _serve(self, url: str) -> None:
        """One client for `url`, until the URL changes (or cancellation)."""
        from agent.signal_client import SignalClient
        from agent.signal_crypto import SignalCrypto

        crypto = SignalCrypto(decode_key(self.private_key()))
        self.client = client = SignalClient(url, self.token, crypto, self.on_message, self.on_offline, ssl=self.tls)
        runner = asyncio.create_task(client.run(), name="signal-client")
        try:
            while True:
                client.changed.clear()  # before reading: a change from here on wakes the wait below
                connected = bool(client.connected)
                if connected and (self._reoffer_pending or not self.status.connected):
                    everyone, self._reoffer_pending = self._reoffer_pending, False
                    for link in self.links.all_links():  # (re)connected: offer to everyone waiting now
                        if everyone or link.conn.state not in (PathState.DIRECT, PathState.RELAYED):
                            await link.offer_now()
                self.status.set(connected, client.last_error)
                wanted = self.url()
                if wanted and wanted != url:
                    log.info("signal URL changed: %s -> %s", url, wanted)
                    self.status.set(False, f"signal URL changed to {wanted}: reconnecting")
                    return
                with contextlib.suppress(TimeoutError):  # woken at once when the connection comes or goes
                    async with asyncio.timeout(0.5):
                        await client.changed.wait()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await client.close()  # a polite close; the runner ends with it
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
