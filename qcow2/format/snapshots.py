"""The snapshot table: one walk over its entries, the table built back, and QEMU's look-ups.

Each entry is read the way QEMU's qcow2_read_snapshots reads it (the fixed
part, then extra data, id and name in one more read), so opening an image
touches the same pages QEMU touches.  :func:`build_snapshot_table` writes
entries as qcow2_write_snapshots does: at least QEMU's 24 bytes of extra data
(the values it knows, then any extra data it does not know, kept as read).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from construct import ConstructError

from . import layout as L

MAX_EXTRA_DATA = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_SIZE = 64 << 20  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
NO_ICOUNT = (1 << 64) - 1  # QEMU's -1ULL: no instruction count recorded

Pread = Callable[[int, int], bytes]


class SnapshotTableError(ValueError):
    """The table cannot be read as the header describes it."""


def c_string(raw: bytes) -> bytes:
    """What QEMU makes of an id or name: a C string, cut at the first NUL."""
    return raw.split(b"\0", 1)[0]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One entry of the table: its id and name as raw bytes (:attr:`id_str` and :attr:`name`,
    for messages, are read from them)."""

    l1_table_offset: int
    l1_size: int
    raw_id: bytes = b""
    raw_name: bytes = b""
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0  # the 64-bit size when the extra data holds it
    disk_size: int | None = None  # None: not recorded (QEMU takes the image's size at open)
    icount: int = NO_ICOUNT
    extra_data_size: int = 0
    unknown_extra: bytes = b""  # extra data past the fields QEMU knows

    @property
    def id_str(self) -> str:
        return c_string(self.raw_id).decode("utf-8", "replace")

    @property
    def name(self) -> str:
        return c_string(self.raw_name).decode("utf-8", "replace")


def _entry(sn) -> Snapshot:
    extra = bytes(sn.extra_data)
    fields = struct.unpack_from(">3Q", extra.ljust(L.SNAPSHOT_EXTRA_SIZE, b"\0"))
    raw_id, raw_name = bytes(sn.id_str), bytes(sn.name)
    return Snapshot(
        sn.l1_table_offset,
        sn.l1_size,
        raw_id,
        raw_name,
        sn.date_sec,
        sn.date_nsec,
        sn.vm_clock_nsec,
        fields[0] if len(extra) >= 8 else sn.vm_state_size,
        fields[1] if len(extra) >= 16 else None,
        fields[2] if len(extra) >= 24 else NO_ICOUNT,
        len(extra),
        extra[L.SNAPSHOT_EXTRA_SIZE :],
    )


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
        yield _entry(sn), pos - offset


def build_snapshot_table(snapshots: Sequence[Snapshot]) -> bytes:
    """The table's bytes, each entry 8-byte aligned, as qcow2_write_snapshots lays them out.

    Every entry's ``disk_size`` must be known (resolved at open when the table had none).
    """
    out = bytearray()
    for sn in snapshots:
        out += bytes(-len(out) % 8)
        extra = (
            L.SnapshotExtraData.build(
                {"vm_state_size_large": sn.vm_state_size, "disk_size": sn.disk_size, "icount": sn.icount}
            )
            + sn.unknown_extra
        )
        ident, name = c_string(sn.raw_id), c_string(sn.raw_name)
        out += L.SnapshotHeader.build(
            {
                "l1_table_offset": sn.l1_table_offset,
                "l1_size": sn.l1_size,
                "id_str_size": len(ident),
                "name_size": len(name),
                "date_sec": sn.date_sec,
                "date_nsec": sn.date_nsec,
                "vm_clock_nsec": sn.vm_clock_nsec,
                # Too big for 32 bits: older readers see a disk-only snapshot, not a cut state.
                "vm_state_size": sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0,
                "extra_data_size": len(extra),
                "extra_data": extra,
                "id_str": ident,
                "name": name,
            }
        )
    return bytes(out)


# -- finding snapshots, QEMU's way -----------------------------------------------------


def find_snapshot(snapshots: Sequence[Snapshot], ident: bytes | None, name: bytes | None) -> int:
    """QEMU's find_snapshot_by_id_and_name: the first entry matching what is given; -1 if none."""
    if ident is None and name is None:
        return -1
    for i, sn in enumerate(snapshots):
        if (ident is None or c_string(sn.raw_id) == ident) and (
            name is None or c_string(sn.raw_name) == name
        ):
            return i
    return -1


def find_snapshot_by_id_or_name(snapshots: Sequence[Snapshot], text: bytes) -> int:
    """An id first, else a name (QEMU's find_snapshot_by_id_or_name)."""
    index = find_snapshot(snapshots, text, None)
    return index if index >= 0 else find_snapshot(snapshots, None, text)


_LEADING_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]*)")
ULONG_MAX = (1 << 64) - 1


def next_snapshot_id(snapshots: Sequence[Snapshot]) -> bytes:
    """QEMU's find_new_snapshot_id: one more than the largest id read as a number (strtoul)."""
    highest = 0
    for sn in snapshots:
        sign, digits = _LEADING_NUMBER.match(c_string(sn.raw_id)).groups()
        digits = digits.lstrip(b"0") or b"0"
        value = ULONG_MAX + 1 if len(digits) > 20 else int(digits)  # past 20 digits: strtoul saturates
        value = ULONG_MAX if value > ULONG_MAX else (-value if sign == b"-" else value) & ULONG_MAX
        highest = max(highest, value)
    return str((highest + 1) & ULONG_MAX).encode()


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot as a user names it: by ``ident``, by ``name``, by both, or by ``id_or_name``
    (an id first, else a name), as qemu-nbd's ``-l snapshot.id=I,snapshot.name=N`` or ``-l X``."""

    ident: str | None = None
    name: str | None = None
    id_or_name: str | None = None

    def find(self, snapshots: Sequence[Snapshot]) -> int:
        """Index of the snapshot meant; -1 if there is none."""
        enc = os.fsencode
        if self.id_or_name is not None:
            return find_snapshot_by_id_or_name(snapshots, enc(self.id_or_name))
        return find_snapshot(
            snapshots,
            None if self.ident is None else enc(self.ident),
            None if self.name is None else enc(self.name),
        )

    def __str__(self) -> str:
        if self.id_or_name is not None:
            return self.id_or_name
        parts = [
            f"{k}={v}"
            for k, v in (("snapshot.id", self.ident), ("snapshot.name", self.name))
            if v is not None
        ]
        return ",".join(parts)
