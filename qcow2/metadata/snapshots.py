"""Internal snapshots taken, deleted, applied and loaded, as QEMU's qcow2-snapshot.c does them.

A snapshot is a copy of the active L1 table plus one more reference to every
L2 table and cluster that table reaches; a shared cluster loses its COPIED
flag (writes copy it first).  Every operation keeps the image consistent at
each instant, in QEMU's order:

- create: the L1 copy written; the refcounts of what it reaches raised and
  synced, and COPIED cleared (L2 tables, then the active L1); a new snapshot
  table written and synced; the header switched to it; the old table freed.
- delete: a table without the entry first (the header switched, the old
  table freed); then the references of its L1 dropped, its L1 freed, COPIED
  set again where a refcount fell to 1.
- apply: the disk size restored; the snapshot's references raised and synced;
  its L1 written over the active one (synced); the old active references
  dropped; COPIED fixed.

A crash between steps leaks clusters at worst.  The functions work on the
image's metadata owner (:class:`SnapshotOwner`), which holds them; refcounts
change through its :class:`~.refcounts.Refcounts`.
"""

from __future__ import annotations

import errno
import functools
import struct
from collections.abc import Callable
from typing import Protocol, TypeVar

from ..format import layout as L
from ..format.header import MAX_HOST_OFFSET, MAX_L1_BYTES, MAX_SNAPSHOTS, Header
from ..format.l2 import COMPRESSED, NORMAL, ZERO_ALLOCATED, L2Layout, L2Table
from ..format.snapshots import (
    MAX_TABLE_SIZE,
    Snapshot,
    SnapshotRef,
    build_snapshot_table,
    next_snapshot_id,
)
from ..hostfile import HostFile
from . import overlap as O
from .bitmaps import PersistentBitmaps
from .cache import TableCache
from .refcounts import Refcounts

_IGNORE_INACTIVE_L1 = frozenset({O.INACTIVE_L1})
T = TypeVar("T")


class SnapshotOwner(Protocol):
    """What the snapshot operations need of the image's metadata owner (which holds them)."""

    file: HostFile
    header: Header
    layout: L2Layout
    refcounts: Refcounts
    cluster_size: int
    cluster_bits: int
    l1: list[int]
    l2_tables: TableCache[L2Table]
    snapshots: list[Snapshot]
    snapshot_table_size: int
    bitmaps: PersistentBitmaps

    def l2_table(self, offset: int) -> L2Table: ...
    def l2_changed(self, l2_offset: int, first: int, count: int) -> None: ...
    def set_l1(self, index: int, value: int) -> None: ...
    def write_l1(self, entries: list[int]) -> None: ...
    def grow_l1(self, entries: int) -> None: ...
    def write_back(self) -> None: ...
    def set_header(self, **fields: int) -> None: ...
    def check_write(self, offset: int, length: int, ignore: frozenset[str] = frozenset()) -> None: ...
    def mark_corrupt(self, why: str) -> None: ...
    def metadata_moved(self) -> None: ...


def _clusters(meta: SnapshotOwner, nbytes: int) -> int:
    return -(-nbytes >> meta.cluster_bits) if nbytes else 0


def _alloc(meta: SnapshotOwner, nbytes: int) -> int:
    """QEMU's qcow2_alloc_clusters for a byte count: 0 for nothing."""
    return meta.refcounts.alloc(_clusters(meta, nbytes)) << meta.cluster_bits if nbytes else 0


def _free(meta: SnapshotOwner, offset: int, nbytes: int) -> None:
    """QEMU's qcow2_free_clusters of a byte range (punched out, as its discard-snapshot default)."""
    if nbytes:
        first = offset >> meta.cluster_bits
        last = (offset + nbytes - 1) >> meta.cluster_bits
        meta.refcounts.free(first, last - first + 1, discard=True)


def _sync_refcounts(meta: SnapshotOwner) -> None:
    """Refcounts on disk before anything relies on them (lazy refcounts or not)."""
    meta.refcounts.write_dirty()
    meta.file.flush()


