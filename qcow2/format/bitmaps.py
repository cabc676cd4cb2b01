"""The bitmap directory (the ``bitmaps`` header extension's table of persistent bitmaps)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from construct import ConstructError

from . import layout as L

BME_MAX_TABLE_SIZE = 0x8000000  # QEMU's limits (qcow2-bitmap.c)
BME_MAX_PHYS_SIZE = 0x20000000


class BitmapDirectoryError(ValueError):
    """An entry runs past the end of the directory."""


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    table_offset: int
    table_size: int  # entries of 8 bytes
    flags: int
    granularity_bits: int
    name: bytes

    def problem(self, cluster_size: int, disk_size: int) -> str | None:
        """Why QEMU would refuse this entry (its check_dir_entry), or None.

        Also what bounds the table a walk reads: at most 512 MiB of bitmap
        data, so at most BME_MAX_PHYS_SIZE / cluster_size table entries.
        """
        if not self.table_size or not self.table_offset or self.table_offset % cluster_size:
            return "bitmap table offset or size is invalid"
        if self.table_size > BME_MAX_TABLE_SIZE or self.table_size * cluster_size > BME_MAX_PHYS_SIZE:
            return f"bitmap table of {self.table_size} entries is too large"
        if not 9 <= self.granularity_bits <= 31:
            return f"bitmap granularity 2^{self.granularity_bits} is not supported"
        if disk_size > (self.table_size * cluster_size * 8) << self.granularity_bits:
            return "bitmap table too small for the disk"
        return None


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
