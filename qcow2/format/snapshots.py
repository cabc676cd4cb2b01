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
    pread: Pread, offset: int, count: int, max_extra: int | None = None
) -> Iterator[tuple[Snapshot, int]]:
    """Each entry with the table's length up to its end (no padding after the last).

    ``max_extra``: refuse an entry with more extra data (QEMU refuses to open
    such an image); reading stops at the first bad entry with
    :class:`SnapshotTableError`.
    """
    pos = offset
    for _ in range(count):
        pos = (pos + 7) & ~7
        fixed = pread(pos, L.SNAPSHOT_FIXED_SIZE)
        extra = struct.unpack_from(">I", fixed, 36)[0] if len(fixed) >= 40 else 0
        id_len, name_len = struct.unpack_from(">HH", fixed, 12) if len(fixed) >= 16 else (0, 0)
        if max_extra is not None and extra > max_extra:
            raise SnapshotTableError(f"too much extra metadata in snapshot table entry ({extra} bytes)")
        raw = fixed + pread(pos + L.SNAPSHOT_FIXED_SIZE, extra + id_len + name_len)
        try:
            sn = L.SnapshotHeader.parse(raw)
        except ConstructError:
            raise SnapshotTableError("snapshot table is truncated") from None
        pos += len(raw)
        yield (
            Snapshot(
                sn.l1_table_offset,
                sn.l1_size,
                bytes(sn.id_str).decode("utf-8", "replace"),
                bytes(sn.name).decode("utf-8", "replace"),
            ),
            pos - offset,
        )
