"""Asyncio client of the signal service: keeps one authenticated WebSocket open and exchanges
end-to-end encrypted messages (offers, answers, candidates) with other peers through it.

`run()` is the connect loop: a fresh token from `token_provider` before every attempt, the agent's one
reconnect policy between attempts (agent.backoff, docs/agent.md: full jitter, 0.2 s doubling to a 4 s
cap, reset once connected; capped at 1 s for 30 s after signal announced a restart with close
1012/1001; at the cap after close 4409, replaced). Incoming boxes are opened with
`SignalCrypto`; bad ones are logged and counted in `stats`, never raised. See docs/signal.md.
The frames are the contract in `starling_proto.signal`, shared with the signal service.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from agent import __version__
from agent.backoff import RECONNECT_BASE, RECONNECT_CAP, RESTART_CAP, Backoff
from agent.signal_crypto import SignalCrypto, SignalCryptoError
from starling_proto.signal import (
    CLOSE_GOING_AWAY,
    CLOSE_REPLACED,
    CLOSE_SERVICE_RESTART,
    CLOSE_UNAUTHORIZED,
    MAX_FRAME_LIMIT,
    MAX_ID_CHARS,
    FrameError,
    Msg,
    Offline,
    SendFrame,
    ServerError,
    Welcome,
    parse_server_frame,
)

log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str]]
MessageHandler = Callable[[str, str, dict[str, Any]], Awaitable[None]]
OfflineHandler = Callable[[str, str], Awaitable[None]]

MAX_INBOUND_BYTES = MAX_FRAME_LIMIT + 64 * 1024  # the largest max_frame signal accepts, plus framing
STAT_KEYS = (
    "connects",
    "sent",
    "received",
    "forged",
    "replayed",
    "stale",
    "malformed",
    "bad_frames",
    "offline",
    "rate_limited",
    "errors",
    "callback_errors",
)


def is_peer_key(value: str) -> bool:
    """Canonical base64 of 32 bytes (signal closes the connection on anything else)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and base64.b64encode(raw).decode() == value


