"""The snapshot table: one walk over its entries, for opening, checking and overlap checks.

Each entry is read the way QEMU's qcow2_read_snapshots reads it (the fixed
part, then extra data, id and name in one more read), so opening an image
touches the same pages QEMU touches.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from construct import ConstructError

from . import layout as L

MAX_EXTRA_DATA = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_SIZE = 64 << 20  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE

Pread = Callable[[int, int], bytes]


class SnapshotTableError(ValueError):
    """The table cannot be read as the header describes it."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str


def walk_snapshot_table(
    pread: Pread, offset: int, count: int, max_extra: int = MAX_EXTRA_DATA
) -> Iterator[tuple[Snapshot, int]]:
    """Each entry with the table's length up to its end (no padding after the last).

    What QEMU refuses to open, this refuses with QEMU's words (reading stops
    at the first bad entry with :class:`SnapshotTableError`): an entry with
    more than ``max_extra`` bytes of extra data, a table longer than
    MAX_TABLE_SIZE.  So one entry costs at most 130 KiB of reading, however
    big its fields claim to be.
    """
    pos = offset
    for i in range(count):
        pos = (pos + 7) & ~7
        fixed = pread(pos, L.SNAPSHOT_FIXED_SIZE)
        extra = struct.unpack_from(">I", fixed, 36)[0] if len(fixed) >= 40 else 0
        id_len, name_len = struct.unpack_from(">HH", fixed, 12) if len(fixed) >= 16 else (0, 0)
        if extra > max_extra:
            raise SnapshotTableError(f"Too much extra metadata in snapshot table entry {i}")
        raw = fixed + pread(pos + L.SNAPSHOT_FIXED_SIZE, extra + id_len + name_len)
        try:
            sn = L.SnapshotHeader.parse(raw)
        except ConstructError:
            raise SnapshotTableError("Failed to read snapshot table") from None
        pos += len(raw)
        if pos - offset > MAX_TABLE_SIZE:
            raise SnapshotTableError("Snapshot table is too big")
        yield (
            Snapshot(
                sn.l1_table_offset,
                sn.l1_size,
                bytes(sn.id_str).decode("utf-8", "replace"),
                bytes(sn.name).decode("utf-8", "replace"),
            ),
            pos - offset,
        )
