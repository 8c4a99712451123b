"""Bit-set helpers: peer sets are Python ints (bit i = peer slot i), so unions and diffs run in C."""

from __future__ import annotations

from collections.abc import Iterator

_BYTE_BITS: tuple[tuple[int, ...], ...] = tuple(tuple(i for i in range(8) if b >> i & 1) for b in range(256))


def iter_bits(mask: int) -> Iterator[int]:
    """Yield the indexes of the set bits of `mask`, lowest first."""
    if mask <= 0:
        return
    data = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    table = _BYTE_BITS
    for idx, byte in enumerate(data):
        if byte:
            base = idx << 3
            for bit in table[byte]:
                yield base + bit


def bit_list(mask: int) -> list[int]:
    """The indexes of the set bits of `mask` as a list (faster than iterating `iter_bits`)."""
    if mask <= 0:
        return []
    data = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    table = _BYTE_BITS
    return [(idx << 3) + bit for idx, byte in enumerate(data) if byte for bit in table[byte]]


def popcount(mask: int) -> int:
    return mask.bit_count()
