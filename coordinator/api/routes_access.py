"""Admin API: setup keys, API tokens, mesh settings and the audit log."""

from __future__ import annotations

from fastapi import APIRouter, Response

from coordinator.api.deps import Coord, Reader, Writer
from coordinator.api.params import ActionFilter, AuditCursor, Cursor, Filter, Limit, Since, Until
from coordinator.schemas import (
    AuditOut,
    Page,
    SettingsOut,
    SettingsUpdate,
    SetupKeyCreated,
    SetupKeyIn,
    SetupKeyOut,
    SetupKeyUpdate,
    TokenCreated,
    TokenIn,
    TokenOut,
    TokenUpdate,
)

router = APIRouter(prefix="/api/v1")


@router.get("/setup-keys", tags=["setup-keys"])
def list_setup_keys(coord: Coord, _: Reader, cursor: Cursor = None, limit: Limit = 100) -> Page[SetupKeyOut]:
    return coord.credentials.list_keys(cursor, limit)


@router.post("/setup-keys", status_code=201, tags=["setup-keys"])
def create_setup_key(coord: Coord, caller: Writer, body: SetupKeyIn) -> SetupKeyCreated:
    """Creates a setup key; the clear key is in this response only (store it now)."""
    return coord.credentials.create_key(caller.actor, body)


@router.get("/setup-keys/{key_id}", tags=["setup-keys"])
def get_setup_key(coord: Coord, _: Reader, key_id: str) -> SetupKeyOut:
    return coord.credentials.get_key(key_id)


@router.patch("/setup-keys/{key_id}", tags=["setup-keys"])
def update_setup_key(coord: Coord, caller: Writer, key_id: str, body: SetupKeyUpdate) -> SetupKeyOut:
    return coord.credentials.update_key(caller.actor, key_id, body)


@router.delete("/setup-keys/{key_id}", status_code=204, tags=["setup-keys"])
def delete_setup_key(coord: Coord, caller: Writer, key_id: str) -> Response:
    coord.credentials.delete_key(caller.actor, key_id)
    return Response(status_code=204)


@router.get("/tokens", tags=["tokens"])
def list_tokens(coord: Coord, _: Writer, cursor: Cursor = None, limit: Limit = 100) -> Page[TokenOut]:
    return coord.credentials.list_tokens(cursor, limit)


@router.post("/tokens", status_code=201, tags=["tokens"])
def create_token(coord: Coord, caller: Writer, body: TokenIn) -> TokenCreated:
    """Creates an API token; the clear token is in this response only."""
    return coord.credentials.create_token(caller.actor, body)


@router.get("/tokens/{token_id}", tags=["tokens"])
def get_token(coord: Coord, _: Writer, token_id: str) -> TokenOut:
    return coord.credentials.get_token(token_id)


@router.patch("/tokens/{token_id}", tags=["tokens"])
def update_token(coord: Coord, caller: Writer, token_id: str, body: TokenUpdate) -> TokenOut:
    return coord.credentials.update_token(caller.actor, token_id, body)


@router.delete("/tokens/{token_id}", status_code=204, tags=["tokens"])
def delete_token(coord: Coord, caller: Writer, token_id: str) -> Response:
    coord.credentials.delete_token(caller.actor, token_id)
    return Response(status_code=204)


@router.get("/settings", tags=["settings"])
def get_settings(coord: Coord, _: Reader) -> SettingsOut:
    return coord.settings.get()


@router.patch("/settings", tags=["settings"])
def update_settings(coord: Coord, caller: Writer, body: SettingsUpdate) -> SettingsOut:
    return coord.settings.update(caller.actor, body)


@router.post(
    "/secrets/reload",
    tags=["settings"],
    responses={503: {"description": "the secret source (Vault) cannot be read; nothing changed"}},
)
def reload_secrets(coord: Coord, caller: Writer) -> dict[str, list[str]]:
    """Read the coordinator's secrets again from their source after a rotation (docs/vault.md):
    `changed` lists what took effect now (turn_secret, admin_token), `restart_required` what needs a
    restart (signing_key). Audited as `secrets.reload`; never returns a secret."""
    return coord.reload_secrets(caller.actor)


@router.get("/audit", tags=["audit"])
def list_audit(
    coord: Coord,
    _: Reader,
    action: ActionFilter = None,
    actor: Filter = None,
    target_type: Filter = None,
    target_id: Filter = None,
    since: Since = None,
    until: Until = None,
    cursor: AuditCursor = None,
    limit: Limit = 100,
) -> Page[AuditOut]:
    return coord.settings.audit(
        action=action,
        actor=actor,
        target_type=target_type,
        target_id=target_id,
        since=since,
        until=until,
        cursor=cursor,
        limit=limit,
    )
