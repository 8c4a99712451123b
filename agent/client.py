"""HTTP client for the coordinator: enrollment, the map stream (SSE), state reports, signal tokens."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx


class CoordinatorError(Exception):
    """The coordinator refused or failed a request; `status` is the HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _error(resp: httpx.Response) -> CoordinatorError:
    try:
        message = resp.json().get("message", resp.text)
    except ValueError:
        message = resp.text[:200]
    return CoordinatorError(f"coordinator answered {resp.status_code}: {message}", resp.status_code)


def enroll(
    url: str, body: dict[str, Any], timeout: float = 15.0, verify: ssl.SSLContext | None = None
) -> dict[str, Any]:
    try:
        resp = httpx.post(
            url.rstrip("/") + "/api/v1/enroll", json=body, timeout=timeout, verify=verify if verify else True
        )
    except httpx.HTTPError as exc:
        raise CoordinatorError(f"coordinator {url} is unreachable: {exc}") from exc
    if resp.status_code != 200:
        raise _error(resp)
    data: dict[str, Any] = resp.json()
    return data


class PeerApi:
    """Peer-authenticated calls (the credential from enrollment)."""

    def __init__(self, url: str, credential: str, verify: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {credential}"},
            timeout=httpx.Timeout(10.0, read=None),
            verify=verify if verify else True,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def _post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            resp = await self.client.post(path, json=body, timeout=10.0)
        except httpx.HTTPError as exc:
            raise CoordinatorError(f"coordinator unreachable: {exc.__class__.__name__}") from exc
        if resp.status_code >= 400:
            raise _error(resp)
        return resp

    async def signal_token(self) -> str:
        return str((await self._post("/api/v1/peer/signal-token")).json()["token"])

    async def report_state(self, connections: list[dict[str, Any]]) -> None:
        await self._post("/api/v1/peer/state", {"connections": connections})

    async def change_key(self, public_key: str, previous: str, phase: str, version: int | None, source: str) -> None:
        body: dict[str, Any] = {
            "public_key": public_key,
            "previous_public_key": previous,
            "phase": phase,
            "source": source,
        }
        if version is not None:
            body["version"] = version
        await self._post("/api/v1/peer/key", body)

    async def report_event(self, kind: str, message: str) -> None:
        await self._post("/api/v1/peer/events", {"kind": kind, "message": message[:1024]})

    async def stream(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the map stream until it ends; raises CoordinatorError on failure."""
        try:
            async with self.client.stream("GET", "/api/v1/peer/stream") as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _error(resp)
                event, data = "message", list[str]()
                async for line in resp.aiter_lines():
                    if line == "":
                        if data:
                            yield event, json.loads("\n".join(data))
                        event, data = "message", []
                    elif line.startswith(":"):
                        continue
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
        except httpx.HTTPError as exc:
            raise CoordinatorError(f"map stream lost: {exc.__class__.__name__}") from exc
