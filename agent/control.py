"""The local control socket (unix, 0600, root only): `starling status` and `starling down` talk to the
daemon through it with one JSON request and one JSON reply per connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from agent.status import AgentStatus, Explanation, RouteExplanation, RoutingStatus

MAX_REQUEST = 4096


class ControlError(Exception):
    pass


class Controlled(Protocol):
    def status(self) -> AgentStatus: ...

    def request_stop(self, remove: bool = False) -> None: ...

    def explain(self, name: str) -> Explanation | RouteExplanation | None: ...

    async def reload_key(
        self, expect_public_key: str | None = None, verify_timeout: float = 30.0
    ) -> dict[str, Any]: ...

    async def set_exit_node(self, wanted: str) -> RoutingStatus: ...


class ControlServer:
    def __init__(self, path: Path, target: Controlled) -> None:
        self.path = path
        self.target = target
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            reply = await self.dispatch_async(line[:MAX_REQUEST])
        except (TimeoutError, ValueError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def dispatch_async(self, raw: bytes) -> dict[str, Any]:
        """Commands that take time (key reload) run here; everything else answers at once."""
        request = json.loads(raw or b"{}")
        if isinstance(request, dict) and request.get("cmd") == "key-reload":
            return await self._key_reload(request)
        if isinstance(request, dict) and request.get("cmd") == "exit-node":
            wanted = request.get("peer")
            if not isinstance(wanted, str) or len(wanted) > 253:
                return {"ok": False, "error": "exit-node needs a peer name or id, 'none', or '' (the coordinator's)"}
            return {"ok": True, "routing": await self.target.set_exit_node(wanted)}
        return self.dispatch(raw)

    async def _key_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        from agent.rekey import RekeyError

        expect = request.get("expect_public_key")
        timeout = request.get("verify_timeout", 30.0)
        if expect is not None and not isinstance(expect, str):
            return {"ok": False, "error": "expect_public_key must be a string"}
        if not isinstance(timeout, int | float) or not 1 <= timeout <= 600:
            return {"ok": False, "error": "verify_timeout must be a number of seconds in 1-600"}
        try:
            result = await self.target.reload_key(expect, float(timeout))
        except RekeyError as exc:
            reply = {"ok": False, "error": str(exc), "stage": exc.stage, "switched": exc.switched, **exc.detail}
            return reply | {"in_use": self.target.status()["public_key"]}
        return {"ok": True, **result, "in_use": result["public_key"]}

    def dispatch(self, raw: bytes) -> dict[str, Any]:
        request = json.loads(raw or b"{}")
        if not isinstance(request, dict):
            raise ValueError("request must be a JSON object")
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.target.status()}
        if cmd == "explain":
            peer = request.get("peer")
            if not isinstance(peer, str) or not peer:
                return {"ok": False, "error": "explain needs a peer name, id or public key"}
            explained = self.target.explain(peer)
            if explained is None:
                return {"ok": False, "error": f"no peer {peer[:64]!r} in this agent's network map"}
            return {"ok": True, "explain": explained}
        if cmd == "down":
            self.target.request_stop(remove=bool(request.get("remove", True)))
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def call(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError as exc:
        raise ControlError(f"the agent is not running (no control socket at {path})") from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to the agent at {path}: {exc.strerror or exc}") from exc
    reply: dict[str, Any] = json.loads(data or b"{}")
    return reply
