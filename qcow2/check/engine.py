"""The check engine: count every reference to every host cluster, compare with the refcounts.

What ``qemu-img check`` finds, in QEMU 7.2's words and order
(``qcow2_check_refcounts``): the engine walks every refcounted structure (header,
active and snapshot L1/L2 tables and the data they map, snapshot table,
refcount table and blocks, crypto area, bitmaps), counts the references in
memory and compares the counts with the refcounts on disk.  It decides what
to fix; :mod:`.repair` does the writing, :mod:`.tool` the printing.
"""

from __future__ import annotations

import copy
import errno
import os
import struct
from collections.abc import Callable

from ..errors import ImageError
from ..format import layout as L
from ..format.bitmaps import BitmapDirectoryError, decode_bitmap_table, walk_bitmap_directory
from ..format.header import MAX_SNAPSHOTS
from ..format.l2 import COMPRESSED, NORMAL, UNALLOCATED_PLAIN, ZERO_ALLOCATED, L2Table
from ..format.snapshots import Snapshot, SnapshotTableError, walk_snapshot_table
from ..hostfile import HostFile
from ..metadata.owner import ImageMetadata
from .repair import Repair
from .result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult

L1E_RESERVED_MASK = L.L1E_RESERVED_MASK
MAX_L1_ENTRIES = (32 << 20) // 8

_MISSING = object()


