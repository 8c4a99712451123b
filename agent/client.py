"""HTTP client for the coordinator: sealed enrollment/login and key rotation (proof of possession of the
WireGuard private key, starling_proto.seal), the map stream (SSE), state reports, signal tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agent.keys import private_key_object
from agent.status import PathReport
from starling_proto.seal import Purpose, SealError, seal

# The coordinator sends a keep-alive on the map stream every `heartbeat` seconds (default 15, docs/api.md):
# this long without a byte means the connection is dead (e.g. a partition TCP has not noticed): reconnect.
STREAM_SILENCE = 60.0


class CoordinatorError(Exception):
    """The coordinator refused or failed a request; `status` is the HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def printable(text: str) -> str:
    """Text the coordinator accepts in reports: control and formatting characters become spaces."""
    return "".join(c if c.isprintable() else " " for c in text)


def _error(resp: httpx.Response) -> CoordinatorError:
    try:
        message = resp.json().get("message", resp.text)
    except ValueError:
        message = resp.text[:200]
    return CoordinatorError(f"coordinator answered {resp.status_code}: {message}", resp.status_code)


def _trust(url: str, verify: ssl.SSLContext | None) -> ssl.SSLContext | bool:
    """What httpx verifies TLS with: the configured CA (ca_file), else the default trust store for https.
    A plain http:// coordinator never uses TLS, so the default store (~30 ms to load: on the way to the
    first ping) is not read; the context given instead holds no CA and would refuse any TLS peer."""
    if verify is not None:
        return verify
    if url.lower().startswith("https://"):
        return True
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and names, trusts nobody


def _sealed(purpose: Purpose, challenge: dict[str, Any], privates: list[str], payload: dict[str, Any]) -> Any:
    try:
        return seal(
            purpose,
            [private_key_object(p) for p in privates],
            str(challenge.get("coordinator_public_key", "")),
            str(challenge.get("challenge", "")),
            payload,
        )
    except SealError as exc:
        raise CoordinatorError(f"cannot seal the request: {exc}") from exc


def enroll(
    url: str, private_key: str, payload: dict[str, Any], timeout: float = 15.0, verify: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """Enroll (payload with `setup_key`) or log in (a known key, no setup key needed): fetch a challenge,
    send the payload sealed with `private_key`, open the sealed reply (peer, credential, signing key)."""
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout, verify=_trust(base, verify)) as client:
            resp = client.post(base + "/api/v1/challenge")
            if resp.status_code != 200:
                raise _error(resp)
            wire, reply = _sealed("enroll", resp.json(), [private_key], payload)
            resp = client.post(base + "/api/v1/enroll", json=wire)
    except httpx.HTTPError as exc:
        raise CoordinatorError(f"coordinator {url} is unreachable: {exc}") from exc
    if resp.status_code != 200:
        raise _error(resp)
    try:
        return reply.open(resp.json())  # type: ignore[no-any-return]
    except (SealError, ValueError) as exc:
        raise CoordinatorError(f"the coordinator's reply does not open with our key: {exc}") from exc


class PeerApi:
    """Peer-authenticated calls (the credential from enrollment)."""

    def __init__(self, url: str, credential: str, verify: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self._verify = verify
        self._credential = credential
        self.client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self._credential}"},
            timeout=httpx.Timeout(10.0, read=None),
            verify=_trust(self.url, self._verify),
        )

    def set_credential(self, credential: str) -> None:
        self._credential = credential
        self.client.headers["Authorization"] = f"Bearer {credential}"

    async def reconnect(self) -> None:
        """Forget pooled connections (the underlay changed: a kept-alive connection from an address we no
        longer have is dead, though TCP has not noticed, and a new request sent on it would hang)."""
        old, self.client = self.client, self._new_client()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.aclose(), 2.0)

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

    async def report_state(self, connections: list[PathReport]) -> None:
        await self._post("/api/v1/peer/state", {"connections": connections})

    async def change_key(
        self, current_private: str, new_private: str, phase: str, version: int | None, source: str
    ) -> None:
        """Present a new key, sealed with the current one (the key the coordinator holds) and the new one."""
        challenge = (await self._post("/api/v1/challenge")).json()
        payload: dict[str, Any] = {"phase": phase, "source": source}
        if version is not None:
            payload["version"] = version
        wire, _reply = _sealed("rotate", challenge, [current_private, new_private], payload)
        await self._post("/api/v1/peer/key", wire)

    async def report_event(self, kind: str, message: str) -> None:
        await self._post("/api/v1/peer/events", {"kind": kind, "message": printable(message)[:1024]})

    async def stream(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the map stream until it ends; raises CoordinatorError on failure."""
        try:
            timeout = httpx.Timeout(10.0, read=STREAM_SILENCE)
            async with self.client.stream("GET", "/api/v1/peer/stream", timeout=timeout) as resp:
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