def _strict_refcounts(operation: Callable[..., T]) -> Callable[..., T]:
    """During ``operation`` every write-back writes the refcounts first, lazy refcounts or not:
    its steps are crash-safe on their own, not through the dirty bit."""

    @functools.wraps(operation)
    def run(meta: SnapshotOwner, *args):
        lazy, meta.refcounts.lazy = meta.refcounts.lazy, False
        try:
            return operation(meta, *args)
        finally:
            meta.refcounts.lazy = lazy

    return run


def read_l1(meta: SnapshotOwner, sn: Snapshot) -> list[int]:
    raw = meta.file.pread(sn.l1_table_offset, sn.l1_size * 8)
    if len(raw) < sn.l1_size * 8:
        raise OSError(errno.EIO, "Snapshot L1 table extends beyond the end of the file")
    return list(struct.unpack(f">{sn.l1_size}Q", raw))


def validate_l1(meta: SnapshotOwner, sn: Snapshot) -> None:
    """QEMU's qcow2_validate_table for a snapshot's L1 table, with its words."""
    if sn.l1_size * 8 > MAX_L1_BYTES:
        raise OSError(errno.EFBIG, "Snapshot L1 table too large")
    if sn.l1_table_offset & (meta.cluster_size - 1) or sn.l1_table_offset + sn.l1_size * 8 >= 1 << 63:
        raise OSError(errno.EINVAL, "Snapshot L1 table offset invalid")


