"""Live updates: the Server-Sent Events feed open pages subscribe to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from coordinator.dashboard.live import RESYNC, sse
from coordinator.dashboard.session import SESSION_COOKIE
from coordinator.dashboard.web import (
    PREFIX,
    Dash,
    session_still_valid,
)

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/events")
async def events(request: Request, dash: Dash) -> Response:
    coord = dash.coord(request)
    sess = await dash.session(request)
    if sess is None:
        return dash.finish(request, PlainTextResponse("login required", status_code=401))
    try:
        since: float | None = float(request.query_params.get("since", ""))
    except ValueError:
        since = None
    await dash.feed.ensure_started(coord)
    queue, replay = dash.feed.subscribe(since)
    feed = dash.feed

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n\n" + (replay or "")
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), timeout=dash.heartbeat)
                except TimeoutError:
                    current = dash.codec(coord).decode(request.cookies.get(SESSION_COOKIE), time.time())
                    valid = current is not None and await run_in_threadpool(session_still_valid, coord, current)
                    if not valid:
                        yield sse("logout", {"reason": "session ended"})
                        return
                    message = ": keep-alive\n\n"
                yield message
                if message == RESYNC:
                    return
        finally:
            feed.unsubscribe(queue)

    response = StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
    return dash.finish(request, response)
