"""Small checkers every wire structure uses: one error type with the failing field, and typed reads.

A structure's `from_wire()` takes what `json.loads` produced (`object`), checks it with these helpers
and builds frozen dataclasses; anything malformed raises `WireFormatError` naming the field, so a
caller can say exactly what was wrong and keep what it had.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping

dumps = json.JSONEncoder(separators=(",", ":")).encode  # compact, the form every message is sent in


class WireFormatError(ValueError):
    """A wire message (or part of it) is malformed; `field` names the part (e.g. `peers[3].mesh_ip`)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def obj(raw: object, where: str) -> Mapping[str, object]:
    if not isinstance(raw, dict):
        raise WireFormatError(f"{where}: must be an object", field=where)
    return raw


def text(doc: Mapping[str, object], key: str, where: str, *, empty: bool = True, limit: int = 4096) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or (not empty and not value) or len(value) > limit:
        need = "a string" if empty else "a non-empty string"
        raise WireFormatError(f"{where}.{key}: must be {need} (at most {limit} characters)", field=f"{where}.{key}")
    return value


def optional_text(doc: Mapping[str, object], key: str, where: str, default: str = "") -> str:
    return text(doc, key, where) if key in doc else default


def integer(doc: Mapping[str, object], key: str, where: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireFormatError(f"{where}.{key}: must be an integer", field=f"{where}.{key}")
    return value


def flag(doc: Mapping[str, object], key: str, where: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise WireFormatError(f"{where}.{key}: must be true or false", field=f"{where}.{key}")
    return value


def array(raw: object, where: str, limit: int = 1_000_000) -> list[object]:
    if not isinstance(raw, list) or len(raw) > limit:
        raise WireFormatError(f"{where}: must be a list", field=where)
    return raw


def strings(raw: object, where: str) -> tuple[str, ...]:
    items = array(raw, where)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise WireFormatError(f"{where}[{i}]: {item!r} is not a string", field=f"{where}[{i}]")
    return tuple(items)  # type: ignore[arg-type]  # checked above


def is_mesh_ipv4(value: str) -> bool:
    """A dotted-quad IPv4 address (no leading zeros, no prefix) inside 100.64.0.0/10."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except (OSError, TypeError, ValueError):
        return False
    return packed[0] == 100 and packed[1] & 0xC0 == 0x40


def mesh_ip(doc: Mapping[str, object], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not is_mesh_ipv4(value):
        raise WireFormatError(f"{where}.{key}: {value!r} is not a mesh IPv4 address", field=f"{where}.{key}")
    return value
