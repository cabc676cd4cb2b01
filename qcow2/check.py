"""Consistency check and refcount repair: what ``qemu-img check [-r leaks|all]`` does.

The checker walks every refcounted structure of the image (header, active and
snapshot L1/L2 tables and the data they map, snapshot table, refcount table
and blocks, crypto area, bitmaps), counts the references to each host
cluster in memory, and compares the counts with the refcounts on disk.  The
findings, their stderr lines, the counters and the exit codes follow QEMU
7.2's ``qcow2_check_refcounts`` and ``qemu-img check``, so that the two
tools can be compared on the same image.

Repairs keep the image safe at every instant: refcounts that are too low are
raised (and synced) before leaked ones are lowered; a rebuilt refcount
structure is written into clusters nothing references and synced before the
header switches to it; COPIED flags are only set where the refcount is
already exactly 1.

A dirty image (lazy refcounts, not closed cleanly) opened read-write is
repaired with :func:`repair_dirty_image` before anything is written.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields

from construct import ConstructError

from . import layout as L
from .errors import ImageError
from .header import parse_header
from .hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, HostFile, fallocate
from .image import COMPRESSED, NORMAL, UNALLOC_PLAIN, ZERO_ALLOC, L2Table, Qcow2Image
from .refcount import Refcounts

log = logging.getLogger(__name__)

FIX_LEAKS = 1  # QEMU's BDRV_FIX_LEAKS
FIX_ERRORS = 2  # QEMU's BDRV_FIX_ERRORS

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF
SUBCLUSTER_ZERO_MASK = 0xFFFFFFFF << 32
BME_RESERVED_MASK = 0xFF000000000001FE
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_ALL_ONES = 1
MAX_L1_ENTRIES = (32 << 20) // 8
MAX_SNAPSHOTS = 65536

_WIDE_FORMATS = {8: "B", 16: "H", 32: "I", 64: "Q"}
_MISSING = object()

HDR_REFTABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)
HDR_INCOMPAT = 72

# qemu-img prints the ImageCheck dict in its QDict's iteration order; keep it.
JSON_KEYS = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


class CheckFailed(Exception):
    """The check could not complete (QEMU returns -errno): no summary, exit code 1."""

    def __init__(self, err: int, result: CheckResult | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.errno = err
        self.result = result


@dataclass
class CheckResult:
    """QEMU's BdrvCheckResult (with its BlockFragInfo flattened in)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def to_json(self, filename: str) -> dict:
        """The ImageCheck object of ``qemu-img check --output=json`` (zero counters omitted)."""
        values = {
            "image-end-offset": self.image_end_offset,
            "compressed-clusters": self.compressed_clusters,
            "total-clusters": self.total_clusters,
            "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed,
            "check-errors": self.check_errors,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "allocated-clusters": self.allocated_clusters,
            "filename": filename,
            "format": "qcow2",
            "fragmented-clusters": self.fragmented_clusters,
        }
        always = ("check-errors", "filename", "format")
        return {k: values[k] for k in JSON_KEYS if k in always or values[k]}


@dataclass
class _Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str


