"""docs/openapi.json is the published API contract: it must match what the code generates."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest

from coordinator.api import contract
from coordinator.api.app import create_app
from coordinator.api.contract import Operation
from coordinator.api.params import parse_iso_datetime
from coordinator.config import CoordinatorConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_committed_openapi_matches_the_code() -> None:
    generated = create_app(CoordinatorConfig()).openapi()
    committed = json.loads(DOC.read_text())
    assert committed == json.loads(json.dumps(generated)), (
        "docs/openapi.json is stale: run `make openapi` and commit the result"
    )


def test_every_operation_is_documented_with_tags_and_errors() -> None:
    spec = json.loads(DOC.read_text())
    assert spec["info"]["title"] == "Starling coordinator"
    for path, ops in spec["paths"].items():
        assert path.startswith(("/api/v1/", "/healthz", "/metrics")), path
        for method, op in ops.items():
            assert op.get("tags"), f"{method.upper()} {path} has no tag"


# ----- the error contract (coordinator/api/contract.py) ---------------------------------------------
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def operations() -> list[tuple[str, str, dict[str, Any], Operation]]:
    app = create_app(CoordinatorConfig())
    spec = app.openapi()
    return [(op.method, op.path, spec["paths"][op.path][op.method.lower()], op) for op in contract.operations(app)]


def test_every_error_response_has_the_shared_error_body() -> None:
    spec = json.loads(DOC.read_text())
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error", "message", "field"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if status[0] in "45":
                    assert response["content"]["application/json"]["schema"] == ERROR_REF, (method, path, status)
                    assert response["description"], (method, path, status)


def test_declared_statuses_follow_the_shape_of_each_operation() -> None:
    ops = operations()
    assert len(ops) > 30
    for method, path, op, shape in ops:
        declared = {int(s) for s in op["responses"] if s[0] in "45"}
        where = f"{method} {path}: {sorted(declared)}"
        if shape.auth != "public":
            assert {401, 429} <= declared, where
        else:  # a public operation is throttled only when it checks a credential of its own
            assert (429 in declared) == (shape.key in contract.CREDENTIAL_IN_BODY), where
            assert 401 not in declared or shape.key in contract.CREDENTIAL_IN_BODY, where
        assert (403 in declared) == (shape.auth == "write" or shape.key in contract.CREDENTIAL_IN_BODY), where
        assert (404 in declared) == bool(shape.path_params), where
        assert (422 in declared) == (shape.has_body or shape.has_query), where
        assert ({400, 413} <= declared) == shape.has_body, where
        if 409 in declared:
            assert shape.key in contract.CONFLICTS and method != "GET", where
        params = {p["in"] for p in op.get("parameters", [])}
        assert ("query" in params) == shape.has_query and ("path" in params) == bool(shape.path_params), where


def test_the_tables_name_real_operations() -> None:
    keys = {shape.key for *_, shape in operations()}
    for table in (contract.CONFLICTS, contract.CREDENTIAL_IN_BODY, contract.RATE_LIMITED):
        assert set(table) <= keys, set(table) - keys


def test_auth_kinds_are_read_off_the_dependencies() -> None:
    kinds = {shape.key: shape.auth for *_, shape in operations()}
    assert kinds["GET /api/v1/peers"] == "read" and kinds["PATCH /api/v1/peers/{peer_id}"] == "write"
    assert kinds["GET /api/v1/tokens"] == "write"  # token listing needs the write scope
    assert kinds["GET /api/v1/peer/map"] == "peer" and kinds["GET /api/v1/signing-key"] == "public"
    assert kinds["POST /api/v1/enroll"] == "public"


def test_docs_error_table_matches_the_declared_statuses() -> None:
    table = (DOC.parent / "api.md").read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d{3}) \|", table, re.MULTILINE)}
    spec = json.loads(DOC.read_text())
    declared = {int(s) for ops in spec["paths"].values() for op in ops.values() for s in op["responses"]}
    assert {400, 401, 403, 404, 409, 413, 422, 429} <= documented
    assert documented - {405} <= declared, documented - declared


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31T12:00:00Z", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
        ("2026-01-31t12:00:00z", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
        ("2026-01-31T13:30:00+01:30", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
        ("2026-01-31 12:00", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
        ("2026-01-31T12:00:00.123456", dt.datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=dt.UTC)),
    ],
)
def test_iso_datetimes(text: str, expected: dt.datetime) -> None:
    assert parse_iso_datetime(text) == expected


@pytest.mark.parametrize(
    "text", ["0.5", "1700000000", "2026-01-31", "20260131T120000Z", "2026-02-30T00:00:00Z", "0001-01-01T00:00+01:00"]
)
def test_not_iso_datetimes(text: str) -> None:
    with pytest.raises(ValueError, match="date and time"):
        parse_iso_datetime(text)
