"""The signal ASGI app (Starlette): `/ws`, `/healthz`, `/metrics`, and the lifespan that obtains the
coordinator's signing key (from the config, or fetched from the coordinator in the background)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from coordinator.signal import session
from coordinator.signal.auth import Authenticator, fetch_signing_key
from coordinator.signal.broker import Broker
from coordinator.signal.config import SignalConfig
from coordinator.signal.metrics import SignalMetrics
from starling_proto import signal as protocol

log = logging.getLogger(__name__)


class SignalService:
    """Everything one signal process holds in memory: config, metrics, broker, token verifier."""

    def __init__(self, config: SignalConfig) -> None:
        self.config = config
        self.metrics = SignalMetrics()
        self.broker = Broker(self.metrics, config.limits.rate, config.limits.burst)
        self.authenticator: Authenticator | None = None
        if config.signing_public_key:
            self.authenticator = Authenticator(config.signing_public_key, config.token_leeway)

    async def load_signing_key(self) -> None:
        assert self.config.coordinator_url is not None
        key = await fetch_signing_key(self.config.coordinator_url, ca_file=self.config.coordinator_ca)
        self.authenticator = Authenticator(key, self.config.token_leeway)

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        task = None if self.authenticator is not None else asyncio.create_task(self.load_signing_key())
        log.info(
            "signal ready (max frame %d bytes, %.0f msg/s burst %d)%s",
            self.config.limits.max_frame_bytes,
            self.config.limits.rate,
            self.config.limits.burst,
            "" if task is None else "; fetching the signing key from " + str(self.config.coordinator_url),
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.broker.close_all(protocol.CLOSE_GOING_AWAY, "signal shutting down")

    async def websocket(self, ws: WebSocket) -> None:
        await session.handle(ws, self)

    async def healthz(self, _request: Request) -> Response:
        if self.authenticator is None:
            return JSONResponse({"status": "starting", "reason": "waiting for the coordinator's signing key"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, _request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(config: SignalConfig) -> Starlette:
    service = SignalService(config)
    app = Starlette(
        routes=[
            WebSocketRoute("/ws", service.websocket),
            Route("/healthz", service.healthz),
            Route("/metrics", service.metrics_endpoint),
        ],
        lifespan=service.lifespan,
    )
    app.state.service = service
    return app