def disk_size(meta: SnapshotOwner, sn: Snapshot) -> int:
    """The snapshot's disk size, refused when no image could have it (a header field we trust no
    more than the header's own size)."""
    size = sn.disk_size if sn.disk_size is not None else meta.header.size
    l1_entries = -(-size // (meta.cluster_size * meta.layout.entries))
    if size >= MAX_HOST_OFFSET or l1_entries * 8 > MAX_L1_BYTES:
        raise OSError(errno.EFBIG, f"Snapshot disk size {size} is too large")
    return size


def _no_data_file(meta: SnapshotOwner) -> None:
    if meta.header.has_data_file:
        raise OSError(errno.ENOTSUP, "images with an external data file have no internal snapshots")


def update_refcounts(meta: SnapshotOwner, l1: list[int], addend: int) -> list[int]:
    """QEMU's qcow2_update_snapshot_refcount over the L1 entries ``l1``.

    Adds ``addend`` (-1, 0 or 1) to the refcount of every L2 table the
    entries name and of every cluster those tables map; sets the COPIED flag
    of each L2 entry whose cluster is then referenced once and clears it
    elsewhere (changed tables go out at the owner's next write-back; a table
    freed on the way is forgotten).  Returns the L1 entries with their COPIED
    flags likewise updated; writing them is the caller's business.
    """
    refs, layout = meta.refcounts, meta.layout
    cbits, mask = meta.cluster_bits, meta.cluster_size - 1
    out = list(l1)
    for i, l1e in enumerate(l1):
        l2_offset = l1e & L.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset & mask:
            meta.mark_corrupt(f"L2 table offset {l2_offset:#x} unaligned (L1 index: {i:#x})")
        table = meta.l2_table(l2_offset)
        entries = table.entries
        lo = hi = -1
        for j in list(table.used):
            old = entries[j]
            entry = old & ~L.QCOW_OFLAG_COPIED
            ctype = layout.cluster_type(entry)
            if ctype == COMPRESSED:
                if addend:
                    first, count = layout.compressed_clusters(entry)
                    refs.change(first, count, addend, discard=addend < 0)
                refcount = 2  # a compressed cluster is never written in place
            elif ctype in (NORMAL, ZERO_ALLOCATED) and entry & L.L2E_OFFSET_MASK:
                host = entry & L.L2E_OFFSET_MASK
                if host & mask:
                    meta.mark_corrupt(
                        f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_offset:#x}, "
                        f"L2 index: {j:#x})"
                    )
                if addend:
                    refs.change(host >> cbits, 1, addend, discard=addend < 0)
                refcount = refs.get(host >> cbits)
            else:
                refcount = 0
            if refcount == 1:
                entry |= L.QCOW_OFLAG_COPIED
            if entry != old:
                table.set(j, entry, table.bitmap(j))
                lo = j if lo < 0 else lo
                hi = j
        if lo >= 0:
            meta.l2_changed(l2_offset, lo, hi - lo + 1)
        if addend:
            refs.change(l2_offset >> cbits, 1, addend, discard=addend < 0)
        refcount = refs.get(l2_offset >> cbits)
        if not refcount:
            meta.l2_tables.discard(l2_offset)
        out[i] = l2_offset | (L.QCOW_OFLAG_COPIED if refcount == 1 else 0)
    return out


def _set_active_l1(meta: SnapshotOwner, entries: list[int]) -> None:
    """Changed active L1 entries, written back after the L2 tables (the owner's order)."""
    for i, value in enumerate(entries):
        if meta.l1[i] != value:
            meta.set_l1(i, value)
    meta.write_back()


def fix_copied_flags(meta: SnapshotOwner) -> None:
    """COPIED flags of the active tables as the refcounts now say (QEMU's update with addend 0)."""
    _set_active_l1(meta, update_refcounts(meta, list(meta.l1), 0))


def write_snapshot_table(meta: SnapshotOwner, snapshots: list[Snapshot]) -> None:
    """QEMU's qcow2_write_snapshots: a new table, synced, the header switched, the old one freed."""
    raw = build_snapshot_table(snapshots)
    if len(raw) > MAX_TABLE_SIZE:
        raise OSError(errno.EFBIG, "Snapshot table is too big")
    offset = _alloc(meta, len(raw))
    try:
        _sync_refcounts(meta)
        meta.check_write(offset, len(raw))  # not yet named by the header: nothing may live there
        meta.file.write(offset, raw)
        meta.file.flush()
        old_offset, old_size = meta.header.snapshots_offset, meta.snapshot_table_size
        meta.set_header(nb_snapshots=len(snapshots), snapshots_offset=offset)
    except BaseException:
        if meta.header.snapshots_offset != offset:
            _free(meta, offset, len(raw))
        raise
    meta.snapshots[:] = snapshots
    meta.snapshot_table_size = len(raw)
    meta.metadata_moved()
    _free(meta, old_offset, old_size)


# -- what each operation refuses, in QEMU's order (also asked before opening for writing) --


def _find(meta: SnapshotOwner, ref: SnapshotRef) -> int:
    index = ref.find(meta.snapshots)
    if index < 0:
        raise OSError(errno.ENOENT, "Can't find the snapshot")
    return index


def check(meta: SnapshotOwner, action: str, ref: SnapshotRef | None = None) -> None:
    """Would ``create``, ``delete`` or ``apply`` be refused?  OSError with QEMU's errno and words."""
    if action == "create":
        check_create(meta)
    elif action == "delete":
        check_delete(meta, ref)
    else:
        check_apply(meta, ref)


def check_create(meta: SnapshotOwner) -> None:
    _no_data_file(meta)
    if len(meta.snapshots) >= MAX_SNAPSHOTS:
        raise OSError(errno.EFBIG, "too many snapshots")


def check_delete(meta: SnapshotOwner, ref: SnapshotRef) -> int:
    index = _find(meta, ref)  # qemu-img's own look-up comes before the driver's refusals
    _no_data_file(meta)
    validate_l1(meta, meta.snapshots[index])
    return index


def check_apply(meta: SnapshotOwner, ref: SnapshotRef) -> int:
    if meta.bitmaps.bitmaps:  # the generic block layer's refusal, before the driver's
        raise OSError(errno.EBUSY, "Device has active dirty bitmaps")
    _no_data_file(meta)
    index = _find(meta, ref)
    validate_l1(meta, meta.snapshots[index])
    disk_size(meta, meta.snapshots[index])
    return index


# -- the operations ------------------------------------------------------------------------


def load(meta: SnapshotOwner, index: int) -> int:
    """Read-only view (QEMU's qcow2_snapshot_load_tmp): the snapshot's L1 table replaces the
    active one in memory, nothing is written; returns the snapshot's disk size."""
    sn = meta.snapshots[index]
    validate_l1(meta, sn)
    size = disk_size(meta, sn)
    meta.l1[:] = read_l1(meta, sn)  # the same list: readers hold it
    meta.l2_tables.clear()
    meta.metadata_moved()
    return size


@_strict_refcounts
def create(meta: SnapshotOwner, name: bytes, date_sec: int, date_nsec: int) -> Snapshot:
    """QEMU's qcow2_snapshot_create for a disk-only snapshot (no VM state, as qemu-img makes)."""
    check_create(meta)
    meta.write_back()
    l1 = list(meta.l1)
    raw = struct.pack(f">{len(l1)}Q", *l1)
    l1_offset = _alloc(meta, len(raw))
    if raw:
        meta.check_write(l1_offset, len(raw))
        meta.file.write(l1_offset, raw)
    shared = update_refcounts(meta, l1, +1)
    _sync_refcounts(meta)
    _set_active_l1(meta, shared)
    ident = next_snapshot_id(meta.snapshots)
    sn = Snapshot(
        l1_offset,
        len(l1),
        ident,
        name,
        date_sec,
        date_nsec,
        disk_size=meta.header.size // 512 * 512,
        icount=0,
        extra_data_size=L.SNAPSHOT_EXTRA_SIZE,
    )
    write_snapshot_table(meta, [*meta.snapshots, sn])
    return sn


@_strict_refcounts
def delete(meta: SnapshotOwner, ref: SnapshotRef) -> None:
    """QEMU's qcow2_snapshot_delete."""
    index = check_delete(meta, ref)
    sn = meta.snapshots[index]
    meta.write_back()
    try:
        write_snapshot_table(meta, meta.snapshots[:index] + meta.snapshots[index + 1 :])
    except OSError as e:
        raise OSError(e.errno, f"Failed to remove snapshot from snapshot list: {e.strerror}") from None
    # From here on nothing names the snapshot: a failure only leaks clusters.
    update_refcounts(meta, read_l1(meta, sn), -1)
    _free(meta, sn.l1_table_offset, sn.l1_size * 8)
    _sync_refcounts(meta)
    fix_copied_flags(meta)


@_strict_refcounts
def apply(meta: SnapshotOwner, ref: SnapshotRef) -> int:
    """QEMU's bdrv_snapshot_goto and qcow2_snapshot_goto: the active L1 becomes a copy of the
    snapshot's; returns the restored disk size.  The snapshot's L1 table is rewritten with its
    COPIED flags cleared, as QEMU's."""
    sn = meta.snapshots[check_apply(meta, ref)]
    meta.write_back()
    size = disk_size(meta, sn)
    need = max(sn.l1_size, -(-size // (meta.cluster_size * meta.layout.entries)))
    if need > len(meta.l1):
        meta.grow_l1(need)
    if size != meta.header.size:
        meta.set_header(size=size)
    sn_l1 = read_l1(meta, sn)
    shared = update_refcounts(meta, sn_l1, +1)
    _sync_refcounts(meta)
    meta.write_back()  # the L2 tables' COPIED flags
    if shared != sn_l1:
        raw = struct.pack(f">{len(shared)}Q", *shared)
        meta.check_write(sn.l1_table_offset, len(raw), _IGNORE_INACTIVE_L1)
        meta.file.write(sn.l1_table_offset, raw)
        meta.file.flush()
    old = list(meta.l1)
    meta.write_l1(sn_l1 + [0] * (len(old) - len(sn_l1)))
    update_refcounts(meta, old, -1)
    _sync_refcounts(meta)
    fix_copied_flags(meta)
    return size
