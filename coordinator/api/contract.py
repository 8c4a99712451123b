"""The API's error contract, declared in one place for every operation of the OpenAPI document.

Every error response has the same JSON body, `ErrorBody` (`{"error", "message", "field"}`, see
docs/api.md). Which statuses an operation declares follows from its shape, read off the route:

* who may call it: an API token (`read`: any scope, `write`: write scope), a peer credential, or
  nobody in particular (public), from the route's authentication dependency;
* whether it looks an id up in its path (404), takes query parameters (422) or a JSON body
  (400 invalid JSON, 413 too large, 422 invalid);
* small tables for what the shape cannot tell: the writes that can conflict (409), the public
  operations that check a credential in their body (403 and 429: enrollment) and the operations
  with a rate limit of their own (429).

Authenticated operations declare 401 and 429 (failed authentications are throttled); write-scoped
ones 403 (a read-only token). A route may declare a status itself (`responses=`): its description
is kept and the error body added. `install(app)` post-processes the generated document once: it
replaces FastAPI's default 422 (`HTTPValidationError`, not what the API returns).

Two request-level rules of the contract live here too: `no_nul_in_json` (an app-wide dependency) and
`allowed_methods` (the `Allow` header of every 405).
"""

from __future__ import annotations

import functools
import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import compile_path

from coordinator.api import deps
from coordinator.errors import Invalid
from coordinator.schemas import ErrorBody

Auth = Literal["public", "read", "write", "peer"]
API_PREFIX = "/api/v1/"
ERROR_SCHEMA = "ErrorBody"
ERROR_REF = "#/components/schemas/" + ERROR_SCHEMA
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

# Writes that can conflict with the state of the mesh (409 `conflict`), with the reason.
CONFLICTS: dict[str, str] = {
    "PATCH /api/v1/peers/{peer_id}": "the new peer name is taken",
    "POST /api/v1/groups": "a group with this name exists",
    "PATCH /api/v1/groups/{group_id}": "a group with the new name exists",
    "DELETE /api/v1/groups/{group_id}": "the group is used by a policy or a route, or is an auto-group of a setup key",
    "POST /api/v1/policies": "a policy with this name exists",
    "PATCH /api/v1/policies/{policy_id}": "a policy with the new name exists",
    "POST /api/v1/routes": "a route with this name exists",
    "PATCH /api/v1/routes/{route_id}": "a route with the new name exists",
    "DELETE /api/v1/routes/{route_id}": "the route is named by a policy",
    "POST /api/v1/setup-keys": "a setup key with this name exists",
    "PATCH /api/v1/setup-keys/{key_id}": "a revoked setup key cannot be reinstated",
    "POST /api/v1/tokens": "a token with this name exists",
    "PATCH /api/v1/tokens/{token_id}": "a revoked token cannot be reinstated",
    "PATCH /api/v1/settings": "a new mesh_prefix leaves peers' addresses outside it",
    "POST /api/v1/secrets/reload": "the coordinator was started without a secret source",
    "POST /api/v1/enroll": "the requested peer name is taken, or the mesh prefix is full",
    "POST /api/v1/peer/key": "the previous key is not the one the coordinator holds, or the key is taken",
}
# Public operations that check a credential in their body (403 `forbidden` when it is refused; failures
# are throttled like failed authentications: 429).
CREDENTIAL_IN_BODY: dict[str, str] = {
    "POST /api/v1/enroll": "setup key unknown, expired, revoked or used up",
}

DESCRIPTIONS: dict[int, str] = {
    400: "`invalid_json`: the request body is not JSON",
    401: "`unauthorized`: missing, unknown, revoked or expired token or credential",
    403: "`forbidden`: this API token is read-only",
    404: "`not_found`: no such {what}",
    409: "`conflict`: {why}",
    413: "`payload_too_large`: the body is larger than `limits.max_body_bytes`",
    422: "`validation_error` or `unknown_reference`: {where} (`field` names it)",
    429: "`rate_limited`: too many failed authentications from this client (see `Retry-After`){more}",
}
RATE_LIMITED: dict[str, str] = {
    "POST /api/v1/peer/state": "state reports faster than `limits.state_report_interval`",
    "POST /api/v1/peer/events": "more than 10 events per minute from this peer",
}


@dataclass(frozen=True, slots=True)
class Operation:
    """What the error contract needs to know about one method of one route."""

    method: str
    path: str
    auth: Auth
    path_params: tuple[str, ...] = ()
    has_query: bool = False
    has_body: bool = False

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def _query_params(dependant: Dependant) -> bool:
    return bool(dependant.query_params) or any(_query_params(d) for d in dependant.dependencies)


