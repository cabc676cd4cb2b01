"""Counting: every reference to every host cluster, in memory (QEMU's calculate_refcounts).

The counter walks each refcounted structure (header, active and snapshot
L1/L2 tables and the data they map, snapshot table, refcount table and
blocks, crypto area, bitmaps) and adds one to the in-memory refcount of each
cluster it references, reporting what is malformed on the way.  It never reads
a refcount from disk; :mod:`.engine` compares its counts with the disk's.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from ..format import layout as L
from ..format.bitmaps import (
    BitmapDirectoryError,
    decode_bitmap_table,
    load_bitmap_directory,
    table_entry_valid,
)
from ..format.l2 import COMPRESSED, NORMAL, UNALLOCATED_PLAIN, ZERO_ALLOCATED, L2Table
from ..format.snapshots import Snapshot
from ..hostfile import HostFile
from ..metadata.owner import ImageMetadata
from .repair import Repair
from .result import FIX_ERRORS, CheckFailed, CheckResult

L1E_RESERVED_MASK = L.L1E_RESERVED_MASK
MAX_L1_ENTRIES = (32 << 20) // 8


class ReferenceCounter:
    """The in-memory refcount table (``imrt``) of one counting pass.

    ``rebuild`` is set when the refcount structure itself is broken (QEMU's
    ``rebuild`` flag); the comparing pass may set it too.
    """

    def __init__(
        self,
        meta: ImageMetadata,
        repair: Repair,
        report: Callable[[str], None],
        snapshots: list[Snapshot],
        snapshots_size: int,
    ) -> None:
        self.meta = meta
        self.repair = repair
        self.report = report
        self.file: HostFile = meta.file
        self.layout = meta.layout
        h = self.header = meta.header
        self.cbits = h.cluster_bits
        self.cs = 1 << h.cluster_bits
        self.refcount_max = (1 << (1 << h.refcount_order)) - 1
        self.has_data_file = h.has_data_file
        self.snapshots = snapshots
        self.snapshots_size = snapshots_size
        self.imrt: list[int] = []
        self.rebuild = False
        self.file_len = 0

    def count(self, res: CheckResult, fix: int, nb_clusters: int | None = None) -> None:
        """Count from zero into a table of ``nb_clusters`` (default: the file's length)."""
        if nb_clusters is None:
            nb_clusters = -(-self.refresh_length() // self.cs)
        self.imrt = [0] * nb_clusters
        self.rebuild = False
        self._calculate(res, fix)

    def refresh_length(self) -> int:
        """The image file's length as QEMU sees it (whole 512-byte sectors)."""
        self.file.refresh_size()
        self.file_len = self.file.size
        return self.file_len

    def _grow(self, nb_clusters: int) -> None:
        if nb_clusters > len(self.imrt):
            self.imrt.extend([0] * (nb_clusters - len(self.imrt)))

    def _inc(self, res: CheckResult, offset: int, size: int) -> None:
        """QEMU's qcow2_inc_refcounts_imrt."""
        if size <= 0:
            return
        cs = self.cs
        if offset + size - self.file_len >= cs:
            self.report(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
            )
            res.corruptions += 1
            return
        imrt = self.imrt
        for k in range(offset >> self.cbits, ((offset + size - 1) >> self.cbits) + 1):
            if k >= len(imrt):
                self._grow(k + 1)
            if imrt[k] == self.refcount_max:
                self.report(f"ERROR: overflow cluster offset=0x{k << self.cbits:x}")
                self.report(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                    "to create a clean copy if the image cannot be opened for writing"
                )
                res.corruptions += 1
                continue
            imrt[k] += 1

    # -- walking the metadata -----------------------------------------------------------

    def _calculate(self, res: CheckResult, fix: int) -> None:
        """QEMU's calculate_refcounts: count every reference; sets ``self.rebuild``."""
        h = self.header
        cs = self.cs
        self.refresh_length()
        self._inc(res, 0, cs)
        self._check_l1(res, h.l1_table_offset, h.l1_size, fix, active=True)
        if self.has_data_file and self.snapshots:
            self.report(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (cs - 1):
                self.report(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={alt_hex(sn.l1_table_offset)}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_ENTRIES:
                self.report(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={alt_hex(sn.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            self._check_l1(res, sn.l1_table_offset, sn.l1_size, fix, active=False)
        self._inc(res, h.snapshots_offset, self.snapshots_size)
        self._inc(res, h.refcount_table_offset, len(self.meta.refcounts.table) * 8)
        if h.crypto and h.crypto["length"]:
            self._inc(res, h.crypto["offset"], h.crypto["length"])
        self._check_bitmaps(res)
        self._check_refblocks(res, fix)

    def _check_l1(self, res: CheckResult, l1_offset: int, l1_size: int, fix: int, active: bool) -> None:
        if not l1_size:
            return
        self._inc(res, l1_offset, l1_size * 8)
        l1 = struct.unpack(f">{l1_size}Q", self.file.pread(l1_offset, l1_size * 8))
        for entry in l1:
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.report(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & L.L1E_OFFSET_MASK
            self._inc(res, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.report(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                )
                res.corruptions += 1
            self._check_l2(res, l2_offset, fix, active)

    def _check_l2(self, res: CheckResult, l2_offset: int, fix: int, active: bool) -> None:
        """QEMU's check_refcounts_l2: count the clusters one L2 table references."""
        layout = self.layout
        cs = self.cs
        table = L2Table(self.file.pread(l2_offset, cs), layout.extended)
        bitmaps = table.bitmaps
        entries = table.entries
        frag = active
        next_contiguous = 0
        # Fast path: a plain, aligned, in-file data cluster (most entries of most tables).
        slow_bits = L.QCOW_OFLAG_COMPRESSED | L.QCOW_OFLAG_ZERO | L.L2E_STD_RESERVED_MASK | (cs - 1)
        imrt, cbits, rmax, file_len = self.imrt, self.cbits, self.refcount_max, self.file_len
        count_refs = not self.has_data_file
        for i in list(table.used):
            entry = entries[i]
            bitmap = bitmaps[i] if bitmaps else 0
            offset = entry & L.L2E_OFFSET_MASK
            if (
                offset
                and not entry & slow_bits
                and not (bitmap >> 32) & bitmap
                and offset < file_len
                and offset >> cbits < len(imrt)
            ):
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if count_refs:
                    k = offset >> cbits
                    if imrt[k] < rmax:
                        imrt[k] += 1
                    else:
                        self._inc(res, offset, cs)
                continue
            ctype = layout.cluster_type(entry)
            if ctype != COMPRESSED and entry & L.L2E_STD_RESERVED_MASK:
                self.report(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if ctype == COMPRESSED:
                if entry & L.QCOW_OFLAG_COPIED:
                    self.report(
                        f"ERROR: coffset=0x{layout.compressed_range(entry)[0]:x}: copied flag must never be "
                        "set for compressed clusters"
                    )
                    entry &= ~L.QCOW_OFLAG_COPIED
                    res.corruptions += 1
                if self.has_data_file:
                    self.report(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.report(
                        f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                        f"entry=0x{entry:x}"
                    )
                    res.corruptions += 1
                    continue
                self._inc(res, *layout.compressed_range(entry))
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif ctype in (NORMAL, ZERO_ALLOCATED):
                offset = entry & L.L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.report(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                        "allocation bitmap"
                    )
                if offset & (cs - 1):
                    res.corruptions += 1
                    if bitmaps is not None:
                        contains_data = bool(bitmap & L.SUBCLUSTER_ALLOC_MASK)
                    else:
                        contains_data = not entry & L.QCOW_OFLAG_ZERO
                    if not contains_data:
                        repairing = bool(fix & FIX_ERRORS)
                        self.report(
                            f"{'Repairing' if repairing else 'ERROR'} offset={offset:x}: Preallocated "
                            "cluster is not properly aligned; L2 entry corrupted."
                        )
                        if repairing and self.repair.zero_misaligned_entry(res, l2_offset, table, i, active):
                            continue
                    else:
                        self.report(
                            f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                            "L2 entry corrupted."
                        )
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if not self.has_data_file:
                    self._inc(res, offset, cs)
            elif ctype == UNALLOCATED_PLAIN and bitmap & L.SUBCLUSTER_ALLOC_MASK:
                res.corruptions += 1
                self.report("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def _check_bitmaps(self, res: CheckResult) -> None:
        """QEMU's qcow2_check_bitmaps_refcounts; bitmaps count only while autoclear bit 0 is set."""
        h = self.header
        if not (h.autoclear_features & L.AUTOCLEAR_BITMAPS) or not h.bitmaps:
            return
        if not h.bitmaps["nb_bitmaps"]:
            return
        dir_offset = h.bitmaps["bitmap_directory_offset"]
        dir_size = h.bitmaps["bitmap_directory_size"]
        self._inc(res, dir_offset, dir_size)
        raw = self.file.pread(dir_offset, dir_size)
        cs = self.cs
        try:
            entries = load_bitmap_directory(raw, h.bitmaps["nb_bitmaps"], cs, h.size)
            for entry in entries:
                table_offset, table_size = entry.table_offset, entry.table_size
                self._inc(res, table_offset, table_size * 8)
                for value in decode_bitmap_table(self.file.pread(table_offset, table_size * 8)):
                    if not table_entry_valid(value, cs):
                        res.corruptions += 1
                        continue
                    offset = value & L.BME_OFFSET_MASK
                    if offset:
                        self._inc(res, offset, cs)
        except BitmapDirectoryError:
            res.corruptions += 1
            raise CheckFailed(errno.EINVAL, res) from None

    def _check_refblocks(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_refblocks: every refcount block is referenced exactly once."""
        cs = self.cs
        for i, value in enumerate(self.meta.refcounts.table):
            offset = value & L.REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if value & L.REFT_RESERVED_MASK:
                self.report(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.report(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                )
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= len(self.imrt):
                res.corruptions += 1
                repairing = bool(fix & FIX_ERRORS)
                self.report(f"{'Repairing' if repairing else 'ERROR'} refcount block {i} is outside image")
                if repairing:
                    try:
                        self.repair.extend_file(offset + cs)
                    except OSError as e:
                        self.rebuild = True
                        self.report(f"ERROR could not resize image: {os.strerror(e.errno or errno.EIO)}")
                        continue
                    self._grow(-(-self.refresh_length() // cs))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self._inc(res, offset, cs)
                continue
            if offset:
                self._inc(res, offset, cs)
                if self.imrt[cluster] != 1:
                    self.report(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                    res.corruptions += 1
                    self.rebuild = True


def alt_hex(value: int) -> str:
    """C's ``%#x``: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"
