"""The bitmap directory (the ``bitmaps`` header extension's table of persistent bitmaps)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from construct import ConstructError

from . import layout as L


class BitmapDirectoryError(ValueError):
    """An entry runs past the end of the directory."""


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    table_offset: int
    table_size: int  # entries of 8 bytes
    flags: int
    granularity_bits: int
    name: bytes


def walk_bitmap_directory(directory: bytes, count: int | None = None) -> Iterator[BitmapEntry]:
    """The entries of a directory read whole.

    ``count`` given: exactly that many entries, and :class:`BitmapDirectoryError`
    if they do not fit; otherwise as many as fit (QEMU walks by size).
    """
    pos = 0
    n = 0
    while (count is None and pos + L.BITMAP_ENTRY_FIXED_SIZE <= len(directory)) or (
        count is not None and n < count
    ):
        try:
            e = L.BitmapDirectoryEntry.parse(directory[pos:])
        except ConstructError:
            if count is None:
                return
            raise BitmapDirectoryError("bitmap directory entry is truncated") from None
        yield BitmapEntry(
            e.bitmap_table_offset, e.bitmap_table_size, e.flags, e.granularity_bits, bytes(e.name)
        )
        pos += (L.BITMAP_ENTRY_FIXED_SIZE + e.extra_data_size + e.name_size + 7) & ~7
        n += 1


def decode_bitmap_table(raw: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(raw) // 8}Q", raw)
