"""Refcount blocks: the one codec for every refcount width (1 to 64 bits).

Entries of 8 bits and more are big-endian integers; narrower ones are packed
into bytes starting at the least significant bit (spec §"Refcount table").
:func:`decode_refcounts` and :func:`encode_refcounts` convert whole blocks;
:class:`RefcountCodec` reads and writes single entries in place.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_WIDE = {16: "H", 32: "I", 64: "Q"}


def decode_refcounts(block: bytes | bytearray, bits: int) -> Sequence[int]:
    """Every refcount of a block, in order (``bytes`` for 8-bit refcounts: no copy into ints)."""
    if bits == 8:
        return bytes(block)
    if bits > 8:
        return struct.unpack(f">{len(block) * 8 // bits}{_WIDE[bits]}", block)
    mask = (1 << bits) - 1
    per_byte = 8 // bits
    return [(byte >> (i * bits)) & mask for byte in block for i in range(per_byte)]


def encode_refcounts(values: Sequence[int], bits: int) -> bytes:
    """The on-disk bytes of ``values`` (``len(values) * bits`` must be whole bytes)."""
    if bits == 8:
        return bytes(values)
    if bits > 8:
        return struct.pack(f">{len(values)}{_WIDE[bits]}", *values)
    counts = bytes(values)  # every value fits in a byte
    per_byte = 8 // bits
    acc = 0
    for k in range(per_byte):
        shift = k * bits
        table = bytes(((v << shift) & 0xFF) for v in range(256))
        acc |= int.from_bytes(counts[k::per_byte].translate(table), "little")
    return acc.to_bytes(len(counts) // per_byte, "little")


class RefcountCodec:
    """Single entries of refcount blocks of one width, read and written in place."""

    __slots__ = ("bits", "max_value", "per_block", "_bytes")

    def __init__(self, refcount_order: int, cluster_size: int) -> None:
        self.bits = 1 << refcount_order
        self.max_value = (1 << self.bits) - 1
        self.per_block = cluster_size * 8 // self.bits
        self._bytes = self.bits >> 3  # bytes per entry (0 below 8 bits)

    def get(self, block: bytes | bytearray, index: int) -> int:
        b = self._bytes
        if b:
            return int.from_bytes(block[index * b : index * b + b], "big")
        bit = index * self.bits
        return (block[bit >> 3] >> (bit & 7)) & self.max_value

    def set(self, block: bytearray, index: int, value: int) -> tuple[int, int]:
        """Store ``value``; returns the byte range of the block that changed."""
        b = self._bytes
        if b:
            block[index * b : index * b + b] = value.to_bytes(b, "big")
            return index * b, index * b + b
        bit = index * self.bits
        shift = bit & 7
        byte = block[bit >> 3] & ~(self.max_value << shift) & 0xFF
        block[bit >> 3] = byte | (value << shift)
        return bit >> 3, (bit >> 3) + 1

    def decode(self, block: bytes | bytearray) -> Sequence[int]:
        return decode_refcounts(block, self.bits)

    def encode(self, values: Sequence[int]) -> bytes:
        """A whole block: ``values`` then zeros up to the block's size."""
        values = (
            list(values) + [0] * (self.per_block - len(values)) if len(values) < self.per_block else values
        )
        return encode_refcounts(values, self.bits)
