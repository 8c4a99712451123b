"""One peer's WebSocket from handshake to close: authentication, the read loop (limits, parsing,
rate limiting, routing), the write loop (via `broker.Connection`) and the close at token expiry."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.signal.auth import Authenticator, AuthError, Identity
from coordinator.signal.broker import Broker, Connection
from coordinator.signal.config import SignalConfig
from coordinator.signal.metrics import SignalMetrics
from coordinator.signal.ratelimit import AbuseCounter
from starling_proto import signal as protocol

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 5.0


class SignalService(Protocol):
    """What a session needs from the process that serves it (coordinator.signal.app.SignalService)."""

    config: SignalConfig
    metrics: SignalMetrics
    broker: Broker
    authenticator: Authenticator | None


async def _deny(ws: WebSocket, status: int, reason: str) -> None:
    """Refuse the handshake with an HTTP status and a JSON body (403 without a body on old servers)."""
    try:
        await ws.send_denial_response(JSONResponse({"error": reason}, status_code=status))
    except RuntimeError:
        await ws.close(protocol.CLOSE_POLICY, reason)


async def handle(ws: WebSocket, service: SignalService) -> None:
    """The `/ws` endpoint."""
    metrics, limits = service.metrics, service.config.limits
    authenticator = service.authenticator
    if authenticator is None:
        metrics.connections.labels("unavailable").inc()
        await _deny(ws, 503, "signal is starting: waiting for the coordinator's signing key")
        return
    try:
        identity = authenticator.authenticate(ws.headers.get("authorization"))
    except AuthError as exc:
        metrics.connections.labels(exc.kind).inc()
        log.info("handshake refused from %s: %s", ws.client.host if ws.client else "?", exc.reason)
        await _deny(ws, 401, exc.reason)
        return
    if identity.peer not in service.broker.connections and len(service.broker.connections) >= limits.max_connections:
        metrics.connections.labels("full").inc()
        log.warning("handshake refused: %d connections (limits.max_connections)", limits.max_connections)
        await _deny(ws, 503, "too many connections")
        return
    await ws.accept()
    metrics.connections.labels("accepted").inc()
    await Session(ws, service, identity).run()


class Session:
    def __init__(self, ws: WebSocket, service: SignalService, identity: Identity) -> None:
        self.ws = ws
        self.service = service
        self.identity = identity
        self.conn = Connection(
            identity.peer, identity.name, ws.send_text, self._close_socket, service.config.limits.send_queue
        )
        self.abuse = AbuseCounter(service.config.limits.abuse_drops)

    async def _close_socket(self, code: int, reason: str) -> None:
        await self.ws.close(code, protocol.close_reason(reason))

    async def run(self) -> None:
        conn, broker = self.conn, self.service.broker
        broker.register(conn)
        log.info("%r connected", conn)
        conn.push(protocol.welcome(conn.peer, self.service.config.limits.max_frame_bytes))
        reader = asyncio.create_task(self._read_loop())
        writer = asyncio.create_task(conn.write_loop())
        expiry = asyncio.create_task(self._expire())
        closing = asyncio.create_task(conn.closing_requested.wait())
        tasks = (reader, writer, expiry, closing)
        try:
            await asyncio.wait({reader, writer, closing}, return_when=asyncio.FIRST_COMPLETED)
            if conn.closing is not None and not writer.done():
                await asyncio.wait({writer}, timeout=FLUSH_TIMEOUT)  # send the error/close frames
        finally:
            broker.unregister(conn)
            conn.close(protocol.CLOSE_NORMAL, "")  # no more frames are queued for it
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            why = conn.closing.reason if conn.closing and conn.closing.reason else "client disconnected"
            log.info("%r closed: %s", conn, why)
            for result in results:
                if isinstance(result, Exception) and not _is_disconnect(result):
                    log.warning("%r: %s", conn, result, exc_info=result)

    async def _expire(self) -> None:
        deadline = self.identity.expires_at + self.service.config.token_leeway
        await asyncio.sleep(max(0.0, deadline - time.time()))
        self.conn.close(protocol.CLOSE_UNAUTHORIZED, "token expired")

    def _violation(self, label: str, code: int, reason: str) -> None:
        self.service.metrics.dropped.labels(label).inc()
        log.info("%r: %s", self.conn, reason)
        self.conn.push(protocol.error(reason))
        self.conn.close(code, reason)

    async def _read_loop(self) -> None:
        conn, service = self.conn, self.service
        max_frame = service.config.limits.max_frame_bytes
        bucket = service.broker.bucket(conn.peer)
        while True:
            await conn.drained.wait()  # our replies are piling up: read no more from this client for now
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect" or conn.closing is not None:
                return
            text = message.get("text")
            if text is None:
                size = len(message.get("bytes") or b"")
                if size > max_frame:
                    self._violation("too_large", protocol.CLOSE_TOO_BIG, f"frame too large: {size} > {max_frame} bytes")
                else:
                    self._violation("malformed", protocol.CLOSE_POLICY, "binary frames are not supported")
                return
            size = len(text.encode())
            if size > max_frame:
                self._violation("too_large", protocol.CLOSE_TOO_BIG, f"frame too large: {size} > {max_frame} bytes")
                return
            try:
                frame = protocol.parse_client_frame(text)
            except protocol.ProtocolViolation as exc:
                self._violation("malformed", protocol.CLOSE_POLICY, exc.reason)
                return
            msg_id = frame.id if isinstance(frame, protocol.SendFrame) else None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%r frame: %s", conn, text if len(text) <= 2048 else text[:2048] + "...")
            if not bucket.take():
                service.metrics.dropped.labels("rate_limited").inc()
                conn.push(protocol.error("rate limited", msg_id))
                if self.abuse.hit():
                    log.warning("%r: rate limit exceeded persistently, closing", conn)
                    conn.close(protocol.CLOSE_RATE_ABUSE, "rate limit exceeded persistently")
                    return
                continue
            if isinstance(frame, protocol.SendFrame):
                service.broker.route(conn, frame)
            else:
                conn.push(protocol.pong())


def _is_disconnect(exc: BaseException) -> bool:
    """Errors that only mean the socket went away while we wrote to it (uvicorn's ClientDisconnected
    is an OSError; Starlette raises RuntimeError for a send after the close)."""
    return isinstance(exc, WebSocketDisconnect | OSError | RuntimeError)
