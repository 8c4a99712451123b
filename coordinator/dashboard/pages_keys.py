"""Setup keys: list, create (form validated like the API) and revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from coordinator.dashboard import data
from coordinator.dashboard.web import (
    EMPTY_KEY_FORM,
    EXPIRY_CHOICES,
    PREFIX,
    Auth,
    Ctx,
    FormError,
    call,
    first,
    log,
)
from coordinator.errors import DomainError
from coordinator.schemas import SetupKeyCreated, SetupKeyIn, SetupKeyUpdate

router = APIRouter(prefix=PREFIX, include_in_schema=False)


async def keys_page(
    auth: Ctx,
    *,
    created: SetupKeyCreated | None = None,
    error: str = "",
    notice: str = "",
    form: dict[str, Any] | None = None,
    status: int = 200,
) -> Response:
    dash = auth.dash

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
async def setup_keys(request: Request, auth: Auth) -> Response:
    notice = "Setup key revoked." if request.query_params.get("done") == "revoked" else ""
    return await keys_page(auth, notice=notice)


@router.post("/setup-keys")
async def create_key(request: Request, auth: Auth) -> Response:
    try:
        fields = await auth.dash.form(request, auth)
    except FormError as exc:
        return await keys_page(auth, error=str(exc), status=400)
    if not auth.session.can_write:
        return auth.dash.forbidden(auth, "This API token is read-only: it cannot create setup keys.")
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
    log.info("dashboard: setup key %r created by %s %s", created.name, auth.session.actor, auth.dash.log_extra(request))
    return await keys_page(auth, created=created, status=201)


@router.post("/setup-keys/{key_id}/revoke")
async def revoke_key(request: Request, auth: Auth, key_id: str) -> Response:
    try:
        await auth.dash.form(request, auth)
    except FormError as exc:
        return await keys_page(auth, error=str(exc), status=400)
    if not auth.session.can_write:
        return auth.dash.forbidden(auth, "This API token is read-only: it cannot revoke setup keys.")
    try:
        out = await call(auth.coord.credentials.update_key, auth.session.actor, key_id, SetupKeyUpdate(revoked=True))
    except DomainError as exc:
        return await keys_page(auth, error=exc.message, status=exc.status)
    log.info("dashboard: setup key %r revoked by %s %s", out.name, auth.session.actor, auth.dash.log_extra(request))
    return auth.dash.redirect(request, PREFIX + "/setup-keys?done=revoked", auth.started)