def _routes(app: FastAPI) -> Iterator[Any]:
    """The app's routes as FastAPI's OpenAPI generator sees them: route contexts of included routers in
    recent FastAPI (`iter_route_contexts`, with the effective path), the routes themselves in older ones."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from iter_contexts(app.routes) if iter_contexts is not None else app.routes


def _api_routes(app: FastAPI) -> Iterator[Any]:
    for route in _routes(app):
        if isinstance(getattr(route, "original_route", route), APIRoute):
            yield route


# A JSON string escape for U+0000: `\u0000` after an even number of backslashes (so not `\\u0000`).
NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


async def no_nul_in_json(request: Request) -> None:
    """App-wide dependency: a JSON body whose strings hold NUL (U+0000) is refused with 422. PostgreSQL
    cannot store NUL in text or JSON columns (it answered 500), and no field of this API needs it; a raw
    NUL byte is not valid JSON in the first place (400)."""
    if "json" not in request.headers.get("content-type", "").lower():
        return
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return  # the operation takes no body: it ignores whatever was sent
    if NUL_ESCAPE.search(await request.body()):
        raise Invalid("a string in the request body contains NUL (\\u0000), which is not allowed")


@functools.lru_cache(maxsize=512)
def _path_regex(path_format: str) -> re.Pattern[str]:
    return compile_path(path_format)[0]


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of `app` serves at `path`: the `Allow` header of a 405 (RFC 9110). FastAPI
    has one route per method, and Starlette's own 405 names only the first route's methods."""
    methods: set[str] = set()
    for route in _routes(app):
        path_format, route_methods = getattr(route, "path_format", None), getattr(route, "methods", None)
        if path_format and route_methods and _path_regex(path_format).match(path):
            methods |= set(route_methods)
    return sorted(methods)


def auth_of(route: Any) -> Auth:
    calls = set(_calls(route.dependant))
    if deps.api_writer in calls:
        return "write"
    if deps.api_caller in calls:
        return "read"
    if deps.peer_caller in calls:
        return "peer"
    return "public"


def operations(app: FastAPI) -> Iterator[Operation]:
    """Every documented /api/v1 operation of `app`."""
    for route in _api_routes(app):
        if not route.include_in_schema or not route.path_format.startswith(API_PREFIX):
            continue
        for method in sorted(route.methods):
            yield Operation(
                method=method,
                path=route.path_format,
                auth=auth_of(route),
                path_params=tuple(p.name for p in route.dependant.path_params),
                has_query=_query_params(route.dependant),
                has_body=route.body_field is not None,
            )


def error_responses(op: Operation) -> dict[int, str]:
    """The error statuses `op` can return, each with what it means there."""
    out: dict[int, str] = {}
    if op.has_body:
        out[400] = DESCRIPTIONS[400]
    if op.auth != "public":
        out[401] = DESCRIPTIONS[401]
    if op.auth == "write":
        out[403] = DESCRIPTIONS[403]
    if op.key in CREDENTIAL_IN_BODY:
        out[403] = f"`forbidden`: {CREDENTIAL_IN_BODY[op.key]}"
    if op.path_params:
        what = op.path_params[-1].removesuffix("_id").replace("_", " ")
        out[404] = DESCRIPTIONS[404].format(what=what)
    if op.key in CONFLICTS:
        out[409] = DESCRIPTIONS[409].format(why=CONFLICTS[op.key])
    if op.has_body:
        out[413] = DESCRIPTIONS[413]
    if op.has_body or op.has_query:
        where = " or ".join(w for w, has in (("query parameter", op.has_query), ("body field", op.has_body)) if has)
        out[422] = DESCRIPTIONS[422].format(where=f"an invalid {where}")
    if op.auth != "public" or op.key in CREDENTIAL_IN_BODY or op.key in RATE_LIMITED:
        more = f"; {RATE_LIMITED[op.key]}" if op.key in RATE_LIMITED else ""
        out[429] = DESCRIPTIONS[429].format(more=more)
    return out


def _error_response(description: str, status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
    }
    if status == 429:
        response["headers"] = {
            "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
        }
    return response


def declare_errors(schema: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    """Add the error responses of every /api/v1 operation to `schema` (a generated OpenAPI document)."""
    for op in operations(app):
        operation = schema.get("paths", {}).get(op.path, {}).get(op.method.lower())
        if operation is None:
            continue
        responses: dict[str, Any] = operation.setdefault("responses", {})
        default_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
        if default_422.get("$ref", "").endswith("/HTTPValidationError"):
            del responses["422"]
        for code, description in error_responses(op).items():
            given = responses.get(str(code), {}).get("description")
            own = given not in (None, "Validation Error", http.client.responses.get(code))
            responses[str(code)] = _error_response(given if own else description, code)
        for status, response in responses.items():  # statuses a route declares itself (e.g. 503)
            if status[:1] in ("4", "5") and "content" not in response:
                responses[status] = _error_response(response.get("description", ""), int(status))
        operation["responses"] = dict(sorted(responses.items()))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components[ERROR_SCHEMA] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    # FastAPI's own validation schemas stay only if something still refers to them (checked in order:
    # HTTPValidationError refers to ValidationError).
    removed = {name: components.pop(name) for name in FASTAPI_VALIDATION_SCHEMAS if name in components}
    for name, definition in removed.items():
        if f'"#/components/schemas/{name}"' in json.dumps(schema):
            components[name] = definition
    return schema


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and so `/openapi.json` and `make openapi`) declare the error contract."""
    generate = app.openapi
    done: list[dict[str, Any]] = []  # the document already processed (FastAPI caches it)

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not done or done[0] is not schema:
            done[:] = [declare_errors(schema, app)]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