class SignalClient:
    def __init__(
        self,
        url: str,
        token_provider: TokenProvider,
        crypto: SignalCrypto,
        on_message: MessageHandler,
        on_offline: OfflineHandler | None = None,
        *,
        min_backoff: float = RECONNECT_BASE,
        max_backoff: float = RECONNECT_CAP,
        restart_backoff: float = RESTART_CAP,
        restart_window: float = 30.0,
        open_timeout: float = 5.0,
        token_timeout: float = 15.0,
        ping_interval: float | None = 15.0,
        ping_timeout: float | None = 10.0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"signal URL must start with ws:// or wss://: {url!r}")
        self.url = url
        self._token_provider = token_provider
        self._crypto = crypto
        self._on_message = on_message
        self._on_offline = on_offline
        self._backoff = Backoff(min_backoff, max_backoff)
        self._restart_backoff = restart_backoff
        self._restart_window = restart_window
        self._fast_until = 0.0
        self._open_timeout = open_timeout
        self._token_timeout = token_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ssl = ssl
        self._ws: ClientConnection | None = None
        self._attempt: asyncio.Task[None] | None = None
        self._redial = False
        self._max_frame = 64 * 1024
        self._stop = asyncio.Event()
        self._running = False
        self._finished = asyncio.Event()
        self.changed = asyncio.Event()  # set when `connected` changes (the owner clears it)
        self.last_error: str | None = None
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def public_key(self) -> str:
        return self._crypto.public_key

    # ----- public API ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect and stay connected until `close()` (or cancellation)."""
        if self._running:
            raise RuntimeError("SignalClient.run() is already running")
        self._running = True
        self._finished.clear()
        try:
            while not self._stop.is_set():
                attempt = self._attempt = asyncio.create_task(self._connect_once(), name="signal-connect")
                stopper = asyncio.create_task(self._stop.wait())
                try:
                    await asyncio.wait({attempt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if not attempt.done():  # close() was called: leave politely, then give up waiting
                        await self._close_ws("agent stopping")
                        await asyncio.wait({attempt}, timeout=2.0)
                finally:
                    for task in (attempt, stopper):
                        task.cancel()
                    await asyncio.gather(attempt, stopper, return_exceptions=True)
                if self._stop.is_set():
                    break
                delay = 0.0 if self._redial else self._next_delay()
                self._redial = False
                log.debug("signal: next connection attempt in %.2fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            self._ws = None
            self._running = False
            self._finished.set()

    async def send(self, to_pub: str, kind: str, body: dict[str, Any], *, msg_id: str | None = None) -> bool:
        """Seal `{kind, body}` for `to_pub` and hand it to signal. False if not connected right now.

        True means signal accepted the frame, not that the peer got it: an `offline` notice (see
        `on_offline`) follows if the peer is not connected. ValueError for a bad key, id or a message
        over signal's frame limit.
        """
        if not is_peer_key(to_pub):
            raise ValueError("to_pub must be a WireGuard public key (canonical base64 of 32 bytes)")
        if msg_id is not None and not 1 <= len(msg_id) <= MAX_ID_CHARS:
            raise ValueError(f"msg_id must have 1 to {MAX_ID_CHARS} characters")
        ws = self._ws
        if ws is None:
            return False
        box = self._crypto.seal(to_pub, kind, body)
        frame = SendFrame(to_pub, msg_id or secrets.token_hex(8), box).to_wire()
        size = len(frame.encode())
        if size > self._max_frame:
            raise ValueError(f"message too large for signal: {size} > {self._max_frame} bytes")
        try:
            await ws.send(frame)
        except ConnectionClosed:
            return False
        self.stats["sent"] += 1
        return True

    def set_crypto(self, crypto: SignalCrypto) -> None:
        """Our WireGuard key rotated: seal and open with the new one (call `redial` next, so that
        signal admits us under the new public key)."""
        self._crypto = crypto

    def redial(self, reason: str) -> None:
        """Drop the connection now and dial again at once: the network under it changed (roaming),
        so the TCP connection is probably dead although nothing has noticed yet."""
        attempt = self._attempt
        if attempt is not None and not attempt.done():
            log.info("signal %s: reconnecting (%s)", self.url, reason)
            self._redial = True
            transport = getattr(self._ws, "transport", None)
            if transport is not None:
                transport.abort()  # no closing handshake over a path that no longer exists
            attempt.cancel()

    async def close(self) -> None:
        """Stop `run()` and close the connection (idempotent)."""
        self._stop.set()
        if self._running:
            await self._finished.wait()
        else:
            await self._close_ws("agent stopping")

    # ----- connection ---------------------------------------------------------------------------
    def _next_delay(self) -> float:
        fast = time.monotonic() < self._fast_until
        return self._backoff.next(self._restart_backoff if fast else None)

    async def _close_ws(self, reason: str) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, reason)

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.warning("signal %s: %s", self.url, message)
        self.last_error = message

    async def _connect_once(self) -> None:
        try:
            token = await asyncio.wait_for(self._token_provider(), self._token_timeout)
        except Exception as exc:  # any failure of the provider (coordinator down, HTTP error...)
            self._fail(f"cannot get a signal token: {exc or type(exc).__name__}")
            return
        options: dict[str, Any] = {}
        if self._ssl is not None and self.url.startswith("wss://"):  # websockets refuses ssl= for ws://
            options["ssl"] = self._ssl
        try:
            async with connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {token}"},
                user_agent_header=f"starling-agent/{__version__}",
                compression=None,
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                close_timeout=2.0,
                max_size=MAX_INBOUND_BYTES,
                **options,
            ) as ws:
                await self._session(ws)
        except InvalidStatus as exc:
            response = exc.response
            detail = _error_body(response.body)
            self._fail(f"refused: HTTP {response.status_code}" + (f" ({detail})" if detail else ""))
        except (OSError, TimeoutError, WebSocketException, FrameError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    async def _session(self, ws: ClientConnection) -> None:
        first = parse_server_frame(await asyncio.wait_for(ws.recv(), self._open_timeout))
        if not isinstance(first, Welcome):
            raise FrameError("the first frame is not a welcome")
        if first.peer != self._crypto.public_key:
            await ws.close(1000, "wrong identity")
            raise FrameError(f"signal admitted us as {first.peer}, not {self._crypto.public_key} (stale token?)")
        self._max_frame = first.max_frame
        self._ws = ws
        self.changed.set()
        self._backoff.reset()
        self.last_error = None
        self.stats["connects"] += 1
        log.info("signal %s: connected as %s", self.url, first.peer)
        try:
            async for data in ws:
                await self._handle(data)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self.changed.set()
        self._closed(ws.close_code, ws.close_reason or "")

    def _closed(self, code: int | None, reason: str) -> None:
        if self._stop.is_set():
            return
        if code == CLOSE_REPLACED:
            self._backoff.exhaust()
            self._fail("replaced: another connection uses this peer's key")
        elif code in (CLOSE_SERVICE_RESTART, CLOSE_GOING_AWAY):
            self._fast_until = time.monotonic() + self._restart_window
            self._fail(f"signal restarting (close {code})")
        elif code == CLOSE_UNAUTHORIZED:
            self.last_error = f"closed by signal: {reason or 'unauthorized'}"  # expected at token expiry
            log.info("signal %s: %s, reconnecting with a fresh token", self.url, reason or "unauthorized")
        else:
            self._fail(f"connection closed (code {code}{': ' + reason if reason else ''})")

    async def _handle(self, data: str | bytes) -> None:
        try:
            frame = parse_server_frame(data)
        except FrameError as exc:
            self.stats["bad_frames"] += 1
            log.debug("signal: ignoring frame: %s", exc)
            return
        if isinstance(frame, Msg):
            await self._deliver(frame)
        elif isinstance(frame, Offline):
            self.stats["offline"] += 1
            if self._on_offline is not None:
                try:
                    await self._on_offline(frame.to, frame.id)
                except Exception:
                    self.stats["callback_errors"] += 1
                    log.exception("signal: on_offline failed")
        elif isinstance(frame, ServerError):
            if frame.reason == "rate limited":
                self.stats["rate_limited"] += 1
                log.debug("signal: message %s rate limited", frame.id)
            else:
                self.stats["errors"] += 1
                log.warning("signal error: %s", frame.reason)

    async def _deliver(self, frame: Msg) -> None:
        try:
            opened = self._crypto.open_message(frame.sender, frame.box)
        except SignalCryptoError as exc:
            self.stats[exc.reason] += 1
            log.warning("signal: dropped a box from %s: %s", frame.sender[:12], exc)
            return
        self.stats["received"] += 1
        try:
            await self._on_message(opened.sender, opened.kind, opened.body)
        except Exception:
            self.stats["callback_errors"] += 1
            log.exception("signal: on_message failed for a %r from %s", opened.kind, opened.sender[:12])


def _error_body(body: bytes | bytearray | None) -> str:
    if not body:
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return bytes(body[:200]).decode(errors="replace")
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])[:200]
    return ""
