"""The dashboard's plumbing: templates, security headers, sessions, forms, and authentication as a
FastAPI dependency (`Auth`). The pages live in one module per page group (pages_*.py), each with a
module-level `router`; `coordinator.dashboard.install` mounts them."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from coordinator.dashboard import data
from coordinator.dashboard.live import LiveFeed
from coordinator.dashboard.session import (
    SESSION_COOKIE,
    Session,
    SessionCodec,
    csrf_ok,
    derive_key,
)
from coordinator.errors import Unauthorized
from coordinator.security import hash_secret
from coordinator.service.core import Coordinator
from coordinator.service.tx import utcnow
from coordinator.store.models import ApiToken

log = logging.getLogger("coordinator.dashboard")
T = TypeVar("T")

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
PREFIX = "/dashboard"
STATE_ATTR = "starling_dashboard"  # app.state attribute holding the Dashboard
MAX_TOKEN = 512
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
EXPIRY_CHOICES = (
    ("", "never"),
    ("3600", "1 hour"),
    ("86400", "1 day"),
    ("604800", "7 days"),
    ("2592000", "30 days"),
    ("31536000", "1 year"),
)
EMPTY_KEY_FORM: dict[str, Any] = {
    "name": "",
    "reusable": False,
    "usage_limit": "0",
    "expires_in": "",
    "auto_groups": [],
    "ephemeral": False,
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class FormError(Exception):
    pass


class LoginRequired(Exception):
    """No valid session: the exception handler redirects to the login page (back to `url` after it)."""

    def __init__(self, url: str, started: float) -> None:
        super().__init__(url)
        self.url = url
        self.started = started


def asset_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["when"] = data.fmt_time
    env.filters["iso"] = data.iso
    env.filters["nbytes"] = data.fmt_bytes
    for name in env.list_templates(extensions=["html"]):
        env.get_template(name)  # compile now: no first-request cost, and template errors show at start-up
    return env


@dataclass
class Ctx:
    """One authenticated dashboard request."""

    request: Request
    coord: Coordinator
    session: Session
    started: float
    dash: Dashboard


class Dashboard:
    """Shared state of the dashboard of one FastAPI app (templates, session codec, live feed)."""

    def __init__(self, *, poll_interval: float, session_ttl: int, cookie_secure: bool | None, heartbeat: float) -> None:
        self.env = _env()
        self.feed = LiveFeed(poll_interval)
        self.session_ttl = session_ttl
        self.cookie_secure = cookie_secure
        self.heartbeat = heartbeat
        self.assets = asset_version()
        self._codec: tuple[tuple[int, str], SessionCodec] | None = None

    # ----- plumbing -----------------------------------------------------------------------------
    @staticmethod
    def coord(request: Request) -> Coordinator:
        coord: Coordinator = request.app.state.coordinator
        return coord

    def codec(self, coord: Coordinator) -> SessionCodec:
        # Keyed by the admin token too: rotating it (secrets reload) ends every dashboard session.
        key = (id(coord), coord.admin_token_hash)
        if self._codec is None or self._codec[0] != key:
            self._codec = (key, SessionCodec(derive_key(coord.admin_token_hash), self.session_ttl))
        return self._codec[1]

    def secure(self, request: Request) -> bool:
        return request.url.scheme == "https" if self.cookie_secure is None else self.cookie_secure

    @staticmethod
    def request_id(request: Request) -> str:
        rid = getattr(request.state, "dashboard_request_id", None)
        if rid is None:
            given = request.headers.get("x-request-id", "")
            rid = given if REQUEST_ID.match(given) else secrets.token_hex(8)
            request.state.dashboard_request_id = rid
        return str(rid)

    def finish(
        self,
        request: Request,
        response: Response,
        started: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> Response:
        h = response.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "same-origin"  # "no-referrer" would make Chrome send `Origin: null` on our forms
        h["Cache-Control"] = "no-store"
        h["X-Request-ID"] = self.request_id(request)
        if started is not None:
            parts = [f"{name};dur={sec * 1000:.1f}" for name, sec in (timings or {}).items()]
            parts.append(f"app;dur={(time.perf_counter() - started) * 1000:.1f}")
            h["Server-Timing"] = ", ".join(parts)
        return response

    def render(
        self,
        request: Request,
        template: str,
        ctx: dict[str, Any],
        *,
        session: Session | None,
        started: float,
        status: int = 200,
        live: str = "",
        since: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> Response:
        t0 = time.perf_counter()
        html = self.env.get_template(template).render(
            base=PREFIX,
            assets=self.assets,
            session=session,
            csrf=session.csrf if session else "",
            live=live,
            since=f"{since:.3f}" if since is not None else "",
            **ctx,
        )
        timings = {**(timings or {}), "render": time.perf_counter() - t0}
        return self.finish(request, HTMLResponse(html, status_code=status), started, timings)

    def redirect(self, request: Request, url: str, started: float | None = None) -> Response:
        return self.finish(request, RedirectResponse(url, status_code=303), started)

    def log_extra(self, request: Request) -> str:
        client = request.client.host if request.client else "-"
        return f"client={client} request_id={self.request_id(request)}"

    # ----- authentication -----------------------------------------------------------------------
    async def session(self, request: Request) -> Session | None:
        coord = self.coord(request)
        sess = self.codec(coord).decode(request.cookies.get(SESSION_COOKIE), time.time())
        if sess is None:
            return None
        valid = await run_in_threadpool(session_still_valid, coord, sess)
        return sess if valid else None

    async def auth(self, request: Request) -> Ctx:
        """The authenticated request; `LoginRequired` (answered with a redirect to the login page) if not."""
        started = time.perf_counter()
        sess = await self.session(request)
        if sess is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise LoginRequired(f"{PREFIX}/login?next={quote(target, safe='')}", started)
        return Ctx(request, self.coord(request), sess, started, self)

    async def form(self, request: Request, ctx: Ctx) -> dict[str, list[str]]:
        """The urlencoded body, after the CSRF token and (when sent) the Origin header are checked."""
        fields = await read_form(request)
        if not same_origin(request):
            raise FormError("cross-origin form submission refused")
        if not csrf_ok(ctx.session.csrf, first(fields, "csrf")):
            raise FormError("the form expired or was not sent by this dashboard (CSRF check failed): reload the page")
        return fields

    def forbidden(self, ctx: Ctx, message: str) -> Response:
        log.warning(
            "dashboard: refused %s for %s: %s %s",
            ctx.request.url.path,
            ctx.session.actor,
            message,
            self.log_extra(ctx.request),
        )
        return self.render(
            ctx.request,
            "error.html",
            {"title": "Forbidden", "status": 403, "message": message, "nav": ""},
            session=ctx.session,
            started=ctx.started,
            status=403,
        )

    def error_page(self, ctx: Ctx, status: int, message: str) -> Response:
        return self.render(
            ctx.request,
            "error.html",
            {"title": "Error", "status": status, "message": message, "nav": ""},
            session=ctx.session,
            started=ctx.started,
            status=status,
        )


def session_still_valid(coord: Coordinator, sess: Session) -> bool:
    if not sess.token_id:
        return sess.actor == "admin"
    with coord.store.read() as s:
        row = s.execute(
            select(ApiToken.revoked, ApiToken.expires_at, ApiToken.scope).where(ApiToken.id == sess.token_id)
        ).first()
    if row is None or row[0] or (row[1] is not None and row[1] <= utcnow()):
        return False
    return sess.scope == "read" or row[2] == "write"


def login(coord: Coordinator, token: str) -> tuple[str, str, str, float | None]:
    """(actor, scope, token id, token expiry) for a valid API/admin token; Unauthorized otherwise."""
    caller = coord.credentials.authenticate(token)
    if caller.actor == "admin":
        return caller.actor, caller.scope, "", None
    with coord.store.read() as s:
        row = s.execute(
            select(ApiToken.id, ApiToken.expires_at).where(ApiToken.token_hash == hash_secret(token))
        ).first()
    if row is None:
        raise Unauthorized("API token is not valid")
    return caller.actor, caller.scope, str(row[0]), row[1].timestamp() if row[1] is not None else None


async def read_form(request: Request) -> dict[str, list[str]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError("expected an HTML form (application/x-www-form-urlencoded)")
    body = await request.body()
    try:
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=512)
    except ValueError as exc:
        raise FormError("too many form fields") from exc


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def first(fields: dict[str, list[str]], name: str, default: str = "") -> str:
    values = fields.get(name)
    return values[0] if values else default


def safe_next(target: str | None) -> str:
    if target and target.startswith(PREFIX + "/") and not target.startswith(PREFIX + "/login") and "\\" not in target:
        return target
    return PREFIX + "/peers"


def opt(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def parse_utc(value: str | None, field: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise FormError(f"{field}: not a date and time (YYYY-MM-DDTHH:MM)") from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work (database, graph reads) in the thread pool."""
    return await run_in_threadpool(fn, *args, **kwargs)


def get_dashboard(request: Request) -> Dashboard:
    dash: Dashboard = getattr(request.app.state, STATE_ATTR)
    return dash


async def authenticated(request: Request) -> Ctx:
    return await get_dashboard(request).auth(request)


async def login_required(request: Request, exc: Exception) -> Response:
    """Exception handler for `LoginRequired`."""
    assert isinstance(exc, LoginRequired)
    return get_dashboard(request).redirect(request, exc.url, exc.started)


Dash = Annotated[Dashboard, Depends(get_dashboard)]
Auth = Annotated[Ctx, Depends(authenticated)]
