"""The FastAPI application: wiring, lifespan (store, secrets, graph, maintenance loop), errors, limits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import __version__
from coordinator.api import contract, routes_access, routes_admin, routes_peer
from coordinator.config import CoordinatorConfig
from coordinator.errors import DomainError, RateLimited
from coordinator.hub import StreamHub
from coordinator.secrets import ensure_secrets, load_secret_source
from coordinator.service.core import Coordinator
from coordinator.store import Store

log = logging.getLogger(__name__)


class BodyLimit:
    """Rejects request bodies over `limit` bytes with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _too_large(self.limit, send)
                return
        seen = 0
        too_large = False

        async def limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(self.limit, send)


class Observe:
    """Request count and latency per route (plain ASGI: no extra task per request, streams untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/api/v1/peer/stream", "/dashboard/events"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            state = getattr(scope.get("app"), "state", None)
            c: Coordinator | None = getattr(state, "coordinator", None)
            if c is not None:
                c.metrics.requests.labels(scope["method"], path, str(status)).inc()
                c.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - started)


class _TooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    body = f'{{"error":"payload_too_large","message":"request body exceeds {limit} bytes","field":null}}'.encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "field": field}, status_code=status)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(p) for p in loc)


def build_coordinator(config: CoordinatorConfig) -> Coordinator:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    source = load_secret_source(config.secrets, config.state_dir)
    secrets = ensure_secrets(source)
    store = Store(config.database_url())
    if config.database.migrate_on_start:
        store.migrate()
    coord = Coordinator(config, store, secrets)
    coord.secret_source = source
    coord.hub = StreamHub(coord.maps, coord.peers.mark_connected, coord.metrics, config.stream_heartbeat)
    coord.ensure_settings()
    coord.reload()
    return coord


async def maintenance(coord: Coordinator) -> None:
    """Replica sync, ephemeral-peer expiry and consumed-challenge purge, every `maintenance_interval` seconds."""
    while True:
        await asyncio.sleep(coord.config.maintenance_interval)
        try:
            await asyncio.to_thread(coord.sync_from_store)
            await asyncio.to_thread(coord.peers.expire_ephemeral)
            await asyncio.to_thread(coord.peers.purge_challenges)
            coord.metrics.peers_total.set(coord.view.peer_count)
            coord.metrics.revision.set(coord.view.revision)
        except Exception:  # keep the loop alive; the next round retries
            log.exception("maintenance round failed")


def create_app(config: CoordinatorConfig, coord: Coordinator | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        instance: Coordinator = coord if coord is not None else await asyncio.to_thread(build_coordinator, config)
        app.state.coordinator = instance
        if not isinstance(instance.hub, StreamHub):
            raise RuntimeError("the coordinator has no stream hub: build it with build_coordinator()")
        app.state.hub = instance.hub
        instance.hub.bind(asyncio.get_running_loop())
        instance.metrics.peers_total.set(instance.view.peer_count)
        # Start-up objects (graph, caches, modules) never die: keep them out of every GC pass, so
        # collections stay short while thousands of streams are open.
        gc.collect()
        gc.freeze()
        task = asyncio.create_task(maintenance(instance))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            instance.store.dispose()

    app = FastAPI(
        title="Starling coordinator",
        version=__version__,
        summary="Control plane of a Starling mesh: peers, groups, policies, setup keys, network maps.",
        lifespan=lifespan,
        dependencies=[Depends(contract.no_nul_in_json)],
    )
    app.include_router(routes_admin.router)
    app.include_router(routes_access.router)
    app.include_router(routes_peer.router)
    contract.install(app)  # the error responses of every operation (coordinator/api/contract.py)

    @app.get("/healthz", tags=["ops"])
    def healthz(request: Request) -> dict[str, Any]:
        c: Coordinator = request.app.state.coordinator
        return {"status": "ok", "version": __version__, "revision": c.view.revision, "peers": c.view.peer_count}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        c: Coordinator = request.app.state.coordinator
        c.metrics.peers_total.set(c.view.peer_count)
        c.metrics.peers_connected.set(c.hub.connected_peers())
        c.metrics.revision.set(c.view.revision)
        return PlainTextResponse(generate_latest(c.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        response = error(exc.status, exc.code, exc.message, exc.field)
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = _field(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value"))
        if first.get("type") == "json_invalid":
            return error(400, "invalid_json", f"request body is not valid JSON: {msg}")
        return error(422, "validation_error", f"{where}: {msg}" if where else msg, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        allowed = contract.allowed_methods(app, request.url.path) if exc.status_code == 405 else []
        if allowed:  # every method of the resource, not only the first route's (RFC 9110)
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error(500, "internal_error", "internal error (details are in the coordinator log)")

    from coordinator.dashboard import install as install_dashboard

    dash = config.dashboard
    install_dashboard(
        app,
        poll_interval=dash.poll_interval,
        session_ttl=dash.session_ttl,
        cookie_secure=dash.secure,
        heartbeat=dash.heartbeat,
    )
    app.add_middleware(Observe)
    app.add_middleware(BodyLimit, limit=config.limits.max_body_bytes)
    return app