class _Checker:
    """One run of QEMU's qcow2_co_check_locked over an open image."""

    def __init__(self, img: Qcow2Image, fix: int, report: Callable[[str], None]) -> None:
        self.img = img
        self.fix = fix
        self.report = report
        self.file: HostFile = img.file
        h = self.header = img.header
        self.cbits = h.cluster_bits
        self.cs = 1 << h.cluster_bits
        self.refcount_bits = 1 << h.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.per_block = self.cs * 8 // self.refcount_bits
        self.has_data_file = h.has_data_file
        self.l1 = list(img.l1)
        self.snapshots, self.snapshots_size = self._read_snapshots()
        self.disk = self._disk_refcounts()
        self.imrt: list[int] = []
        self.rebuild = False
        self.file_len = 0
        self.corruption_signaled = False
        self._decoded: dict[int, list[int] | bytes | None] = {}

    # -- image structures ------------------------------------------------------------

    def _disk_refcounts(self) -> Refcounts:
        h = self.header
        return Refcounts(
            self.file, h.cluster_bits, h.refcount_order, h.refcount_table_offset, h.refcount_table_clusters
        )

    def _read_snapshots(self) -> tuple[list[_Snapshot], int]:
        """The snapshot table; its size excludes the last entry's padding (as QEMU counts it)."""
        h = self.header
        if not h.nb_snapshots:
            return [], 0
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise ImageError(f"{self.img.filename}: too many snapshots ({h.nb_snapshots})")
        snaps = []
        offset = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            offset = (offset + 7) & ~7
            fixed = self.file.pread(offset, 40)
            extra, id_len, name_len = (
                struct.unpack_from(">I", fixed, 36)[0],
                *struct.unpack_from(">HH", fixed, 12),
            )
            raw = fixed + self.file.pread(offset + 40, extra + id_len + name_len)
            try:
                sn = L.SnapshotHeader.parse(raw)
            except ConstructError:
                raise ImageError(f"{self.img.filename}: snapshot table is truncated") from None
            snaps.append(
                _Snapshot(
                    sn.l1_table_offset,
                    sn.l1_size,
                    bytes(sn.id_str).decode("utf-8", "replace"),
                    bytes(sn.name).decode("utf-8", "replace"),
                )
            )
            offset += len(raw)
        return snaps, offset - h.snapshots_offset

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
            self._signal_corruption(
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
        img = self.img
        cs = self.cs
        table = L2Table(self.file.pread(l2_offset, cs), img.extended_l2)
        bitmaps = table.bitmaps
        entries = table.entries
        frag = active
        next_contiguous = 0
        # Fast path: a plain, aligned, in-file data cluster (most entries of most tables).
        slow_bits = L.QCOW_OFLAG_COMPRESSED | L.QCOW_OFLAG_ZERO | L2E_STD_RESERVED_MASK | (cs - 1)
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
            ctype = img._cluster_type(entry)
            if ctype != COMPRESSED and entry & L2E_STD_RESERVED_MASK:
                self.report(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if ctype == COMPRESSED:
                if entry & L.QCOW_OFLAG_COPIED:
                    self.report(
                        f"ERROR: coffset=0x{entry & img._coffset_mask:x}: copied flag must never be "
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
                coffset = entry & img._coffset_mask
                nb_sectors = ((entry >> img._csize_shift) & img._csize_mask) + 1
                self._inc(res, coffset, nb_sectors * 512 - (coffset & 511))
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif ctype in (NORMAL, ZERO_ALLOC):
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
                        contains_data = bool(bitmap & SUBCLUSTER_ALLOC_MASK)
                    else:
                        contains_data = not entry & L.QCOW_OFLAG_ZERO
                    if not contains_data:
                        repairing = bool(fix & FIX_ERRORS)
                        self.report(
                            f"{'Repairing' if repairing else 'ERROR'} offset={offset:x}: Preallocated "
                            "cluster is not properly aligned; L2 entry corrupted."
                        )
                        if repairing and self._fix_l2_entry_by_zero(res, l2_offset, table, i, active):
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
            elif ctype == UNALLOC_PLAIN and bitmap & SUBCLUSTER_ALLOC_MASK:
                res.corruptions += 1
                self.report("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def _fix_l2_entry_by_zero(
        self, res: CheckResult, l2_offset: int, table: L2Table, index: int, active: bool
    ) -> bool:
        """Turn a preallocated zero cluster with a broken offset into a plain zero cluster."""
        if table.bitmaps is not None:
            bitmap = table.bitmaps[index]
            bitmap = (bitmap | (bitmap << 32)) & SUBCLUSTER_ZERO_MASK
            table.set(index, 0, bitmap)
        else:
            table.set(index, L.QCOW_OFLAG_ZERO)
        esize = self.img.l2_entry_size
        where = l2_offset + index * esize
        if self._overlap_check(where, esize, ignore="active L2" if active else "inactive L2"):
            self.report("ERROR: Overlap check failed")
            res.check_errors += 1
            raise CheckFailed(errno.EIO)
        try:
            self._write_sync(where, table.pack(index, 1))
        except OSError as e:
            self.report(f"ERROR: Failed to overwrite L2 table entry: {os.strerror(e.errno or errno.EIO)}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

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
        pos = 0
        cs = self.cs
        for _ in range(h.bitmaps["nb_bitmaps"]):
            try:
                entry = L.BitmapDirectoryEntry.parse(raw[pos:])
            except ConstructError:
                res.corruptions += 1
                raise CheckFailed(errno.EINVAL, res) from None
            pos += (24 + entry.extra_data_size + entry.name_size + 7) & ~7
            table_offset, table_size = entry.bitmap_table_offset, entry.bitmap_table_size
            self._inc(res, table_offset, table_size * 8)
            table = struct.unpack(f">{table_size}Q", self.file.pread(table_offset, table_size * 8))
            for value in table:
                offset = value & BME_OFFSET_MASK
                if value & BME_RESERVED_MASK or (offset and (value & BME_ALL_ONES or offset % cs)):
                    res.corruptions += 1
                    continue
                if offset:
                    self._inc(res, offset, cs)

    def _check_refblocks(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_refblocks: every refcount block is referenced exactly once."""
        cs = self.cs
        for i, value in enumerate(self.disk.table):
            offset = value & L.REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if value & REFT_RESERVED_MASK:
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
                        os.ftruncate(self.file.fd, offset + cs)
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
        # Raise before lowering: a crash in between leaves leaks, never a refcount below its users.
        self._decoded.clear()
        for i, delta in raises:
            self.disk.change(i, 1, delta)
            res.corruptions_fixed += 1
        if raises:
            os.fsync(self.file.fd)
        freed = []
        for i, delta in lowers:
            self.disk.change(i, 1, delta)
            res.leaks_fixed += 1
            if self.imrt[i] == 0:
                freed.append(i)
        if lowers:
            os.fsync(self.file.fd)
        for i in freed:  # like QEMU's discard of clusters whose refcount dropped to 0
            try:
                fallocate(self.file.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, i << self.cbits, self.cs)
            except OSError:
                break
        return highest

    # -- rebuilding the refcount structure ---------------------------------------------

    def _alloc_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """QEMU's alloc_clusters_imrt: (first cluster of ``count`` free ones, updated first_free)."""
        imrt = self.imrt
        cluster, run, first_gap = first_free, 0, True
        while cluster < len(imrt) and run < count:
            if not imrt[cluster]:
                run += 1
                if first_gap:
                    first_free, first_gap = cluster, False
            else:
                run = 0
            cluster += 1
        if run < count:
            self._grow(cluster + count - run)
        cluster -= run
        for k in range(cluster, cluster + count):
            imrt[k] = 1
        return cluster, first_free

    def _encode_block(self, index: int) -> bytes:
        """Refcount block ``index`` as the in-memory table says it should be."""
        per = self.per_block
        values = self.imrt[index * per : index * per + per]
        values += [0] * (per - len(values))
        bits = self.refcount_bits
        if bits >= 8:
            return struct.pack(f">{per}{_WIDE_FORMATS[bits]}", *values)
        out = bytearray(self.cs)
        for i, v in enumerate(values):
            if v:
                bit = i * bits
                out[bit >> 3] |= v << (bit & 7)
        return bytes(out)

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """Allocate and write the refcount blocks covering in-use clusters of [first, end)."""
        per, cs = self.per_block, self.cs
        first_free = 0
        grown = False
        cluster = first
        while cluster < end:
            if not self.imrt[cluster]:
                cluster += 1
                continue
            index = cluster // per
            start = index * per
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                first_free = max(first_free, start)
                block_cluster, first_free = self._alloc_imrt(1, first_free)
                end = max(end, block_cluster + 1)
                if len(reftable) <= index:
                    entries = -(-(index + 1) * 8 // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                block_offset = block_cluster << self.cbits
                reftable[index] = block_offset
            if self._overlap_check(block_offset, cs):
                self.report("qcow2: ERROR writing refblock: Input/output error")
                raise CheckFailed(errno.EIO)
            os.pwrite(self.file.fd, self._encode_block(index), block_offset)
            cluster = start + per
        return grown

    def _rebuild_structure(self, res: CheckResult) -> None:
        """QEMU's rebuild_refcount_structure: a new table and blocks from the in-memory counts."""
        reftable: list[int] = []
        try:
            self._write_refblocks(0, len(self.imrt), reftable)
            while True:
                table_clusters = -(-len(reftable) * 8 // self.cs)
                start, _ = self._alloc_imrt(table_clusters, 0)
                if not self._write_refblocks(start, start + table_clusters, reftable):
                    break
            table_offset = start << self.cbits
            os.pwrite(self.file.fd, struct.pack(f">{len(reftable)}Q", *reftable), table_offset)
            os.fsync(self.file.fd)
            # The switch: one synced 12-byte header write.
            os.pwrite(self.file.fd, struct.pack(">QI", table_offset, table_clusters), HDR_REFTABLE)
            os.fsync(self.file.fd)
        except OSError as e:
            self.report(f"ERROR writing refcount structure: {os.strerror(e.errno or errno.EIO)}")
            res.check_errors += 1
            raise CheckFailed(e.errno or errno.EIO, res) from None
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters
        self.file.refresh_size()
        self.disk = self._disk_refcounts()
        self._decoded.clear()

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
        img, cs, cbits = self.img, self.cs, self.cbits
        h = self.header
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
                    try:
                        self._write_sync(h.l1_table_offset + i * 8, struct.pack(">Q", new))
                    except OSError as e:
                        res.check_errors += 1
                        raise CheckFailed(e.errno or errno.EIO, res) from None
                    self.l1[i] = new
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = L2Table(self.file.pread(l2_offset, cs), img.extended_l2)
            dirty = 0
            entries = table.entries
            for j in table.used:
                entry = entries[j]
                if entry & L.QCOW_OFLAG_COMPRESSED:
                    continue
                cluster = (entry & L.L2E_OFFSET_MASK) >> cbits
                if not cluster and img._cluster_type(entry) != NORMAL:
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
                if self._overlap_check(l2_offset, cs, ignore="active L2"):
                    self.report(
                        "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error"
                    )
                    res.check_errors += 1
                    raise CheckFailed(errno.EIO, res)
                try:
                    self._write_sync(l2_offset, table.pack(0, len(table.entries)))
                except OSError as e:
                    self.report(f"ERROR: Could not write L2 table: {os.strerror(e.errno or errno.EIO)}")
                    res.check_errors += 1
                    raise CheckFailed(e.errno or errno.EIO, res) from None
                res.corruptions -= dirty
                res.corruptions_fixed += dirty
        if repair:
            img.l1[:] = self.l1
            img._l2_cache.clear()

    # -- writes ---------------------------------------------------------------------------

    def _write_sync(self, offset: int, data: bytes) -> None:
        os.pwrite(self.file.fd, data, offset)
        os.fsync(self.file.fd)

    def _overlap_check(self, offset: int, length: int, ignore: str = "") -> bool:
        """QEMU's qcow2_pre_write_overlap_check: a hit marks the image corrupt (even in a check)."""
        what = self._overlaps(offset, length, ignore)
        if what is None:
            return False
        self._signal_corruption(f"Preventing invalid write on metadata (overlaps with {what})")
        return True

    def _signal_corruption(self, why: str) -> None:
        """QEMU's qcow2_signal_corruption: fatal (sets the corrupt bit) when the image is writable."""
        if self.corruption_signaled:
            return
        self.corruption_signaled = True
        h = self.header
        if not self.fix:
            self.report(
                f"qcow2: Image is corrupt: {why}; further non-fatal corruption events will be suppressed"
            )
            return
        self.report(f"qcow2: Marking image as corrupt: {why}; further corruption events will be suppressed")
        if h.version >= 3:
            h.incompatible_features |= L.INCOMPAT_CORRUPT
            self._write_sync(HDR_INCOMPAT, struct.pack(">Q", h.incompatible_features))

    def _overlaps(self, offset: int, length: int, ignore: str = "") -> str | None:
        """QEMU's metadata overlap check ("cached" template) against the structures in use."""
        cs = self.cs
        h = self.header
        if offset < cs:
            return "qcow2_header"
        # the range to test, widened to whole clusters; the metadata ranges as they are
        lo, hi = offset & ~(cs - 1), -(-(offset + length) // cs) * cs

        def hit(start: int, size: int) -> bool:
            return size > 0 and start < hi and start + size > lo

        if hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if hit(h.refcount_table_offset, h.refcount_table_clusters * cs):
            return "refcount table"
        if hit(h.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        if any(hit(sn.l1_table_offset, sn.l1_size * 8) for sn in self.snapshots):
            return "inactive L1 table"
        if ignore != "active L2" and any(
            hit(e & L.L1E_OFFSET_MASK, cs) for e in self.l1 if e & L.L1E_OFFSET_MASK
        ):
            return "active L2 table"
        if any(hit(e & L.REFT_OFFSET_MASK, cs) for e in self.disk.table if e & L.REFT_OFFSET_MASK):
            return "refcount block"
        if h.bitmaps and h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            if hit(h.bitmaps["bitmap_directory_offset"], h.bitmaps["bitmap_directory_size"]):
                return "bitmap directory"
        return None

    # -- the whole check -------------------------------------------------------------------

    def check_refcounts(self, res: CheckResult) -> None:
        """QEMU's qcow2_check_refcounts; raises CheckFailed where QEMU returns -errno."""
        fix = self.fix
        self.imrt = [0] * -(-self._refresh_length() // self.cs)
        res.total_clusters = -(-self.img.size // self.cs)
        self.rebuild = False
        self._calculate(res, fix)
        pre_compare = copy.copy(res)
        highest = self._compare(res, 0)
        if self.rebuild and fix & FIX_ERRORS:
            old = copy.copy(res)
            fresh_leaks = 0
            self.report("Rebuilding refcount structure")
            self._rebuild_structure(res)
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
                _assign(res, saved)
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
                _assign(res, pre_compare)
                highest = self._compare(res, fix)
        self._check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cs

    def run(self) -> CheckResult:
        """QEMU's qcow2_co_check_locked: the refcount check, then the feature bits."""
        res = CheckResult()
        self.check_refcounts(res)
        if self.fix and not res.check_errors and not res.corruptions:
            self._mark_clean()
        return res

    def _mark_clean(self) -> None:
        """Clear the dirty and corrupt bits (QEMU's qcow2_mark_clean + qcow2_mark_consistent)."""
        h = self.header
        bits = h.incompatible_features & ~(L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT)
        if h.version >= 3 and bits != h.incompatible_features:
            os.fsync(self.file.fd)
            self._write_sync(HDR_INCOMPAT, struct.pack(">Q", bits))
            h.incompatible_features = bits


def _alt_hex(value: int) -> str:
    """C's ``%#x``: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"


def _assign(dst: CheckResult, src: CheckResult) -> None:
    for f in fields(CheckResult):
        setattr(dst, f.name, getattr(src, f.name))


# -- opening for a check ---------------------------------------------------------------


def open_for_check(filename: str, writable: bool) -> Qcow2Image:
    """The image alone (no backing chain, no data file): all a check needs."""
    try:
        file = HostFile(filename, writable)
    except OSError as e:
        raise ImageError(f"Could not open '{filename}': {e.strerror}") from None
    try:
        cluster0 = bytearray(file.pread(0, 1 << 21)[: max(file.file_size, 0)])
        crypt_method = struct.unpack_from(">I", cluster0, 32)[0] if len(cluster0) >= 36 else 0
        if crypt_method:
            # Encryption changes nothing in the metadata a check walks.
            cluster0[32:36] = bytes(4)
        header = parse_header(bytes(cluster0), filename)
        header.crypt_method = crypt_method
        return Qcow2Image(filename, file, header, None, None)
    except BaseException:
        file.close()
        raise


def check_image(filename: str, fix: int = 0, report: Callable[[str], None] | None = None) -> CheckResult:
    """One check pass (with ``fix`` = FIX_LEAKS / FIX_LEAKS|FIX_ERRORS, one repair pass)."""
    img = open_for_check(filename, writable=bool(fix))
    try:
        return _Checker(img, fix, report or _stderr).run()
    finally:
        img.close()


def _stderr(line: str) -> None:
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# -- the qemu-img check command ---------------------------------------------------------


def run_check_command(
    filename: str,
    fix: int,
    output: str,
    out: Callable[[str], None],
    err: Callable[[str], None],
    quiet: bool = False,
) -> int:
    """``qemu-img check``: check (and repair), double-check after a repair, print, exit code."""
    try:
        result = check_image(filename, fix, err)
    except CheckFailed as e:
        err(f"qcow2: Check failed: {os.strerror(e.errno)}")
        return 1
    if result.corruptions_fixed or result.leaks_fixed:
        if output == "human" and not quiet:
            out(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {result.leaks_fixed} leaked clusters\n"
                f"    {result.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        fixed = (result.corruptions_fixed, result.leaks_fixed)
        try:
            result = check_image(filename, 0, err)
        except CheckFailed as e:
            err(f"qcow2: Check failed: {os.strerror(e.errno)}")
            return 1
        result.corruptions_fixed, result.leaks_fixed = fixed
    if quiet:
        pass
    elif output == "json":
        out(json.dumps(result.to_json(filename), indent=4) + "\n")
    else:
        out(format_human(result))
    if result.check_errors:
        err("qcow2: Check failed")
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def format_human(r: CheckResult) -> str:
    """qemu-img's human summary."""
    text = ""
    if not (r.corruptions or r.leaks or r.check_errors):
        text += "No errors were found on the image.\n"
    else:
        if r.corruptions:
            text += (
                f"\n{r.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if r.leaks:
            text += (
                f"\n{r.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if r.check_errors:
            text += f"\n{r.check_errors} internal errors have occurred during the check.\n"
    if r.total_clusters and r.allocated_clusters:
        text += (
            f"{r.allocated_clusters}/{r.total_clusters} = "
            f"{r.allocated_clusters * 100.0 / r.total_clusters:.2f}% allocated, "
            f"{r.fragmented_clusters * 100.0 / r.allocated_clusters:.2f}% fragmented, "
            f"{r.compressed_clusters * 100.0 / r.allocated_clusters:.2f}% compressed clusters\n"
        )
    if r.image_end_offset:
        text += f"Image end offset: {r.image_end_offset}\n"
    return text


# -- repair of a dirty image opened read-write -------------------------------------------


def repair_dirty_image(img: Qcow2Image) -> CheckResult:
    """What QEMU does when it opens a dirty image read-write: ``check -r all``, quietly.

    Rebuilds or corrects the refcounts, fixes COPIED flags and clears the dirty
    bit; the image's in-memory header, L1 table and L2 cache follow.  Raises
    ImageError("Could not repair dirty image") when the repair fails.
    """

    def report(line: str) -> None:
        log.info("%s: %s", img.filename, line)

    log.info("%s: dirty image (lazy refcounts, not closed cleanly): repairing its refcounts", img.filename)
    try:
        result = _Checker(img, FIX_LEAKS | FIX_ERRORS, report).run()
    except CheckFailed as e:
        raise ImageError(f"{img.filename}: Could not repair dirty image: {os.strerror(e.errno)}") from None
    except OSError as e:
        raise ImageError(f"{img.filename}: Could not repair dirty image: {e}") from None
    if result.check_errors:
        raise ImageError(f"{img.filename}: Could not repair dirty image: Input/output error")
    log.info(
        "%s: repaired %d corruptions and %d leaks",
        img.filename,
        result.corruptions_fixed,
        result.leaks_fixed,
    )
    return result
