"""The writing half of a check: the repairs ``qemu-img check -r`` makes, made safely.

Repairs keep the image safe at every instant: refcounts that are too low are
raised (and synced) before leaked ones are lowered; a rebuilt refcount
structure is written into clusters nothing references and synced before the
header switches to it; COPIED flags are only set where the refcount is
already exactly 1.  Every write goes through the image's metadata owner and
passes its overlap check first.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from ..format import layout as L
from ..format.l2 import L2Table
from ..metadata import overlap as O
from ..metadata.owner import ImageMetadata
from .result import CheckFailed, CheckResult


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno or errno.EIO)


class Repair:
    """Repair writes for one check run (``fix`` = 0: only corruption is reported)."""

    def __init__(self, meta: ImageMetadata, fix: int, report: Callable[[str], None]) -> None:
        self.meta = meta
        self.fix = fix
        self.report = report
        self.cs = meta.cluster_size
        self.cbits = meta.cluster_bits
        self.corruption_signaled = False

    # -- corruption ----------------------------------------------------------------------

    def signal_corruption(self, why: str) -> None:
        """QEMU's qcow2_signal_corruption: fatal (sets the corrupt bit) when the image is writable."""
        if self.corruption_signaled:
            return
        self.corruption_signaled = True
        if not self.fix:
            self.report(
                f"qcow2: Image is corrupt: {why}; further non-fatal corruption events will be suppressed"
            )
            return
        self.report(f"qcow2: Marking image as corrupt: {why}; further corruption events will be suppressed")
        self.meta.set_corrupt_bit()

    def overlap_check(self, offset: int, length: int, ignore: frozenset[str] = frozenset()) -> bool:
        """QEMU's qcow2_pre_write_overlap_check: a hit marks the image corrupt (even in a check)."""
        what = self.meta.overlaps(offset, length, ignore)
        if what is None:
            return False
        self.signal_corruption(f"Preventing invalid write on metadata (overlaps with {what})")
        return True

    def mark_clean(self) -> None:
        """Clear the dirty and corrupt bits (QEMU's qcow2_mark_clean + qcow2_mark_consistent)."""
        self.meta.mark_clean()

    # -- entries and tables --------------------------------------------------------------

    def zero_misaligned_entry(
        self, res: CheckResult, l2_offset: int, table: L2Table, index: int, active: bool
    ) -> bool:
        """Turn a preallocated zero cluster with a broken offset into a plain zero cluster."""
        if table.bitmaps is not None:
            bitmap = table.bitmaps[index]
            bitmap = (bitmap | (bitmap << 32)) & L.SUBCLUSTER_ZERO_MASK
            table.set(index, 0, bitmap)
        else:
            table.set(index, L.QCOW_OFLAG_ZERO)
        esize = self.meta.layout.entry_size
        where = l2_offset + index * esize
        if self.overlap_check(where, esize, frozenset({O.ACTIVE_L2 if active else O.INACTIVE_L2})):
            self.report("ERROR: Overlap check failed")
            res.check_errors += 1
            raise CheckFailed(errno.EIO)
        try:
            self.meta.write_synced(where, table.pack(index, 1))
        except OSError as e:
            self.report(f"ERROR: Failed to overwrite L2 table entry: {_strerror(e)}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    def write_l1_entry(self, res: CheckResult, index: int, value: int) -> None:
        try:
            self.meta.write_synced(self.meta.header.l1_table_offset + index * 8, L.U64.pack(value))
        except OSError as e:
            res.check_errors += 1
            raise CheckFailed(e.errno or errno.EIO, res) from None

    def write_l2_table(self, res: CheckResult, l2_offset: int, table: L2Table) -> None:
        if self.overlap_check(l2_offset, self.cs, frozenset({O.ACTIVE_L2})):
            self.report("ERROR: Could not write L2 table; metadata overlap check failed: Input/output error")
            res.check_errors += 1
            raise CheckFailed(errno.EIO, res)
        try:
            self.meta.write_synced(l2_offset, table.pack())
        except OSError as e:
            self.report(f"ERROR: Could not write L2 table: {_strerror(e)}")
            res.check_errors += 1
            raise CheckFailed(e.errno or errno.EIO, res) from None

    def extend_file(self, size: int) -> None:
        """A refcount block past the end of the file: make the file reach it."""
        self.meta.file.truncate(size)

    # -- refcounts -------------------------------------------------------------------------

    def apply_refcount_fixes(
        self, res: CheckResult, raises: list[tuple[int, int]], lowers: list[tuple[int, int]], imrt: list[int]
    ) -> None:
        """Raise before lowering: a crash in between leaves leaks, never a refcount below its users."""
        refcounts, file = self.meta.refcounts, self.meta.file
        for i, delta in raises:
            refcounts.change(i, 1, delta)
            res.corruptions_fixed += 1
        if raises:
            refcounts.write_dirty()
            file.flush()
        freed = []
        for i, delta in lowers:
            refcounts.change(i, 1, delta)
            res.leaks_fixed += 1
            if imrt[i] == 0:
                freed.append(i)
        if lowers:
            refcounts.write_dirty()
            file.flush()
        for i in freed:  # like QEMU's discard of clusters whose refcount dropped to 0
            try:
                file.trim(i << self.cbits, self.cs)
            except OSError:
                break

    def _alloc_imrt(self, imrt: list[int], count: int, first_free: int) -> tuple[int, int]:
        """QEMU's alloc_clusters_imrt: (first cluster of ``count`` free ones, updated first_free)."""
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
            imrt.extend([0] * (cluster + count - run - len(imrt)))
        cluster -= run
        for k in range(cluster, cluster + count):
            imrt[k] = 1
        return cluster, first_free

    def _write_refblocks(self, imrt: list[int], first: int, end: int, reftable: list[int]) -> bool:
        """Allocate and write the refcount blocks covering in-use clusters of [first, end)."""
        codec = self.meta.refcounts.codec
        per, cs = codec.per_block, self.cs
        first_free = 0
        grown = False
        cluster = first
        while cluster < end:
            if not imrt[cluster]:
                cluster += 1
                continue
            index = cluster // per
            start = index * per
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                first_free = max(first_free, start)
                block_cluster, first_free = self._alloc_imrt(imrt, 1, first_free)
                end = max(end, block_cluster + 1)
                if len(reftable) <= index:
                    entries = -(-(index + 1) * 8 // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                block_offset = block_cluster << self.cbits
                reftable[index] = block_offset
            if self.overlap_check(block_offset, cs):
                self.report("qcow2: ERROR writing refblock: Input/output error")
                raise CheckFailed(errno.EIO)
            self.meta.file.write(block_offset, codec.encode(imrt[start : start + per]))
            cluster = start + per
        return grown

    def rebuild_refcount_structure(self, res: CheckResult, imrt: list[int]) -> None:
        """QEMU's rebuild_refcount_structure: a new table and blocks from the in-memory counts."""
        meta = self.meta
        reftable: list[int] = []
        try:
            self._write_refblocks(imrt, 0, len(imrt), reftable)
            while True:
                table_clusters = -(-len(reftable) * 8 // self.cs)
                start, _ = self._alloc_imrt(imrt, table_clusters, 0)
                if not self._write_refblocks(imrt, start, start + table_clusters, reftable):
                    break
            table_offset = start << self.cbits
            meta.write_synced(table_offset, struct.pack(f">{len(reftable)}Q", *reftable))
            # The switch: one synced 12-byte header write.
            meta.set_header(refcount_table_offset=table_offset, refcount_table_clusters=table_clusters)
        except OSError as e:
            self.report(f"ERROR writing refcount structure: {_strerror(e)}")
            res.check_errors += 1
            raise CheckFailed(e.errno or errno.EIO, res) from None
        meta.file.refresh_size()
        meta.reload_refcounts()
