#!/usr/bin/env python3
"""STUN/TURN probe for the relay scenario: standard library only (it runs on the test hosts).

    turn_probe.py stun HOST:PORT
        prints {"ok": true, "mapped": [ip, port]} (STUN Binding) or {"ok": false, "error": ...}
    turn_probe.py allocate HOST:PORT [--peer NAME] [--ttl S] [--permit IP ...] < SECRET
        reads a TURN REST API shared secret on stdin, makes the credentials the coordinator would
        (username "<expiry>:<peer>", password base64(HMAC-SHA1(secret, username))), allocates a UDP
        relay, asks for a permission per --permit address (no packet is sent to those addresses:
        CreatePermission only installs a permission on the server) and releases the allocation.
        prints {"ok": true, "relayed": [...], "mapped": [...], "permissions": {IP: "ok" | "403 ..."}}
        or {"ok": false, "error": "401 Unauthorized"}.

Exit status 0 when the STUN/TURN request succeeded, 1 when the server refused it, 2 on no answer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import struct
import sys
import time
import zlib

MAGIC = 0x2112A442
BINDING, ALLOCATE, REFRESH, CREATE_PERMISSION = 0x001, 0x003, 0x004, 0x008
A_USERNAME, A_INTEGRITY, A_ERROR, A_LIFETIME = 0x0006, 0x0008, 0x0009, 0x000D
A_PEER, A_REALM, A_NONCE, A_RELAYED, A_TRANSPORT, A_MAPPED = 0x0012, 0x0014, 0x0015, 0x0016, 0x0019, 0x0020
A_FINGERPRINT = 0x8028


class NoAnswer(Exception):
    pass


def _type(method: int, cls: int) -> int:
    # cls: 0 request, 1 indication, 2 success, 3 error (RFC 5389 section 6 bit layout)
    return (method & 0xF) | ((method & 0x70) << 1) | ((method & 0xF80) << 2) | ((cls & 1) << 4) | ((cls & 2) << 7)


def _split_type(value: int) -> tuple[int, int]:
    method = (value & 0xF) | ((value >> 1) & 0x70) | ((value >> 2) & 0xF80)
    cls = ((value >> 4) & 1) | ((value >> 7) & 2)
    return method, cls


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def _xor_address(ip: str, port: int, tid: bytes) -> bytes:
    packed = ipaddress.ip_address(ip).packed
    family = 1 if len(packed) == 4 else 2
    mask = struct.pack("!I", MAGIC) + tid
    xored = bytes(b ^ mask[i] for i, b in enumerate(packed))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC >> 16)) + xored


def _parse_xor_address(value: bytes, tid: bytes) -> list[object]:
    family, port = value[1], struct.unpack("!H", value[2:4])[0] ^ (MAGIC >> 16)
    mask = struct.pack("!I", MAGIC) + tid
    raw = value[4 : 8 if family == 1 else 20]
    return [str(ipaddress.ip_address(bytes(b ^ mask[i] for i, b in enumerate(raw)))), port]


def build(method: int, attrs: list[tuple[int, bytes]], key: bytes | None = None) -> tuple[bytes, bytes]:
    tid = os.urandom(12)
    body = b"".join(_attr(k, v) for k, v in attrs)
    if key is not None:  # MESSAGE-INTEGRITY over the message whose length already counts it
        header = struct.pack("!HHI", _type(method, 0), len(body) + 24, MAGIC) + tid
        body += _attr(A_INTEGRITY, hmac.new(key, header + body, hashlib.sha1).digest())
    header = struct.pack("!HHI", _type(method, 0), len(body) + 8, MAGIC) + tid
    crc = (zlib.crc32(header + body) ^ 0x5354554E) & 0xFFFFFFFF
    body += _attr(A_FINGERPRINT, struct.pack("!I", crc))
    return struct.pack("!HHI", _type(method, 0), len(body), MAGIC) + tid + body, tid


def parse(data: bytes) -> tuple[int, int, bytes, dict[int, bytes]]:
    kind, length, magic = struct.unpack("!HHI", data[:8])
    if magic != MAGIC or len(data) < 20 + length:
        raise ValueError("not a STUN message")
    tid, attrs, pos = data[8:20], {}, 20
    while pos + 4 <= 20 + length:
        a_kind, a_len = struct.unpack("!HH", data[pos : pos + 4])
        attrs.setdefault(a_kind, data[pos + 4 : pos + 4 + a_len])
        pos += 4 + a_len + (-a_len % 4)
    method, cls = _split_type(kind)
    return method, cls, tid, attrs


def transact(sock: socket.socket, server: tuple[str, int], message: bytes, tid: bytes, timeout: float = 3.0):
    for attempt in range(3):
        sock.sendto(message, server)
        deadline = time.monotonic() + timeout / 3 * (attempt + 1)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(4096)
            except (TimeoutError, ConnectionRefusedError):
                break
            try:
                method, cls, r_tid, attrs = parse(data)
            except ValueError:
                continue
            if r_tid == tid:
                return cls, attrs
    raise NoAnswer(f"no answer from {server[0]}:{server[1]}")


def _error(attrs: dict[int, bytes]) -> str:
    value = attrs.get(A_ERROR, b"\0\0\0\0")
    return f"{value[2] * 100 + value[3]} {value[4:].decode(errors='replace')}".strip()


def stun(server: tuple[str, int]) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        message, tid = build(BINDING, [])
        cls, attrs = transact(sock, server, message, tid)
        if cls != 2 or A_MAPPED not in attrs:
            return {"ok": False, "error": _error(attrs)}
        return {"ok": True, "mapped": _parse_xor_address(attrs[A_MAPPED], tid)}


def allocate(server: tuple[str, int], secret: str, peer: str, ttl: int, permit: list[str]) -> dict[str, object]:
    username = f"{int(time.time()) + ttl}:{peer}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    transport = [(A_TRANSPORT, bytes([17, 0, 0, 0]))]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        message, tid = build(ALLOCATE, transport)
        cls, attrs = transact(sock, server, message, tid)
        if cls != 3 or A_NONCE not in attrs:
            return {"ok": False, "error": f"unexpected answer to an unauthenticated Allocate ({_error(attrs)})"}
        realm, nonce = attrs[A_REALM], attrs[A_NONCE]
        key = hashlib.md5(username.encode() + b":" + realm + b":" + password.encode()).digest()  # noqa: S324 (RFC 5389)
        auth = [(A_USERNAME, username.encode()), (A_REALM, realm), (A_NONCE, nonce)]
        message, tid = build(ALLOCATE, transport + auth, key)
        cls, attrs = transact(sock, server, message, tid)
        if cls != 2:
            return {"ok": False, "error": _error(attrs)}
        result: dict[str, object] = {
            "ok": True,
            "relayed": _parse_xor_address(attrs[A_RELAYED], tid),
            "mapped": _parse_xor_address(attrs[A_MAPPED], tid) if A_MAPPED in attrs else None,
            "permissions": {},
        }
        for ip in permit:
            message, p_tid = build(CREATE_PERMISSION, [(A_PEER, _xor_address(ip, 0, b"")), *auth], key)
            # XOR-PEER-ADDRESS is xored with the magic cookie (and the transaction id for IPv6 only)
            cls, p_attrs = transact(sock, server, message, p_tid)
            result["permissions"][ip] = "ok" if cls == 2 else _error(p_attrs)  # type: ignore[index]
        message, tid = build(REFRESH, [(A_LIFETIME, struct.pack("!I", 0)), *auth], key)
        try:
            transact(sock, server, message, tid, timeout=1.0)
        except NoAnswer:
            pass
        return result


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stun").add_argument("server", type=_address)
    p_alloc = sub.add_parser("allocate")
    p_alloc.add_argument("server", type=_address)
    p_alloc.add_argument("--peer", default="probe")
    p_alloc.add_argument("--ttl", type=int, default=600)
    p_alloc.add_argument("--permit", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        if args.command == "stun":
            result = stun(args.server)
        else:
            secret = sys.stdin.readline().strip()
            if not secret:
                parser.error("the shared secret is read from stdin")
            result = allocate(args.server, secret, args.peer, args.ttl, args.permit)
    except NoAnswer as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
