# -*- coding: utf-8 -*-
# Copyright: (c) 2025, Starling developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Coordinator REST client shared by the modules and the inventory plugin.

Uses ansible's own ``open_url`` machinery (no extra dependency on the controller or targets).
Retries with exponential backoff when the coordinator is unreachable or answers 502/503/504 (and
500 for reads); never follows a redirect (the bearer token must not be replayed to another
address); turns every error into a ``CoordinatorError`` with a one-line, actionable message.
"""

from __future__ import annotations

import json
import socket
import time

from ansible.module_utils.common.text.converters import to_native, to_text
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import quote, urlencode
from ansible.module_utils.urls import Request

API_PREFIX = "/api/v1"
PAGE_LIMIT = 1000
USER_AGENT = "starling.mesh-ansible"

# Reads are always safe to retry; writes only when the request certainly did not take effect.
RETRY_STATUS_READ = (500, 502, 503, 504)
RETRY_STATUS_WRITE = (502, 503, 504)


class CoordinatorError(Exception):
    """A failed coordinator call. ``msg`` is meant for the user; the rest is structured detail."""

    def __init__(self, msg, status=None, error=None, field=None, url=None):
        super(CoordinatorError, self).__init__(msg)
        self.msg = msg
        self.status = status
        self.error = error
        self.field = field
        self.url = url

    def to_result(self):
        """Keyword arguments for ``fail_json`` (without ``msg``)."""
        return {"status": self.status, "error": self.error, "field": self.field}


def _error_body(raw):
    try:
        data = json.loads(to_text(raw, errors="surrogate_or_strict"))
    except (ValueError, TypeError):
        return None
    if isinstance(data, dict) and "message" in data:
        return data
    return None


class CoordinatorClient(object):
    """A small JSON client for ``{url}/api/v1``.

    ``sleep`` is injectable so that unit tests do not wait for the backoff.
    """

    def __init__(self, url, token, validate_certs=True, timeout=30, retries=3, backoff=0.3, sleep=time.sleep):
        if not url:
            raise CoordinatorError("the coordinator URL is not set: give the url option or set STARLING_URL")
        if not token:
            raise CoordinatorError("the API token is not set: give the token option or set STARLING_TOKEN")
        url = to_text(url).rstrip("/")
        if not (url.startswith("http://") or url.startswith("https://")):
            raise CoordinatorError("url must start with http:// or https://, got %r" % url)
        if url.endswith(API_PREFIX):
            url = url[: -len(API_PREFIX)]
        self.url = url
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self._sleep = sleep
        self._token = token
        self._request = Request(
            headers={
                "Authorization": "Bearer %s" % token,
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            validate_certs=validate_certs,
            timeout=timeout,
            follow_redirects="none",
            use_proxy=True,
        )

    # ----- core -----------------------------------------------------------------------------------
    def endpoint(self, path, params=None):
        url = self.url + API_PREFIX + path
        if params:
            clean = [(k, _param(v)) for k, v in sorted(params.items()) if v is not None]
            if clean:
                url += "?" + urlencode(clean)
        return url

    def request(self, method, path, params=None, body=None):
        """Send one request; return the decoded JSON body (None for 204)."""
        url = self.endpoint(path, params)
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        retry_status = RETRY_STATUS_READ if method == "GET" else RETRY_STATUS_WRITE
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._request.open(method, url, data=data, headers=headers)
                raw = resp.read()
                if not raw:
                    return None
                try:
                    return json.loads(to_text(raw, errors="surrogate_or_strict"))
                except ValueError:
                    raise CoordinatorError("%s %s: the coordinator answered with a body that is not JSON" % (method, path), url=url)
            except HTTPError as exc:
                status = exc.code
                if 300 <= status < 400:
                    location = exc.headers.get("Location") if exc.headers else None
                    raise CoordinatorError(
                        "%s %s: the coordinator answered %d with a redirect to %s; redirects are not followed "
                        "(the token would be sent to another address): set url to the final address"
                        % (method, path, status, location or to_native(exc.filename)),
                        status=status,
                        url=url,
                    )
                try:
                    raw = exc.read()
                except Exception:  # pylint: disable=broad-except
                    raw = b""
                err = _error_body(raw) or {}
                if status in retry_status and attempt <= self.retries:
                    self._sleep(self.backoff * (2 ** (attempt - 1)))
                    continue
                raise self._http_error(method, path, url, status, err)
            except (URLError, socket.timeout, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt <= self.retries and _may_retry(method, reason):
                    self._sleep(self.backoff * (2 ** (attempt - 1)))
                    continue
                raise CoordinatorError(
                    "cannot reach the coordinator at %s (%s %s): %s (after %d attempt%s)"
                    % (self.url, method, path, to_native(reason), attempt, "" if attempt == 1 else "s"),
                    url=url,
                )

    def _http_error(self, method, path, url, status, err):
        message = err.get("message") or "HTTP %d" % status
        code = err.get("error")
        field = err.get("field")
        if status == 401:
            text = "authentication failed (401): %s; check the token option or STARLING_TOKEN" % message
        elif status == 403:
            text = "permission denied (403): %s" % message
        else:
            text = "%s %s failed (%d %s): %s" % (method, path, status, code or "error", message)
            if field:
                text += " [field: %s]" % field
        return CoordinatorError(text, status=status, error=code, field=field, url=url)

    def get(self, path, params=None):
        return self.request("GET", path, params=params)

    def post(self, path, body):
        return self.request("POST", path, body=body)

    def patch(self, path, body):
        return self.request("PATCH", path, body=body)

    def delete(self, path):
        return self.request("DELETE", path)

    # ----- helpers ----------------------------------------------------------------------------------
    def pages(self, path, params=None, limit=PAGE_LIMIT):
        """Yield each page's items, following ``next_cursor``."""
        query = dict(params or {})
        query["limit"] = limit
        seen = set()
        while True:
            page = self.get(path, query)
            if not isinstance(page, dict) or "items" not in page:
                raise CoordinatorError("GET %s: unexpected answer (no 'items')" % path)
            yield page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return
            if cursor in seen:
                raise CoordinatorError("GET %s: the coordinator returned the same cursor twice" % path)
            seen.add(cursor)
            query["cursor"] = cursor

    def list_all(self, path, params=None, limit=PAGE_LIMIT):
        items = []
        for page in self.pages(path, params, limit):
            items.extend(page)
        return items

    def find_by_name(self, collection, name):
        """The object named ``name`` in ``/groups``, ``/policies``, ``/peers``, ``/routes`` (server-side filter),
        ``/setup-keys`` or ``/tokens`` (listed and filtered here); None when absent."""
        if collection in ("/groups", "/policies", "/peers", "/routes"):
            items = self.get(collection, {"name": name, "limit": 10})["items"]
        else:
            items = self.list_all(collection)
        for item in items:
            if item.get("name") == name:
                return item
        return None

    def missing(self, collection, names):
        """The subset of ``names`` unknown in ``collection`` (sorted): looked up one by one when few, else listed."""
        names = sorted(set(names))
        if not names:
            return []
        if len(names) <= 20:
            return [n for n in names if self.find_by_name(collection, n) is None]
        known = set(item["name"] for item in self.list_all(collection))
        return [n for n in names if n not in known]

    def missing_peers(self, names):
        """The subset of peer ``names`` unknown to the coordinator (sorted)."""
        return self.missing("/peers", names)

    def missing_groups(self, names):
        return self.missing("/groups", names)

    def missing_routes(self, names):
        return self.missing("/routes", names)

    @staticmethod
    def item_path(collection, item_id):
        return "%s/%s" % (collection, quote(to_native(item_id), safe=""))


def _param(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return to_native(value)


def _may_retry(method, reason):
    """Connection-level failures: always retry reads; writes only when nothing was sent."""
    if method == "GET":
        return True
    if isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
        return True
    text = to_native(reason).lower()
    return "connection refused" in text or "name or service not known" in text
