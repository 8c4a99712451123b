"""Unit tests of the coordinator client (plugins/module_utils/_api.py) with a scripted transport."""

from __future__ import annotations

import io
import json
import urllib.error
from email.message import Message
from typing import Any

import pytest

from tests.ansible import collection_loader

collection_loader.install()

from ansible_collections.starling.mesh.plugins.module_utils._api import (  # noqa: E402
    CoordinatorClient,
    CoordinatorError,
)


class Resp:
    def __init__(self, body: Any) -> None:
        self._raw = b"" if body is None else json.dumps(body).encode()

    def read(self) -> bytes:
        return self._raw


def http_error(code: int, body: Any = None, location: str | None = None) -> urllib.error.HTTPError:
    headers = Message()
    if location:
        headers["Location"] = location
    raw = json.dumps(body).encode() if body is not None else b""
    return urllib.error.HTTPError("http://x", code, "msg", headers, io.BytesIO(raw))


class Script:
    """Stands in for Request.open: answers (or raises) in order, records the calls."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, method: str, url: str, data: Any = None, headers: Any = None) -> Resp:
        self.calls.append((method, url, json.loads(data) if data else None))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return Resp(answer)


def client(script: Script, **kw: Any) -> tuple[CoordinatorClient, list[float]]:
    sleeps: list[float] = []
    c = CoordinatorClient("http://coord:8080/api/v1/", "sat_secret", sleep=sleeps.append, **kw)
    c._request.open = script  # type: ignore[method-assign]
    return c, sleeps


def test_url_normalized_and_headers() -> None:
    c, _ = client(Script({"ok": 1}))
    assert c.url == "http://coord:8080"
    assert c._request.headers["Authorization"] == "Bearer sat_secret"
    assert c._request.follow_redirects == "none"
    assert c.endpoint("/peers", {"connected": False, "group": None, "name": "a b"}) == (
        "http://coord:8080/api/v1/peers?connected=false&name=a+b"
    )


@pytest.mark.parametrize(
    "url,token,text",
    [("", "t", "STARLING_URL"), ("http://x", "", "STARLING_TOKEN"), ("ftp://x", "t", "must start with http")],
)
def test_missing_settings(url: str, token: str, text: str) -> None:
    with pytest.raises(CoordinatorError, match=text):
        CoordinatorClient(url, token)


def test_retries_reads_with_backoff_then_succeeds() -> None:
    script = Script(
        http_error(503),
        urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
        http_error(500),
        {"items": []},
    )
    c, sleeps = client(script)
    assert c.get("/groups") == {"items": []}
    assert sleeps == [0.3, 0.6, 1.2] and len(script.calls) == 4


def test_gives_up_after_retries_with_clear_message() -> None:
    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    c, sleeps = client(Script(refused, refused, refused, refused))
    with pytest.raises(CoordinatorError, match=r"cannot reach the coordinator at http://coord:8080 .*after 4 attempts"):
        c.get("/groups")
    assert len(sleeps) == 3


def test_writes_not_retried_on_500_or_timeout() -> None:
    script = Script(http_error(500, {"error": "internal_error", "message": "boom", "field": None}))
    c, sleeps = client(script)
    with pytest.raises(CoordinatorError, match=r"POST /groups failed \(500 internal_error\): boom"):
        c.post("/groups", {"name": "x"})
    assert sleeps == []
    c, sleeps = client(Script(TimeoutError("timed out")))
    with pytest.raises(CoordinatorError, match="timed out"):
        c.patch("/groups/1", {"name": "x"})
    assert sleeps == []
    c, sleeps = client(Script(http_error(503), {"id": "1"}))
    assert c.post("/groups", {"name": "x"}) == {"id": "1"} and sleeps == [0.3]


def test_error_messages() -> None:
    c, _ = client(
        Script(http_error(401, {"error": "unauthorized", "message": "API token is not valid", "field": None}))
    )
    with pytest.raises(CoordinatorError) as err:
        c.get("/peers")
    assert "authentication failed (401): API token is not valid" in err.value.msg and "sat_secret" not in err.value.msg
    c, _ = client(
        Script(
            http_error(
                422, {"error": "unknown_reference", "message": "unknown group 'x'", "field": "sources.groups[0]"}
            )
        )
    )
    with pytest.raises(CoordinatorError) as err:
        c.post("/policies", {})
    assert err.value.status == 422 and err.value.field == "sources.groups[0]"
    assert "[field: sources.groups[0]]" in err.value.msg


def test_redirect_is_not_followed() -> None:
    c, _ = client(Script(http_error(307, location="http://evil.example/api/v1/groups")))
    with pytest.raises(
        CoordinatorError, match=r"redirect to http://evil\.example/api/v1/groups; redirects are not followed"
    ):
        c.get("/groups")


def test_pagination_follows_cursor_and_detects_loops() -> None:
    script = Script({"items": [1, 2], "next_cursor": "b"}, {"items": [3], "next_cursor": None})
    c, _ = client(script)
    assert c.list_all("/peers", {"group": "db"}, limit=2) == [1, 2, 3]
    assert script.calls[1][1].endswith("/peers?cursor=b&group=db&limit=2")
    c, _ = client(Script({"items": [1], "next_cursor": "a"}, {"items": [2], "next_cursor": "a"}))
    with pytest.raises(CoordinatorError, match="same cursor twice"):
        c.list_all("/peers")


def test_find_by_name_and_missing() -> None:
    c, _ = client(Script({"items": [{"name": "a", "id": "1"}]}, {"items": []}))
    assert c.find_by_name("/groups", "a") == {"name": "a", "id": "1"}
    assert c.find_by_name("/groups", "b") is None
    c, _ = client(Script({"items": [{"name": "k1"}, {"name": "k2"}], "next_cursor": None}))
    assert c.find_by_name("/setup-keys", "k2") == {"name": "k2"}
    c, _ = client(Script({"items": [{"name": "p1"}]}, {"items": []}))
    assert c.missing_peers(["p1", "p2", "p1"]) == ["p2"]
