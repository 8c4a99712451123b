"""The audit log with filters and paging."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from coordinator.dashboard.web import (
    PREFIX,
    Auth,
    FormError,
    call,
    opt,
    parse_utc,
)
from coordinator.errors import DomainError

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/audit")
async def audit(request: Request, auth: Auth) -> Response:
    q = request.query_params
    filters = {k: (q.get(k) or "").strip() for k in ("action", "actor", "target_type", "target_id", "since", "until")}
    error = ""
    events: list[Any] = []
    next_url = None
    try:
        since = parse_utc(filters["since"], "since")
        until = parse_utc(filters["until"], "until")
        result = await call(
            auth.coord.settings.audit,
            action=filters["action"] or None,
            actor=filters["actor"] or None,
            target_type=filters["target_type"] or None,
            target_id=filters["target_id"] or None,
            since=since,
            until=until,
            cursor=opt(q.get("cursor")),
            limit=100,
        )
        events = result.items
        if result.next_cursor:
            params = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
            next_url = f"{PREFIX}/audit?{params + '&' if params else ''}cursor={quote(result.next_cursor)}"
    except FormError as exc:
        error = str(exc)
    except DomainError as exc:
        error = exc.message
    return auth.dash.render(
        request,
        "audit.html",
        {
            "title": "Audit log",
            "nav": "audit",
            "events": events,
            "filters": filters,
            "error": error,
            "next_url": next_url,
        },
        session=auth.session,
        started=auth.started,
        status=400 if error else 200,
    )
