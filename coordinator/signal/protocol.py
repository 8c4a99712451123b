"""The signal wire protocol: JSON text frames, parsed and validated here, and built here.

Client -> server: `send {to, id, box}` and `ping`. Server -> client: `welcome`, `msg`, `offline`,
`pong`, `error`. A frame that breaks these rules raises `ProtocolViolation`; the session closes
that one connection with 1008 and the reason. See docs/signal.md.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

# WebSocket close codes used by signal (4xxx: application codes, documented in docs/signal.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 4401
CLOSE_REPLACED = 4409
CLOSE_RATE_ABUSE = 4429

MAX_ID_CHARS = 64
KEY_BYTES = 32


class ProtocolViolation(Exception):
    """A malformed client frame; `reason` is sent to the client before the 1008 close."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SendFrame:
    to: str
    id: str
    box: str


@dataclass(frozen=True, slots=True)
class PingFrame:
    pass


ClientFrame = SendFrame | PingFrame


def is_peer_key(value: object) -> bool:
    """A WireGuard public key in canonical standard base64 (32 bytes, 44 characters)."""
    if not isinstance(value, str) or len(value) != 44:
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == KEY_BYTES and base64.b64encode(raw).decode() == value


def _field(doc: dict[str, Any], name: str) -> Any:
    if name not in doc:
        raise ProtocolViolation(f"missing field {name!r}")
    return doc[name]


def parse_client_frame(text: str) -> ClientFrame:
    """Parse one text frame from a client; extra fields are ignored (forward compatible)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolViolation("frame is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ProtocolViolation("frame must be a JSON object")
    kind = _field(doc, "type")
    if kind == "ping":
        return PingFrame()
    if kind != "send":
        shown = kind[:32] if isinstance(kind, str) else type(kind).__name__
        raise ProtocolViolation(f"unknown frame type {shown!r}")
    to, msg_id, box = _field(doc, "to"), _field(doc, "id"), _field(doc, "box")
    if not is_peer_key(to):
        raise ProtocolViolation("'to' is not a WireGuard public key (base64 of 32 bytes)")
    if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= MAX_ID_CHARS:
        raise ProtocolViolation(f"'id' must be a string of 1 to {MAX_ID_CHARS} characters")
    if not isinstance(box, str) or not box:
        raise ProtocolViolation("'box' must be a non-empty base64 string")
    try:
        base64.b64decode(box, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolViolation("'box' is not valid base64") from exc
    return SendFrame(to=to, id=msg_id, box=box)


def close_reason(text: str) -> str:
    """A close reason that fits the 123-byte limit of a WebSocket close frame."""
    raw = text.encode()
    return text if len(raw) <= 123 else raw[:120].decode(errors="ignore") + "..."


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def welcome(peer: str, max_frame: int) -> str:
    return _dump({"type": "welcome", "peer": peer, "max_frame": max_frame})


def message(sender: str, msg_id: str, box: str) -> str:
    return _dump({"type": "msg", "from": sender, "id": msg_id, "box": box})


def offline(to: str, msg_id: str) -> str:
    return _dump({"type": "offline", "to": to, "id": msg_id})


def pong() -> str:
    return _dump({"type": "pong"})


def error(reason: str, msg_id: str | None = None) -> str:
    doc: dict[str, Any] = {"type": "error", "reason": reason}
    if msg_id is not None:
        doc["id"] = msg_id
    return _dump(doc)