class Checker:
    """One run of QEMU's qcow2_co_check_locked over an image's metadata.

    The engine counts and compares; every write it decides on goes through
    :class:`~.repair.Repair`.
    """

    def __init__(self, meta: ImageMetadata, fix: int, report: Callable[[str], None]) -> None:
        self.meta = meta
        self.fix = fix
        self.report = report
        self.repair = Repair(meta, fix, report)
        self.file: HostFile = meta.file
        self.layout = meta.layout
        h = self.header = meta.header
        self.cbits = h.cluster_bits
        self.cs = 1 << h.cluster_bits
        self.refcount_bits = 1 << h.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.per_block = self.cs * 8 // self.refcount_bits
        self.has_data_file = h.has_data_file
        self.l1 = list(meta.l1)
        self.snapshots, self.snapshots_size = self._read_snapshots()
        self.disk = meta.refcounts
        self.imrt: list[int] = []
        self.rebuild = False
        self.file_len = 0
        self._decoded: dict[int, list[int] | bytes | None] = {}

    # -- image structures ------------------------------------------------------------

    def _read_snapshots(self) -> tuple[list[Snapshot], int]:
        """The snapshot table; its size excludes the last entry's padding (as QEMU counts it)."""
        h = self.header
        if not h.nb_snapshots:
            return [], 0
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise ImageError(f"{self.meta.filename}: too many snapshots ({h.nb_snapshots})")
        snaps, size = [], 0
        try:
            for snapshot, end in walk_snapshot_table(self.file.pread, h.snapshots_offset, h.nb_snapshots):
                snaps.append(snapshot)
                size = end
        except SnapshotTableError as e:
            raise ImageError(f"{self.meta.filename}: {e}") from None
        return snaps, size

    def _refresh_length(self) -> int:
        """The image file's length as QEMU sees it (whole 512-byte sectors)."""
        self.file.refresh_size()
        self.file_len = self.file.size
        return self.file_len

    def _disk_block(self, index: int) -> tuple[list[int] | bytes | None, str | None]:
        """Refcount block ``index`` from disk, or why it cannot be read (QEMU's get_refcount)."""
        table = self.disk.table
        offset = table[index] & L.REFT_OFFSET_MASK if index < len(table) else 0
        if offset & (self.cs - 1):
            self.repair.signal_corruption(
                f"Refblock offset {_alt_hex(offset)} unaligned (reftable index: {_alt_hex(index)})"
            )
            return None, os.strerror(errno.EIO)
        if index not in self._decoded:
            try:
                self._decoded[index] = self.disk.decoded(index)
            except OSError as e:
                return None, os.strerror(e.errno or errno.EIO)
        return self._decoded[index], None

    def _on_disk(self, cluster: int) -> int:
        """One on-disk refcount; OSError where QEMU's qcow2_get_refcount fails."""
        block, failure = self._disk_block(cluster // self.per_block)
        if failure is not None:
            raise OSError(errno.EIO, failure)
        return block[cluster % self.per_block] if block is not None else 0

    # -- the in-memory refcount table ---------------------------------------------------

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
        self._refresh_length()
        self._inc(res, 0, cs)
        self._check_l1(res, h.l1_table_offset, h.l1_size, fix, active=True)
        if self.has_data_file and self.snapshots:
            self.report(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (cs - 1):
                self.report(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={_alt_hex(sn.l1_table_offset)}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_ENTRIES:
                self.report(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={_alt_hex(sn.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            self._check_l1(res, sn.l1_table_offset, sn.l1_size, fix, active=False)
        self._inc(res, h.snapshots_offset, self.snapshots_size)
        self._inc(res, h.refcount_table_offset, len(self.disk.table) * 8)
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
            for entry in walk_bitmap_directory(raw, h.bitmaps["nb_bitmaps"]):
                table_offset, table_size = entry.table_offset, entry.table_size
                self._inc(res, table_offset, table_size * 8)
                for value in decode_bitmap_table(self.file.pread(table_offset, table_size * 8)):
                    offset = value & L.BME_OFFSET_MASK
                    if value & L.BME_RESERVED_MASK or (offset and (value & L.BME_ALL_ONES or offset % cs)):
                        res.corruptions += 1
                        continue
                    if offset:
                        self._inc(res, offset, cs)
        except BitmapDirectoryError:
            res.corruptions += 1
            raise CheckFailed(errno.EINVAL, res) from None

    def _check_refblocks(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_refblocks: every refcount block is referenced exactly once."""
        cs = self.cs
        for i, value in enumerate(self.disk.table):
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
                    self._grow(-(-self._refresh_length() // cs))
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

    # -- comparing with the refcounts on disk -------------------------------------------

    def _compare_one(
        self,
        res: CheckResult,
        fix: int,
        i: int,
        refcount: int,
        reference: int,
        raises: list[tuple[int, int]],
        lowers: list[tuple[int, int]],
    ) -> None:
        if refcount == reference:
            return
        fixing = None
        if refcount == 0:
            self.rebuild = True
        elif refcount > reference and fix & FIX_LEAKS:
            fixing = lowers
        elif refcount < reference and fix & FIX_ERRORS:
            fixing = raises
        if fixing is not None:
            word = "Repairing"
        else:
            word = "ERROR" if refcount < reference else "Leaked"
        self.report(f"{word} cluster {i} refcount={refcount} reference={reference}")
        if fixing is not None:
            fixing.append((i, reference - refcount))
        elif refcount < reference:
            res.corruptions += 1
        else:
            res.leaks += 1

    def _compare(self, res: CheckResult, fix: int) -> int:
        """QEMU's compare_refcounts; returns the highest cluster in use (either view)."""
        highest = 0
        per = self.per_block
        raises: list[tuple[int, int]] = []
        lowers: list[tuple[int, int]] = []
        imrt = self.imrt
        n = len(imrt)
        for block_index in range(-(-n // per)):
            first, end = block_index * per, min(n, block_index * per + per)
            block, failure = self._disk_block(block_index)
            wanted = imrt[first:end]
            if failure is None:
                have = list(block[: end - first]) if block is not None else [0] * (end - first)
                if have == wanted:  # the usual case: the whole block agrees
                    last = next((k for k in range(end - first - 1, -1, -1) if wanted[k]), None)
                    if last is not None:
                        highest = first + last
                    continue
            for i in range(first, end):
                reference = imrt[i]
                if failure is not None:
                    self.report(f"Can't get refcount for cluster {i}: {failure}")
                    res.check_errors += 1
                    continue
                refcount = have[i - first]
                self._compare_one(res, fix, i, refcount, reference, raises, lowers)
                if refcount or reference:
                    highest = i
        self._decoded.clear()
        self.repair.apply_refcount_fixes(res, raises, lowers, imrt)
        return highest

    # -- COPIED flags --------------------------------------------------------------------

    def _check_oflag_copied(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_oflag_copied over the active L1 and its L2 tables."""
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        layout, cs, cbits = self.layout, self.cs, self.cbits
        per, decoded = self.per_block, self._decoded
        for i, l1_entry in enumerate(self.l1):
            l2_offset = l1_entry & L.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self._on_disk(l2_offset >> cbits)
            except OSError:
                continue
            if (refcount == 1) != bool(l1_entry & L.QCOW_OFLAG_COPIED):
                res.corruptions += 1
                self.report(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"
                )
                if repair:
                    new = l1_entry | L.QCOW_OFLAG_COPIED if refcount == 1 else l1_entry & ~L.QCOW_OFLAG_COPIED
                    self.repair.write_l1_entry(res, i, new)
                    self.l1[i] = new
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = L2Table(self.file.pread(l2_offset, cs), layout.extended)
            dirty = 0
            entries = table.entries
            for j in table.used:
                entry = entries[j]
                if entry & L.QCOW_OFLAG_COMPRESSED:
                    continue
                cluster = (entry & L.L2E_OFFSET_MASK) >> cbits
                if not cluster and layout.cluster_type(entry) != NORMAL:
                    continue  # unallocated or a plain zero cluster
                if self.has_data_file:
                    refcount = 1
                else:
                    block = decoded.get(cluster // per, _MISSING)
                    if block is _MISSING:
                        block, failure = self._disk_block(cluster // per)
                        if failure is not None:
                            continue
                    refcount = block[cluster % per] if block is not None else 0
                if (refcount == 1) != bool(entry & L.QCOW_OFLAG_COPIED):
                    res.corruptions += 1
                    self.report(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}")
                    if repair:
                        flag = L.QCOW_OFLAG_COPIED
                        table.entries[j] = entry | flag if refcount == 1 else entry & ~flag
                        dirty += 1
            if dirty:
                self.repair.write_l2_table(res, l2_offset, table)
                res.corruptions -= dirty
                res.corruptions_fixed += dirty
        if repair:
            self.meta.l1[:] = self.l1
            self.meta.l2_tables.clear()

    # -- the whole check -------------------------------------------------------------------

    def check_refcounts(self, res: CheckResult) -> None:
        """QEMU's qcow2_check_refcounts; raises CheckFailed where QEMU returns -errno."""
        fix = self.fix
        self.imrt = [0] * -(-self._refresh_length() // self.cs)
        res.total_clusters = -(-(self.header.size // 512 * 512) // self.cs)
        self.rebuild = False
        self._calculate(res, fix)
        pre_compare = copy.copy(res)
        highest = self._compare(res, 0)
        if self.rebuild and fix & FIX_ERRORS:
            old = copy.copy(res)
            fresh_leaks = 0
            self.report("Rebuilding refcount structure")
            self.repair.rebuild_refcount_structure(res, self.imrt)
            self.disk = self.meta.refcounts
            self._decoded.clear()
            res.corruptions = res.leaks = 0
            self.rebuild = False
            self.imrt = [0] * len(self.imrt)
            self._calculate(res, 0)
            if fix & FIX_LEAKS:
                saved = copy.copy(res)
                scratch = CheckResult()
                highest = self._compare(scratch, FIX_LEAKS)
                if self.rebuild:
                    self.report("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = scratch.leaks
                res.assign(saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self.report("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed(errno.EIO, res)
            if res.leaks or res.corruptions:
                res.assign(pre_compare)
                highest = self._compare(res, fix)
        self._check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cs

    def run(self) -> CheckResult:
        """QEMU's qcow2_co_check_locked: the refcount check, then the feature bits."""
        res = CheckResult()
        self.check_refcounts(res)
        if self.fix and not res.check_errors and not res.corruptions:
            self.repair.mark_clean()
        return res


def _alt_hex(value: int) -> str:
    """C's ``%#x``: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"
