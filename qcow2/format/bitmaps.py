"""The bitmap directory (the ``bitmaps`` header extension's table of persistent bitmaps).

Parsed and built as bytes; the rules for what a directory may hold are
QEMU's (qcow2-bitmap.c: ``bitmap_list_load``, ``check_dir_entry``,
``check_table_entry``), with its error messages, since an image QEMU
refuses to open is refused here too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from construct import ConstructError

from . import layout as L

BME_MAX_TABLE_SIZE = 0x8000000  # QEMU's limits (qcow2-bitmap.c)
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_FLAG_IN_USE = 1 << 0  # not saved cleanly: the contents cannot be trusted
BME_FLAG_AUTO = 1 << 1  # tracks every write ("enabled")
BME_RESERVED_FLAGS = 0xFFFFFFFC
BT_DIRTY_TRACKING_BITMAP = 1


class BitmapDirectoryError(ValueError):
    """The directory breaks a rule QEMU enforces at open; the message is QEMU's."""


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    table_offset: int
    table_size: int  # entries of 8 bytes
    flags: int
    granularity_bits: int
    name: bytes
    type: int = BT_DIRTY_TRACKING_BITMAP

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BME_FLAG_AUTO)

    def with_(self, **fields: object) -> BitmapEntry:
        return replace(self, **fields)

    def problem(self, cluster_size: int, disk_size: int) -> str | None:
        """Why QEMU's check_dir_entry refuses this entry, or None.

        Also what bounds the table a walk reads: at most 512 MiB of bitmap
        data, so at most BME_MAX_PHYS_SIZE / cluster_size table entries.
        """
        if not self.table_size or not self.table_offset or self.table_offset % cluster_size:
            return "bitmap table offset or size is invalid"
        if self.table_size > BME_MAX_TABLE_SIZE or self.table_size * cluster_size > BME_MAX_PHYS_SIZE:
            return f"bitmap table of {self.table_size} entries is too large"
        if not BME_MIN_GRANULARITY_BITS <= self.granularity_bits <= BME_MAX_GRANULARITY_BITS:
            return f"bitmap granularity 2^{self.granularity_bits} is not supported"
        if self.flags & BME_RESERVED_FLAGS:
            return "bitmap has reserved flags set"
        if len(self.name) > BME_MAX_NAME_SIZE:
            return "bitmap name is too long"
        if self.type != BT_DIRTY_TRACKING_BITMAP:
            return f"bitmap type {self.type} is not supported"
        # An in-use bitmap may be too small: one not saved after a resize.
        if not self.in_use and disk_size > (self.table_size * cluster_size * 8) << self.granularity_bits:
            return "bitmap table too small for the disk"
        return None


def new_bitmap_problem(name: bytes, granularity_bits: int, disk_size: int, cluster_size: int) -> str | None:
    """Why QEMU's check_constraints_on_bitmap refuses a new bitmap of this image, or None
    (QEMU's words)."""
    if granularity_bits > BME_MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)"
    if granularity_bits < BME_MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << BME_MIN_GRANULARITY_BITS} bytes)"
    granules = -(-disk_size >> granularity_bits)
    needed = -(-granules // 8)  # bytes of bits
    if needed > BME_MAX_PHYS_SIZE or needed > BME_MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name) > BME_MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)"
    return None


def entry_size(name_size: int, extra_data_size: int = 0) -> int:
    return (L.BITMAP_ENTRY_FIXED_SIZE + extra_data_size + name_size + 7) & ~7


def load_bitmap_directory(
    directory: bytes, nb_bitmaps: int, cluster_size: int, disk_size: int
) -> list[BitmapEntry]:
    """The entries of a directory read whole, or BitmapDirectoryError as QEMU's bitmap_list_load."""
    entries: list[BitmapEntry] = []
    pos, end = 0, len(directory)
    while pos < end:
        if pos + L.BITMAP_ENTRY_FIXED_SIZE > end:
            raise BitmapDirectoryError("Broken bitmap directory")
        if len(entries) + 1 > nb_bitmaps:
            raise BitmapDirectoryError("More bitmaps found than specified in header extension")
        try:
            e = L.BitmapDirectoryEntry.parse(directory[pos:])
        except ConstructError:
            raise BitmapDirectoryError("Broken bitmap directory") from None
        size = entry_size(e.name_size, e.extra_data_size)
        if pos + size > end:
            raise BitmapDirectoryError("Broken bitmap directory")
        if e.extra_data_size:
            raise BitmapDirectoryError("Bitmap extra data is not supported")
        entry = BitmapEntry(
            e.bitmap_table_offset, e.bitmap_table_size, e.flags, e.granularity_bits, bytes(e.name), e.type
        )
        if entry.problem(cluster_size, disk_size):
            name = entry.name.decode("utf-8", "replace")
            raise BitmapDirectoryError(f"Bitmap '{name}' doesn't satisfy the constraints")
        entries.append(entry)
        pos += size
    if len(entries) != nb_bitmaps:
        raise BitmapDirectoryError("Less bitmaps found than specified in header extension")
    return entries


def build_bitmap_directory(entries: list[BitmapEntry]) -> bytes:
    """The directory QEMU's bitmap_list_store writes: no extra data, each entry padded to 8."""
    out = bytearray()
    for e in entries:
        out += L.BitmapDirectoryEntry.build(
            {
                "bitmap_table_offset": e.table_offset,
                "bitmap_table_size": e.table_size,
                "flags": e.flags,
                "type": BT_DIRTY_TRACKING_BITMAP,
                "granularity_bits": e.granularity_bits,
                "name_size": len(e.name),
                "extra_data_size": 0,
                "extra_data": b"",
                "name": e.name,
            }
        )
        out += bytes(-len(out) % 8)
    return bytes(out)


def decode_bitmap_table(raw: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(raw) // 8}Q", raw)


def table_entry_valid(value: int, cluster_size: int) -> bool:
    """QEMU's check_table_entry: no reserved bits; an offset is aligned and excludes bit 0."""
    if value & L.BME_RESERVED_MASK:
        return False
    offset = value & L.BME_OFFSET_MASK
    return not offset or not (value & L.BME_ALL_ONES or offset % cluster_size)


def bitmap_data_size(disk_size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for a disk: one bit per granule, in whole 64-bit words (QEMU's
    serialization size)."""
    bits = -(-disk_size >> granularity_bits) if disk_size else 0
    return -(-bits // 64) * 8


def bitmap_table_size(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the table that holds a disk's bitmap: one per cluster of data."""
    return -(-bitmap_data_size(disk_size, granularity_bits) // cluster_size)
