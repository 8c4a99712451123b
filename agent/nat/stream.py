"""TURN over a byte stream (TCP, TLS over TCP): cutting the stream into STUN messages and ChannelData.

Over UDP each datagram is one message. Over a stream (RFC 8656 §12.5) messages follow each other
back to back, and the receiver finds the boundaries from the headers:

- STUN (first two bits 00): a 20-byte header whose length field counts the attributes, which are
  always a multiple of four bytes, so the message is `20 + length` bytes;
- ChannelData (first two bits 01, channel numbers 0x4000-0x4FFF): a 4-byte header (channel,
  length) and `length` bytes of payload, then zero padding up to the next multiple of four: the
  padding is not counted in the length field, but over TCP and TLS it MUST be sent (so that the next
  message starts aligned) and the receiver skips it;
- anything else (first bits 10 or 11) cannot start a message: the stream lost its framing, and the
  only recovery is a new connection.

`ChannelStream` takes whatever `data_received` hands it (any size: a byte, half a header, many
messages) and calls `deliver(message)` once per complete message, without the padding. It keeps
one `bytearray` and an offset, so a read of many messages costs one copy per message, not one copy of
the rest of the buffer per message (aioice's own framer, `TurnStreamMixin`, re-slices the whole
buffer for every message: quadratic in the messages per read).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")  # by bytes missing to a multiple of four


class FramingError(ValueError):
    """The stream does not carry TURN messages (or lost its framing)."""


def padded(length: int) -> int:
    """`length` rounded up to a multiple of four (RFC 8656 §12.5)."""
    return (length + 3) & ~3


def channel_frame(channel: int, payload: bytes, *, stream: bool) -> bytes:
    """A ChannelData message; over a stream (TCP/TLS) padded to a multiple of four bytes."""
    header = struct.pack("!HH", channel, len(payload))
    if stream:
        return b"".join((header, payload, _PADDING[-len(payload) & 3]))  # one copy of the payload
    return header + payload


def message_size(header: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(bytes the message occupies on the stream, bytes to deliver) from its first four bytes."""
    first = header[0]
    length = header[2] << 8 | header[3]
    if first & 0xC0 == 0x40:  # ChannelData
        channel = first << 8 | header[1]
        if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
            raise FramingError(f"ChannelData with reserved channel number 0x{channel:04x}")
        return 4 + padded(length), 4 + length
    if first & 0xC0 == 0x00:  # STUN: attributes are padded already
        if length & 3:
            raise FramingError(f"STUN message length {length} is not a multiple of 4")
        return 20 + length, 20 + length
    raise FramingError(f"neither STUN nor ChannelData (first byte 0x{first:02x})")


class ChannelStream:
    """Splits a TURN byte stream into messages; `deliver(message)` per complete message."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self.deliver = deliver
        self.buffer = bytearray()
        self.messages = 0
        self.broken: str | None = None  # why the framing was lost (then nothing more is delivered)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the stream. FramingError when they cannot be TURN (sticky: the
        stream is unusable from there on, and every later call raises it again)."""
        if self.broken is not None:
            raise FramingError(self.broken)
        buf = self.buffer
        buf += data
        offset, end = 0, len(buf)
        try:
            while end - offset >= 4:
                on_stream, size = message_size(buf[offset : offset + 4])
                if end - offset < on_stream:
                    break
                message = bytes(buf[offset : offset + size])
                offset += on_stream
                self.messages += 1
                self.deliver(message)
        except FramingError as exc:
            self.broken = str(exc)
            buf.clear()
            raise
        finally:
            if offset and self.broken is None:
                del buf[:offset]
