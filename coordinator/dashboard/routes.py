"""Dashboard pages (server-rendered Jinja2), login/logout, setup-key forms and the live SSE feed."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from coordinator.dashboard import data
from coordinator.dashboard.live import RESYNC, LiveFeed, sse
from coordinator.dashboard.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionCodec,
    csrf_ok,
    derive_key,
    new_login_nonce,
)
from coordinator.errors import DomainError, NotFound, RateLimited, Unauthorized
from coordinator.schemas import SetupKeyCreated, SetupKeyIn, SetupKeyUpdate
from coordinator.security import hash_secret
from coordinator.service.core import Coordinator, utcnow
from coordinator.store.models import ApiToken

log = logging.getLogger("coordinator.dashboard")
T = TypeVar("T")

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
PREFIX = "/dashboard"
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

    async def auth(self, request: Request) -> Ctx | Response:
        started = time.perf_counter()
        sess = await self.session(request)
        if sess is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return self.redirect(request, f"{PREFIX}/login?next={quote(target, safe='')}", started)
        return Ctx(request, self.coord(request), sess, started)

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


def build_router(dash: Dashboard) -> APIRouter:
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    # ----- login / logout -----------------------------------------------------------------------
    @router.get("")
    async def root(request: Request) -> Response:
        return dash.redirect(request, PREFIX + "/peers")

    def login_page(request: Request, started: float, error: str = "", status: int = 200) -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or new_login_nonce()
        target = safe_next(request.query_params.get("next"))
        response = dash.render(
            request,
            "login.html",
            {"title": "Log in", "error": error, "nonce": nonce, "next": target, "nav": ""},
            session=None,
            started=started,
            status=status,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=3600,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=dash.secure(request),
        )
        return response

    @router.get("/login")
    async def login_get(request: Request) -> Response:
        started = time.perf_counter()
        if await dash.session(request) is not None:
            return dash.redirect(request, safe_next(request.query_params.get("next")), started)
        return login_page(request, started)

    @router.post("/login")
    async def login_post(request: Request) -> Response:
        started = time.perf_counter()
        coord = dash.coord(request)
        try:
            fields = await read_form(request)
        except FormError as exc:
            return login_page(request, started, str(exc), 400)
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not same_origin(request) or not nonce or not csrf_ok(nonce, first(fields, "csrf")):
            return login_page(request, started, "The login form expired: please try again.", 400)
        token = first(fields, "token").strip()
        target = safe_next(first(fields, "next"))
        if not token:
            return login_page(request, started, "Enter an API token.", 400)
        source = request.client.host if request.client else ""
        try:
            coord.throttle.check(source, "dashboard")  # before the token is looked at (coordinator.throttle)
        except RateLimited as exc:
            log.warning("dashboard login refused: too many failures %s", dash.log_extra(request))
            wait = exc.retry_after or 1
            response = login_page(
                request, started, f"Too many failed logins from your address: try again in {wait} s.", 429
            )
            response.headers["Retry-After"] = str(wait)
            return response
        try:
            if len(token) > MAX_TOKEN:
                raise Unauthorized("token too long")
            actor, scope, token_id, not_after = await call(login, coord, token)
        except Unauthorized:
            coord.throttle.failure(source, "dashboard")
            log.warning("dashboard login failed: invalid token %s", dash.log_extra(request))
            return login_page(request, started, "That token is not valid (unknown, revoked or expired).", 401)
        value, sess = dash.codec(coord).issue(
            actor, "write" if scope == "write" else "read", token_id, time.time(), not_after
        )
        log.info("dashboard login: actor=%s scope=%s %s", actor, sess.scope, dash.log_extra(request))
        response = dash.redirect(request, target, started)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=max(1, sess.expires_at - int(time.time())),
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=dash.secure(request),
        )
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        try:
            await dash.form(request, auth)
        except FormError as exc:
            return dash.error_page(auth, 400, str(exc))
        log.info("dashboard logout: actor=%s %s", auth.session.actor, dash.log_extra(request))
        response = dash.redirect(request, PREFIX + "/login", auth.started)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return response

    # ----- peers --------------------------------------------------------------------------------
    @router.get("/peers")
    async def peers(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        q = request.query_params
        status = q.get("status", "")
        connected = {"online": True, "offline": False}.get(status)
        name, group, cursor = opt(q.get("name")), opt(q.get("group")), opt(q.get("cursor"))
        try:
            limit = int(q.get("limit", data.PAGE_MAX))
        except ValueError:
            limit = data.PAGE_MAX
        await dash.feed.ensure_started(auth.coord)
        since = time.time()

        def load() -> tuple[list[data.PeerRow], str | None, tuple[int, int], list[str]]:
            rows, nxt = data.list_peers(
                auth.coord, name=name, group=group, connected=connected, cursor=cursor, limit=limit
            )
            return rows, nxt, data.counts(auth.coord), data.group_names(auth.coord)

        t0 = time.perf_counter()
        rows, nxt, (total, online), groups = await call(load)
        timings = {"db": time.perf_counter() - t0}
        filters = {"name": name or "", "group": group or "", "status": status}
        next_url = None
        if nxt:
            params = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
            next_url = f"{PREFIX}/peers?{params + '&' if params else ''}cursor={quote(nxt)}&limit={limit}"
        return dash.render(
            request,
            "peers.html",
            {
                "title": "Peers",
                "nav": "peers",
                "peers": rows,
                "total": total,
                "online": online,
                "groups": groups,
                "filters": filters,
                "next_url": next_url,
                "filtered": any(filters.values()) or bool(cursor),
            },
            session=auth.session,
            started=auth.started,
            live="peers",
            since=since,
            timings=timings,
        )

    @router.get("/peers/{peer_id}/connections")
    async def peer_connections(request: Request, peer_id: str) -> Response:
        """HTML fragment: the first connections of one peer (loaded when a row of the peers list opens)."""
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth

        def load() -> tuple[str, list[data.Conn], int]:
            out = auth.coord.peers.get(peer_id)
            names = data.peer_names(auth.coord)
            raw = [c.model_dump(mode="json") for c in out.connections]
            raw.sort(key=lambda c: (data.PATH_RANK.get(str(c.get("path")), 9), names.get(str(c.get("peer_id")), "")))
            shown = raw[: data.LIST_CONNECTIONS]
            return out.name, [data.conn_from(c, names) for c in shown], len(raw) - len(shown)

        try:
            name, conns, more = await call(load)
        except NotFound:
            return dash.error_page(auth, 404, "No such peer (it may have been removed).")
        return dash.render(
            request,
            "connections.html",
            {"title": "Connections", "nav": "", "name": name, "peer_id": peer_id, "conns": conns, "more": more},
            session=auth.session,
            started=auth.started,
        )

    @router.get("/peers/{peer_id}")
    async def peer(request: Request, peer_id: str) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        await dash.feed.ensure_started(auth.coord)
        since = time.time()

        def load() -> tuple[Any, list[data.Conn], list[data.Reach]]:
            out = auth.coord.peers.get(peer_id)
            names = data.peer_names(auth.coord)
            conns = [data.conn_from(c.model_dump(mode="json"), names) for c in out.connections]
            conns.sort(key=lambda c: (data.PATH_RANK.get(c.path, 9), c.peer_name))
            policies = {p.id: p.name for p in auth.coord.policies.find(name=None, cursor=None, limit=1000).items}
            try:
                reach = data.reachability(auth.coord, peer_id, policies)
            except KeyError:
                reach = []
            return out, conns, reach

        try:
            out, conns, reach = await call(load)
        except NotFound:
            return dash.error_page(auth, 404, "No such peer (it may have been removed).")
        return dash.render(
            request,
            "peer.html",
            {
                "title": f"Peer {out.name}",
                "nav": "peers",
                "peer": out,
                "conns": conns,
                "reach": reach,
                "summary": data.path_summary([c.model_dump() for c in out.connections]),
            },
            session=auth.session,
            started=auth.started,
            live="peer",
            since=since,
        )

    # ----- mesh ---------------------------------------------------------------------------------
    @router.get("/mesh")
    async def mesh(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        await dash.feed.ensure_started(auth.coord)
        since = time.time()
        t0 = time.perf_counter()
        view = await call(data.mesh_view, auth.coord)
        timings = {"db": time.perf_counter() - t0}
        return dash.render(
            request,
            "mesh.html",
            {"title": "Mesh", "nav": "mesh", "view": view, "paths": data.PATHS},
            session=auth.session,
            started=auth.started,
            live="mesh",
            since=since,
            timings=timings,
        )

    # ----- groups, policies and reachability ----------------------------------------------------
    @router.get("/access")
    async def access(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        chosen = opt(request.query_params.get("peer"))

        def load() -> dict[str, Any]:
            c = auth.coord
            groups = c.groups.find(name=None, cursor=None, limit=1000).items
            policies = c.policies.find(name=None, cursor=None, limit=1000).items
            choices = data.peer_choices(c)
            reach: list[data.Reach] | None = None
            peer_name = ""
            peer_groups: list[str] = []
            applies: list[str] = []
            if chosen:
                with c.lock:
                    node = c.graph.peers.get(chosen)
                    if node is not None:
                        peer_name = node.name
                        peer_groups = sorted(c.graph.group_names.get(g, g) for g in node.groups)
                if peer_name:
                    try:
                        reach = data.reachability(c, chosen, {p.id: p.name for p in policies})
                    except KeyError:  # removed a moment ago
                        peer_name = ""
                    mine = set(peer_groups)
                    applies = [
                        p.name
                        for p in policies
                        if mine & set(p.sources.groups + p.destinations.groups)
                        or peer_name in p.sources.peers + p.destinations.peers
                    ]
            return {
                "groups": groups,
                "policies": policies,
                "choices": choices,
                "reach": reach,
                "peer_name": peer_name,
                "peer_groups": peer_groups,
                "applies": applies,
            }

        ctx = await call(load)
        if chosen and not ctx["peer_name"]:
            return dash.error_page(auth, 404, "No such peer (it may have been removed).")
        return dash.render(
            request,
            "access.html",
            {"title": "Groups & policies", "nav": "access", "chosen": chosen or "", **ctx},
            session=auth.session,
            started=auth.started,
        )

    # ----- setup keys ---------------------------------------------------------------------------
    async def keys_page(
        auth: Ctx,
        *,
        created: SetupKeyCreated | None = None,
        error: str = "",
        notice: str = "",
        form: dict[str, Any] | None = None,
        status: int = 200,
    ) -> Response:
        def load() -> tuple[list[Any], list[str]]:
            return (
                auth.coord.credentials.list_keys(cursor=None, limit=1000).items,
                data.group_names(auth.coord),
            )

        keys, groups = await call(load)
        return dash.render(
            auth.request,
            "setup_keys.html",
            {
                "title": "Setup keys",
                "nav": "keys",
                "keys": keys,
                "groups": groups,
                "created": created,
                "error": error,
                "notice": notice,
                "form": {**EMPTY_KEY_FORM, **(form or {})},
                "expiry_choices": EXPIRY_CHOICES,
            },
            session=auth.session,
            started=auth.started,
            status=status,
        )

    @router.get("/setup-keys")
    async def setup_keys(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        notice = "Setup key revoked." if request.query_params.get("done") == "revoked" else ""
        return await keys_page(auth, notice=notice)

    @router.post("/setup-keys")
    async def create_key(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        try:
            fields = await dash.form(request, auth)
        except FormError as exc:
            return await keys_page(auth, error=str(exc), status=400)
        if not auth.session.can_write:
            return dash.forbidden(auth, "This API token is read-only: it cannot create setup keys.")
        form: dict[str, Any] = {
            "name": first(fields, "name").strip(),
            "reusable": first(fields, "reusable") == "on",
            "usage_limit": first(fields, "usage_limit", "0").strip() or "0",
            "expires_in": first(fields, "expires_in"),
            "auto_groups": [g for g in fields.get("auto_groups", []) if g],
            "ephemeral": first(fields, "ephemeral") == "on",
        }
        try:
            body = SetupKeyIn.model_validate(
                {**form, "expires_in": int(form["expires_in"]) if form["expires_in"] else None}, strict=False
            )
        except (ValidationError, ValueError) as exc:
            message = "invalid value"
            if isinstance(exc, ValidationError) and exc.errors():
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err.get("loc", ()))
                message = f"{where}: {err.get('msg', 'invalid value')}" if where else str(err.get("msg"))
            return await keys_page(auth, error=message, form=form, status=422)
        try:
            created = await call(auth.coord.credentials.create_key, auth.session.actor, body)
        except DomainError as exc:
            return await keys_page(auth, error=exc.message, form=form, status=exc.status)
        log.info("dashboard: setup key %r created by %s %s", created.name, auth.session.actor, dash.log_extra(request))
        return await keys_page(auth, created=created, status=201)

    @router.post("/setup-keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: str) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        try:
            await dash.form(request, auth)
        except FormError as exc:
            return await keys_page(auth, error=str(exc), status=400)
        if not auth.session.can_write:
            return dash.forbidden(auth, "This API token is read-only: it cannot revoke setup keys.")
        try:
            out = await call(
                auth.coord.credentials.update_key, auth.session.actor, key_id, SetupKeyUpdate(revoked=True)
            )
        except DomainError as exc:
            return await keys_page(auth, error=exc.message, status=exc.status)
        log.info("dashboard: setup key %r revoked by %s %s", out.name, auth.session.actor, dash.log_extra(request))
        return dash.redirect(request, PREFIX + "/setup-keys?done=revoked", auth.started)

    # ----- audit log ----------------------------------------------------------------------------
    @router.get("/audit")
    async def audit(request: Request) -> Response:
        auth = await dash.auth(request)
        if isinstance(auth, Response):
            return auth
        q = request.query_params
        filters = {
            k: (q.get(k) or "").strip() for k in ("action", "actor", "target_type", "target_id", "since", "until")
        }
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
        return dash.render(
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

    # ----- live updates -------------------------------------------------------------------------
    @router.get("/events")
    async def events(request: Request) -> Response:
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

    return router
