"""The signal wire protocol: JSON text frames between an agent and the signal service (docs/signal.md).

Client -> server: `send {to, id, box}` and `ping`. Server -> client: `welcome {peer, max_frame, version}`,
`msg {from, id, box}`, `offline {to, id}`, `pong`, `error {reason, id?}`. Both sides parse and build
frames here, so the close codes, limits and field names exist once. Signal only routes `box` (sealed
end to end by the agents); extra fields are ignored both ways (forward compatible), an unknown `type`
is an error. `welcome` carries `SIGNAL_VERSION`; a client refuses a version it does not know.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

SIGNAL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

# WebSocket close codes used by signal (4xxx: application codes).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 4401
CLOSE_REPLACED = 4409
CLOSE_RATE_ABUSE = 4429

MAX_ID_CHARS = 64
KEY_BYTES = 32
MAX_FRAME_LIMIT = 16 * 1024 * 1024  # the largest max_frame signal can be configured with

_dump = json.JSONEncoder(separators=(",", ":")).encode


class ProtocolViolation(Exception):
    """A malformed client frame; `reason` is sent to the client before the 1008 close."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameError(ValueError):
    """A server frame this client does not understand."""


def is_peer_key(value: object) -> bool:
    """A WireGuard public key in canonical standard base64 (32 bytes, 44 characters)."""
    if not isinstance(value, str) or len(value) != 44:
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == KEY_BYTES and base64.b64encode(raw).decode() == value


def _object(text: str | bytes, error: type[Exception], binary: str) -> dict[str, object]:
    if isinstance(text, bytes):
        raise error(binary)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error("frame is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise error("frame must be a JSON object")
    return doc


# ----- client -> server ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendFrame:
    to: str
    id: str
    box: str

    def to_wire(self) -> str:
        return _dump({"type": "send", "to": self.to, "id": self.id, "box": self.box})


@dataclass(frozen=True, slots=True)
class PingFrame:
    def to_wire(self) -> str:
        return _dump({"type": "ping"})


ClientFrame = SendFrame | PingFrame


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """One text frame from a client; ProtocolViolation says what is wrong."""
    doc = _object(text, ProtocolViolation, "binary frames are not supported")

    def field(name: str) -> object:
        if name not in doc:
            raise ProtocolViolation(f"missing field {name!r}")
        return doc[name]

    kind = field("type")
    if kind == "ping":
        return PingFrame()
    if kind != "send":
        shown = kind[:32] if isinstance(kind, str) else type(kind).__name__
        raise ProtocolViolation(f"unknown frame type {shown!r}")
    to, msg_id, box = field("to"), field("id"), field("box")
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
    return SendFrame(to=str(to), id=msg_id, box=box)


# ----- server -> client ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Welcome:
    peer: str
    max_frame: int
    version: int = SIGNAL_VERSION

    def to_wire(self) -> str:
        return _dump({"type": "welcome", "peer": self.peer, "max_frame": self.max_frame, "version": self.version})


@dataclass(frozen=True, slots=True)
class Msg:
    sender: str
    id: str
    box: str

    def to_wire(self) -> str:
        return _dump({"type": "msg", "from": self.sender, "id": self.id, "box": self.box})


@dataclass(frozen=True, slots=True)
class Offline:
    to: str
    id: str

    def to_wire(self) -> str:
        return _dump({"type": "offline", "to": self.to, "id": self.id})


@dataclass(frozen=True, slots=True)
class ServerError:
    reason: str
    id: str | None = None

    def to_wire(self) -> str:
        doc: dict[str, object] = {"type": "error", "reason": self.reason}
        if self.id is not None:
            doc["id"] = self.id
        return _dump(doc)


@dataclass(frozen=True, slots=True)
class Pong:
    def to_wire(self) -> str:
        return _dump({"type": "pong"})


ServerFrame = Welcome | Msg | Offline | ServerError | Pong


def parse_server_frame(data: str | bytes) -> ServerFrame:
    """One frame from signal; FrameError if this client does not understand it."""
    doc = _object(data, FrameError, "binary frame")

    def text(name: str) -> str:
        value = doc.get(name)
        if not isinstance(value, str):
            raise FrameError(f"{doc.get('type')!r} frame without string {name!r}")
        return value

    kind = doc.get("type")
    if kind == "msg":
        return Msg(sender=text("from"), id=text("id"), box=text("box"))
    if kind == "offline":
        return Offline(to=text("to"), id=text("id"))
    if kind == "error":
        msg_id = doc.get("id")
        return ServerError(reason=text("reason"), id=msg_id if isinstance(msg_id, str) else None)
    if kind == "pong":
        return Pong()
    if kind == "welcome":
        max_frame = doc.get("max_frame")
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or max_frame <= 0:
            raise FrameError("welcome without a positive max_frame")
        version = doc.get("version", 1)  # signal servers from before the field speak version 1
        if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
            raise FrameError(f"signal protocol version {version!r} is not supported by this agent: upgrade it")
        return Welcome(peer=text("peer"), max_frame=max_frame, version=version)
    raise FrameError(f"unknown frame type {str(kind)[:32]!r}")


def close_reason(text: str) -> str:
    """A close reason that fits the 123-byte limit of a WebSocket close frame."""
    raw = text.encode()
    return text if len(raw) <= 123 else raw[:120].decode(errors="ignore") + "..."


# Builders for the server's hot path (one call per routed message).
def welcome(peer: str, max_frame: int) -> str:
    return Welcome(peer, max_frame).to_wire()


def message(sender: str, msg_id: str, box: str) -> str:
    return Msg(sender, msg_id, box).to_wire()


def offline(to: str, msg_id: str) -> str:
    return Offline(to, msg_id).to_wire()


def pong() -> str:
    return Pong().to_wire()


def error(reason: str, msg_id: str | None = None) -> str:
    return ServerError(reason, msg_id).to_wire()
