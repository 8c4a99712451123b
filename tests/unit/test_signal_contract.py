"""The signal frames (starling_proto.signal): what one side builds the other parses, and what is refused."""

from __future__ import annotations

import base64
import json

import pytest

from starling_proto.signal import (
    SIGNAL_VERSION,
    FrameError,
    Msg,
    Offline,
    PingFrame,
    Pong,
    ProtocolViolation,
    SendFrame,
    ServerError,
    Welcome,
    parse_client_frame,
    parse_server_frame,
)

KEY = base64.b64encode(bytes(range(32))).decode()
BOX = base64.b64encode(b"sealed").decode()


@pytest.mark.parametrize(
    "frame", [Welcome(KEY, 65536), Msg(KEY, "m1", BOX), Offline(KEY, "m2"), ServerError("rate limited", "m3"), Pong()]
)
def test_server_frames_round_trip(frame: object) -> None:
    assert parse_server_frame(frame.to_wire()) == frame  # type: ignore[attr-defined]


@pytest.mark.parametrize("frame", [SendFrame(KEY, "m1", BOX), PingFrame()])
def test_client_frames_round_trip(frame: object) -> None:
    assert parse_client_frame(frame.to_wire()) == frame  # type: ignore[attr-defined]


def test_welcome_version_is_checked() -> None:
    doc = json.loads(Welcome(KEY, 65536).to_wire())
    assert doc["version"] == SIGNAL_VERSION
    legacy = {k: v for k, v in doc.items() if k != "version"}
    assert parse_server_frame(json.dumps(legacy)) == Welcome(KEY, 65536, 1)
    for version in (2, "1", True):
        with pytest.raises(FrameError, match="not supported by this agent: upgrade it"):
            parse_server_frame(json.dumps({**doc, "version": version}))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[1]", "must be a JSON object"),
        ("{", "not valid JSON"),
        ('{"type":"send","to":"AAAA","id":"x","box":"YQ=="}', "'to' is not a WireGuard public key"),
        (json.dumps({"type": "send", "to": KEY, "id": "x" * 65, "box": BOX}), "'id' must be a string of 1 to 64"),
        (json.dumps({"type": "send", "to": KEY, "id": "x", "box": "not base64!"}), "'box' is not valid base64"),
        (json.dumps({"type": "send", "to": KEY, "id": "x"}), "missing field 'box'"),
        ('{"type":"subscribe"}', "unknown frame type 'subscribe'"),
    ],
)
def test_bad_client_frames_say_why(text: str, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=reason):
        parse_client_frame(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"\x00", "binary frame"),
        ('{"type":"msg","from":"k","id":"x"}', "without string 'box'"),
        ('{"type":"welcome","peer":"k","max_frame":0}', "positive max_frame"),
        ('{"type":"shutdown"}', "unknown frame type"),
    ],
)
def test_bad_server_frames_say_why(text: str | bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_server_frame(text)
