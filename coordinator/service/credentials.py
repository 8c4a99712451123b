"""Setup keys and API tokens (stored hashed, clear value returned once), and API caller authentication."""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Forbidden, NotFound, Unauthorized
from coordinator.schemas import (
    Page,
    SetupKeyCreated,
    SetupKeyIn,
    SetupKeyOut,
    SetupKeyUpdate,
    TokenCreated,
    TokenIn,
    TokenOut,
    TokenUpdate,
)
from coordinator.security import API_TOKEN_PREFIX, SETUP_KEY_PREFIX, hash_secret, new_id, new_secret
from coordinator.service.context import ServiceContext
from coordinator.service.lookup import group_ids, group_names, page
from coordinator.service.peers import setup_key_state
from coordinator.service.tx import Tx, utcnow
from coordinator.store.models import ApiToken, SetupKey


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated API caller."""

    actor: str
    scope: Literal["read", "write"]

    def require_write(self) -> None:
        if self.scope != "write":
            raise Forbidden("this token is read-only")


def key_out(session: Session, key: SetupKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "reusable": key.reusable,
        "usage_limit": key.usage_limit,
        "used_count": key.used_count,
        "auto_groups": group_names(session, key.auto_groups),
        "ephemeral": key.ephemeral,
        "revoked": key.revoked,
        "expires_at": key.expires_at,
        "last_used": key.last_used,
        "created_at": key.created_at,
        "state": setup_key_state(key, utcnow()),
    }


def token_out(tok: ApiToken) -> dict[str, Any]:
    return {
        "id": tok.id,
        "name": tok.name,
        "prefix": tok.prefix,
        "scope": tok.scope,
        "revoked": tok.revoked,
        "expires_at": tok.expires_at,
        "last_used": tok.last_used,
        "created_at": tok.created_at,
    }


def _public(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in data.items() if k != "id"}


class CredentialService:
    def __init__(self, coord: ServiceContext) -> None:
        self.ctx = coord

    # ----- authentication ---------------------------------------------------------------------
    def authenticate(self, token: str) -> Caller:
        if hmac.compare_digest(hash_secret(token), self.ctx.admin_token_hash):
            return Caller(actor="admin", scope="write")
        if not token.startswith(API_TOKEN_PREFIX):
            raise Unauthorized("API token is not valid")
        now = utcnow()
        with self.ctx.store.read() as s:
            tok = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(token)))
            if tok is None or tok.revoked or (tok.expires_at is not None and tok.expires_at <= now):
                raise Unauthorized("API token is not valid (unknown, revoked or expired)")
            actor, scope, tok_id, last = f"token:{tok.name}", tok.scope, tok.id, tok.last_used
        if last is None or now - last > dt.timedelta(minutes=1):
            with self.ctx.store.transaction() as s:
                s.execute(update(ApiToken).where(ApiToken.id == tok_id).values(last_used=now))
        return Caller(actor=actor, scope="write" if scope == "write" else "read")

    # ----- setup keys -------------------------------------------------------------------------
    def list_keys(self, cursor: str | None, limit: int) -> Page[SetupKeyOut]:
        with self.ctx.store.read() as s:
            rows, nxt = page(s, select(SetupKey), SetupKey.name, cursor, limit)
            return Page[SetupKeyOut](items=[SetupKeyOut(**key_out(s, k)) for k in rows], next_cursor=nxt)

    def get_key(self, key_id: str) -> SetupKeyOut:
        with self.ctx.store.read() as s:
            key = s.get(SetupKey, key_id)
            if key is None:
                raise NotFound("setup key", key_id)
            return SetupKeyOut(**key_out(s, key))

    def create_key(self, actor: str, body: SetupKeyIn) -> SetupKeyCreated:
        def run(tx: Tx) -> SetupKeyCreated:
            s = tx.session
            if s.scalar(select(SetupKey.id).where(SetupKey.name == body.name)):
                raise Conflict(f"setup key {body.name!r} already exists", field="name")
            secret = new_secret(SETUP_KEY_PREFIX)
            now = utcnow()
            key = SetupKey(
                id=new_id(),
                name=body.name,
                key_hash=secret.hash,
                prefix=secret.display_prefix,
                reusable=body.reusable,
                usage_limit=body.usage_limit if body.reusable else 1,
                used_count=0,
                auto_groups=group_ids(s, body.auto_groups, "auto_groups"),
                ephemeral=body.ephemeral,
                revoked=False,
                expires_at=now + dt.timedelta(seconds=body.expires_in) if body.expires_in else None,
                created_at=now,
            )
            s.add(key)
            s.flush()
            data = key_out(s, key)
            tx.audit("setup_key.create", "setup_key", key.id, key.name, None, _public(data))
            return SetupKeyCreated(**data, key=secret.clear)

        return self.ctx.write(actor, run)

    def update_key(self, actor: str, key_id: str, body: SetupKeyUpdate) -> SetupKeyOut:
        def run(tx: Tx) -> SetupKeyOut:
            s = tx.session
            key = s.get(SetupKey, key_id)
            if key is None:
                raise NotFound("setup key", key_id)
            before = _public(key_out(s, key))
            if body.revoked is not None:
                if key.revoked and not body.revoked:
                    raise Conflict("a revoked setup key cannot be reinstated: create a new one", field="revoked")
                key.revoked = body.revoked
            if body.auto_groups is not None:
                key.auto_groups = group_ids(s, body.auto_groups, "auto_groups")
            data = key_out(s, key)
            if _public(data) != before:
                action = "setup_key.revoke" if body.revoked and not before["revoked"] else "setup_key.update"
                tx.audit(action, "setup_key", key.id, key.name, before, _public(data))
            return SetupKeyOut(**data)

        return self.ctx.write(actor, run)

    def delete_key(self, actor: str, key_id: str) -> None:
        def run(tx: Tx) -> None:
            key = tx.session.get(SetupKey, key_id)
            if key is None:
                raise NotFound("setup key", key_id)
            before = _public(key_out(tx.session, key))
            tx.session.delete(key)
            tx.audit("setup_key.delete", "setup_key", key_id, key.name, before, None)

        self.ctx.write(actor, run)

    # ----- API tokens -------------------------------------------------------------------------
    def list_tokens(self, cursor: str | None, limit: int) -> Page[TokenOut]:
        with self.ctx.store.read() as s:
            rows, nxt = page(s, select(ApiToken), ApiToken.name, cursor, limit)
            return Page[TokenOut](items=[TokenOut(**token_out(t)) for t in rows], next_cursor=nxt)

    def get_token(self, token_id: str) -> TokenOut:
        with self.ctx.store.read() as s:
            tok = s.get(ApiToken, token_id)
            if tok is None:
                raise NotFound("token", token_id)
            return TokenOut(**token_out(tok))

    def create_token(self, actor: str, body: TokenIn) -> TokenCreated:
        def run(tx: Tx) -> TokenCreated:
            s = tx.session
            if s.scalar(select(ApiToken.id).where(ApiToken.name == body.name)):
                raise Conflict(f"token {body.name!r} already exists", field="name")
            secret = new_secret(API_TOKEN_PREFIX)
            now = utcnow()
            tok = ApiToken(
                id=new_id(),
                name=body.name,
                token_hash=secret.hash,
                prefix=secret.display_prefix,
                scope=body.scope,
                revoked=False,
                expires_at=now + dt.timedelta(seconds=body.expires_in) if body.expires_in else None,
                created_at=now,
            )
            s.add(tok)
            s.flush()
            data = token_out(tok)
            tx.audit("token.create", "token", tok.id, tok.name, None, _public(data))
            return TokenCreated(**data, token=secret.clear)

        return self.ctx.write(actor, run)

    def update_token(self, actor: str, token_id: str, body: TokenUpdate) -> TokenOut:
        def run(tx: Tx) -> TokenOut:
            tok = tx.session.get(ApiToken, token_id)
            if tok is None:
                raise NotFound("token", token_id)
            before = _public(token_out(tok))
            if body.revoked is not None:
                if tok.revoked and not body.revoked:
                    raise Conflict("a revoked token cannot be reinstated: create a new one", field="revoked")
                tok.revoked = body.revoked
            after = _public(token_out(tok))
            if after != before:
                tx.audit("token.revoke", "token", tok.id, tok.name, before, after)
            return TokenOut(**token_out(tok))

        return self.ctx.write(actor, run)

    def delete_token(self, actor: str, token_id: str) -> None:
        def run(tx: Tx) -> None:
            tok = tx.session.get(ApiToken, token_id)
            if tok is None:
                raise NotFound("token", token_id)
            tx.session.delete(tok)
            tx.audit("token.delete", "token", token_id, tok.name, _public(token_out(tok)), None)

        self.ctx.write(actor, run)
