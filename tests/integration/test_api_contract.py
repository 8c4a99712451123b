"""The API contract against a real coordinator: every query parameter is validated by type and format
(422 with the standard error body naming the parameter), 405 lists the resource's methods, and the live
OpenAPI document declares the error responses the server gives."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import pytest

from tests.fixtures.coordinator import CoordinatorProcess

LISTS = ["/api/v1/peers", "/api/v1/groups", "/api/v1/policies", "/api/v1/setup-keys", "/api/v1/tokens", "/api/v1/audit"]
NAME_FILTERS = [("/api/v1/peers", "name"), ("/api/v1/peers", "group"), ("/api/v1/groups", "name")]
NAME_FILTERS += [("/api/v1/policies", "name")]
AUDIT_FILTERS = ["actor", "target_type", "target_id"]


def assert_422(r: httpx.Response, field: str) -> None:
    assert r.status_code == 422, (r.request.url, r.text)
    body = r.json()
    assert set(body) == {"error", "message", "field"}, body
    assert body["error"] == "validation_error" and body["field"] == field, body
    assert field in body["message"] and "Traceback" not in r.text


@pytest.fixture(scope="module")
def api(coordinator: CoordinatorProcess) -> httpx.Client:
    return coordinator.client()


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("value", ["0", "1001", "-1", "abc", "1.5", "1e2", ""])
def test_limit_is_an_integer_from_1_to_1000(api: httpx.Client, path: str, value: str) -> None:
    assert_422(api.get(path, params={"limit": value}), "limit")


@pytest.mark.parametrize("path", LISTS)
def test_limit_and_cursor_in_range_are_accepted(api: httpx.Client, path: str) -> None:
    for limit in ("1", "1000"):
        assert api.get(path, params={"limit": limit}).status_code == 200
    assert api.get(path, params={"cursor": "7"}).status_code == 200


@pytest.mark.parametrize("path", [p for p in LISTS if not p.endswith("/audit")])
@pytest.mark.parametrize("value", ["x" * 256, "a\x00b", "tab\there"])
def test_name_cursors_are_printable_and_bounded(api: httpx.Client, path: str, value: str) -> None:
    assert_422(api.get(path, params={"cursor": value}), "cursor")


@pytest.mark.parametrize("value", ["abc", "-1", "1.0", "9" * 19, "", " 5", "1_000"])
def test_audit_cursor_is_an_event_id(api: httpx.Client, value: str) -> None:
    assert_422(api.get("/api/v1/audit", params={"cursor": value}), "cursor")


@pytest.mark.parametrize(("path", "param"), NAME_FILTERS + [("/api/v1/audit", f) for f in AUDIT_FILTERS])
@pytest.mark.parametrize("value", ["x" * 256, "nul\x00", "line\nbreak"])
def test_text_filters_are_printable_and_bounded(api: httpx.Client, path: str, param: str, value: str) -> None:
    assert_422(api.get(path, params={param: value}), param)


@pytest.mark.parametrize("value", ["x" * 65, "peer.\x7f"])
def test_audit_action_is_printable_and_at_most_64(api: httpx.Client, value: str) -> None:
    assert_422(api.get("/api/v1/audit", params={"action": value}), "action")


@pytest.mark.parametrize("value", ["maybe", "2", "", "truee"])
def test_connected_is_a_boolean(api: httpx.Client, value: str) -> None:
    assert_422(api.get("/api/v1/peers", params={"connected": value}), "connected")
    assert api.get("/api/v1/peers", params={"connected": "false"}).status_code == 200


@pytest.mark.parametrize("param", ["since", "until"])
@pytest.mark.parametrize(
    "value",
    [
        "0.5",  # was read as a unix time (1970-01-01T00:00:00.5Z)
        "1700000000",
        "2026-01-31",  # a date without a time
        "2026-13-01T00:00:00Z",
        "2026-01-31T25:00:00Z",
        "2026-W05-1T00:00:00Z",
        "yesterday",
        "2026-01-31T12:00:00+1",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "",
    ],
)
def test_audit_times_are_iso_8601_only(api: httpx.Client, param: str, value: str) -> None:
    assert_422(api.get("/api/v1/audit", params={param: value}), param)


def test_audit_time_window_filters_with_any_offset(api: httpx.Client) -> None:
    name = f"window-{uuid.uuid4().hex[:8]}"
    assert api.post("/api/v1/groups", json={"name": name}).status_code == 201
    now = dt.datetime.now(dt.UTC)

    def targets(**params: str) -> list[str]:
        r = api.get("/api/v1/audit", params={"action": "group.create", "limit": "1000", **params})
        assert r.status_code == 200, r.text
        return [e["target_name"] for e in r.json()["items"]]

    before = (now - dt.timedelta(minutes=5)).replace(tzinfo=None)
    after = now + dt.timedelta(minutes=5)
    assert name in targets(since=before.strftime("%Y-%m-%dT%H:%M:%S"))  # no offset: UTC
    assert name in targets(since=before.strftime("%Y-%m-%d %H:%M"))  # space separator, minutes
    assert name in targets(until=after.isoformat().replace("+00:00", "Z"))
    plus2 = (after + dt.timedelta(hours=2)).replace(tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert name in targets(until=plus2.isoformat())  # same instant as `after`, written at +02:00
    assert name not in targets(since=after.isoformat())
    assert name not in targets(until=before.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def test_405_lists_every_method_of_the_resource(api: httpx.Client) -> None:
    r = api.put("/api/v1/groups/some-id", json={})
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert r.headers["allow"] == "DELETE, GET, PATCH"
    assert api.request("TRACE", "/api/v1/settings").headers["allow"] == "GET, PATCH"


def test_live_openapi_declares_the_errors_the_server_gives(coordinator: CoordinatorProcess, api: httpx.Client) -> None:
    spec = httpx.get(coordinator.url + "/openapi.json").json()
    ro = api.post("/api/v1/tokens", json={"name": f"ro-{uuid.uuid4().hex[:8]}", "scope": "read"}).json()["token"]
    seen = {
        ("get", "/api/v1/audit", 422): api.get("/api/v1/audit", params={"until": "0.5"}),
        ("get", "/api/v1/groups/{group_id}", 404): api.get("/api/v1/groups/nope"),
        ("post", "/api/v1/groups", 400): api.post(
            "/api/v1/groups", content=b"{", headers={"content-type": "application/json"}
        ),
        ("get", "/api/v1/settings", 401): httpx.get(coordinator.url + "/api/v1/settings"),
        ("patch", "/api/v1/settings", 403): httpx.patch(
            coordinator.url + "/api/v1/settings", json={}, headers={"Authorization": f"Bearer {ro}"}
        ),
    }
    for (method, path, status), r in seen.items():
        assert r.status_code == status, (method, path, r.text)
        declared = spec["paths"][path][method]["responses"][str(status)]
        assert declared["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert set(r.json()) == set(spec["components"]["schemas"]["ErrorBody"]["required"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/v1/groups", {"name": "nul-g", "description": "a\x00b"}), ("/api/v1/settings", {"dns_domain": "a\x00"})],
)
def test_nul_in_a_json_body_is_refused(api: httpx.Client, path: str, body: dict[str, str]) -> None:
    """PostgreSQL cannot store NUL in text: it used to surface as a 500 there (SQLite stored it)."""
    r = api.request("PATCH" if path.endswith("settings") else "POST", path, json=body)
    assert r.status_code == 422 and r.json()["error"] == "validation_error", r.text
    assert "NUL" in r.json()["message"]
    escaped = api.post("/api/v1/groups", json={"name": f"esc-{uuid.uuid4().hex[:6]}", "description": "a\\u0000b"})
    assert escaped.status_code == 201 and escaped.json()["description"] == "a\\u0000b"  # a backslash, not NUL


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/setup-keys", {"reusable": 1}, "reusable"),
        ("/api/v1/setup-keys", {"reusable": "true"}, "reusable"),
        ("/api/v1/setup-keys", {"usage_limit": "5"}, "usage_limit"),
        ("/api/v1/setup-keys", {"expires_in": 3600.0}, "expires_in"),
        ("/api/v1/setup-keys", {"ephemeral": 0}, "ephemeral"),
        ("/api/v1/tokens", {"scope": "read", "expires_in": "3600"}, "expires_in"),
        ("/api/v1/groups", {"description": 5}, "description"),
    ],
)
def test_json_body_types_are_taken_as_they_are(
    api: httpx.Client, path: str, body: dict[str, object], field: str
) -> None:
    """No coercion in request bodies: a string is not a number, a number not a boolean (422, nothing created)."""
    name = f"strict-{uuid.uuid4().hex[:8]}"
    before = len(api.get(path, params={"limit": 1000}).json()["items"])
    assert_422(api.post(path, json={"name": name, **body}), field)
    assert len(api.get(path, params={"limit": 1000}).json()["items"]) == before
    good = {k: v for k, v in body.items() if k != field}
    assert api.post(path, json={"name": name, **good}).status_code == 201  # without the mistyped field: fine
