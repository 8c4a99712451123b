"""Login and logout: an API token becomes a signed session cookie (CSRF nonce, throttled failures)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from coordinator.dashboard.session import LOGIN_COOKIE, SESSION_COOKIE, csrf_ok, new_login_nonce
from coordinator.dashboard.web import (
    MAX_TOKEN,
    PREFIX,
    Auth,
    Dash,
    Dashboard,
    FormError,
    call,
    first,
    log,
    login,
    read_form,
    safe_next,
    same_origin,
)
from coordinator.errors import RateLimited, Unauthorized

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("")
async def root(request: Request, dash: Dash) -> Response:
    return dash.redirect(request, PREFIX + "/peers")


def login_page(dash: Dashboard, request: Request, started: float, error: str = "", status: int = 200) -> Response:
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
async def login_get(request: Request, dash: Dash) -> Response:
    started = time.perf_counter()
    if await dash.session(request) is not None:
        return dash.redirect(request, safe_next(request.query_params.get("next")), started)
    return login_page(dash, request, started)


@router.post("/login")
async def login_post(request: Request, dash: Dash) -> Response:
    started = time.perf_counter()
    coord = dash.coord(request)
    try:
        fields = await read_form(request)
    except FormError as exc:
        return login_page(dash, request, started, str(exc), 400)
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not same_origin(request) or not nonce or not csrf_ok(nonce, first(fields, "csrf")):
        return login_page(dash, request, started, "The login form expired: please try again.", 400)
    token = first(fields, "token").strip()
    target = safe_next(first(fields, "next"))
    if not token:
        return login_page(dash, request, started, "Enter an API token.", 400)
    source = request.client.host if request.client else ""
    try:
        coord.throttle.check(source, "dashboard")  # before the token is looked at (coordinator.throttle)
    except RateLimited as exc:
        log.warning("dashboard login refused: too many failures %s", dash.log_extra(request))
        wait = exc.retry_after or 1
        response = login_page(
            dash, request, started, f"Too many failed logins from your address: try again in {wait} s.", 429
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
        return login_page(dash, request, started, "That token is not valid (unknown, revoked or expired).", 401)
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
async def logout(request: Request, auth: Auth) -> Response:
    try:
        await auth.dash.form(request, auth)
    except FormError as exc:
        return auth.dash.error_page(auth, 400, str(exc))
    log.info("dashboard logout: actor=%s %s", auth.session.actor, auth.dash.log_extra(request))
    response = auth.dash.redirect(request, PREFIX + "/login", auth.started)
    response.delete_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response
