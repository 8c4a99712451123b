"""Query parameter types of the REST API: every one is validated by type and format, and a wrong value
gives 422 with the standard error body (`field` names the parameter). Their schemas are published in
docs/openapi.json, so what a client reads there is exactly what the server accepts."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from fastapi import Query
from pydantic import BeforeValidator, WithJsonSchema

# RFC 3339 / ISO 8601 extended format: date, `T` (or a space), time to at least minutes, optional
# fraction, optional offset (`Z` or ±HH:MM). No bare numbers (unix times), no week or ordinal dates.
ISO_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([Zz]|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
# Printable text only in filters: control characters can never match a stored name, and PostgreSQL
# refuses NUL in a text parameter (which would otherwise surface as a 500).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
DATETIME_DOC = (
    "ISO 8601 date and time, e.g. `2026-01-31T12:00:00Z` or `2026-01-31T13:00:00+01:00`; without an offset it is UTC"
)


def parse_iso_datetime(value: Any) -> dt.datetime:
    """An aware datetime from an ISO 8601 string (naive = UTC); ValueError for anything else."""
    if isinstance(value, dt.datetime):
        when = value
    else:
        if not isinstance(value, str) or not ISO_DATETIME.fullmatch(value):
            raise ValueError("expected an ISO 8601 date and time such as 2026-01-31T12:00:00Z")
        try:
            when = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not a valid date and time: {exc}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        return when.astimezone(dt.UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("date and time out of range") from exc


IsoDateTime = Annotated[
    dt.datetime,
    BeforeValidator(parse_iso_datetime),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]

Limit = Annotated[int, Query(ge=1, le=1000, description="Page size (1-1000)")]
Cursor = Annotated[
    str | None,
    Query(max_length=255, pattern=PRINTABLE, description="`next_cursor` of the previous page"),
]
NameFilter = Annotated[str | None, Query(max_length=255, pattern=PRINTABLE, description="Exact name")]
Filter = Annotated[str | None, Query(max_length=255, pattern=PRINTABLE)]
ActionFilter = Annotated[
    str | None, Query(max_length=64, pattern=PRINTABLE, description="Exact action or glob, e.g. `peer.*`")
]
AuditCursor = Annotated[
    str | None,
    Query(pattern=r"^[0-9]{1,18}$", description="`next_cursor` of the previous page (an audit event id)"),
]
Since = Annotated[IsoDateTime | None, Query(description=f"Events at or after this time. {DATETIME_DOC}")]
Until = Annotated[IsoDateTime | None, Query(description=f"Events before this time. {DATETIME_DOC}")]
