"""The check engine: compare counted references with the refcounts on disk, decide the fixes.

What ``qemu-img check`` finds, in QEMU 7.2's words and order
(``qcow2_check_refcounts``): :mod:`.counting` counts every reference in
memory; the engine compares those counts with the refcount blocks, checks the
COPIED flags, and decides what to fix; :mod:`.repair` does the writing,
:mod:`.tool` the printing.
"""

from __future__ import annotations

import copy
import errno
import os
from collections.abc import Callable

from ..errors import ImageError
from ..format import layout as L
from ..format.header import MAX_SNAPSHOTS
from ..format.l2 import NORMAL, L2Table
from ..format.snapshots import Snapshot, SnapshotTableError, walk_snapshot_table
from ..hostfile import HostFile
from ..metadata.owner import ImageMetadata
from .counting import ReferenceCounter, alt_hex
from .repair import Repair
from .result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult

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
        self.per_block = self.cs * 8 // self.refcount_bits
        self.has_data_file = h.has_data_file
        self.l1 = list(meta.l1)
        self.snapshots, self.snapshots_size = self._read_snapshots()
        self.disk = meta.refcounts
        self.counter = ReferenceCounter(meta, self.repair, report, self.snapshots, self.snapshots_size)
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

    def _disk_block(self, index: int) -> tuple[list[int] | bytes | None, str | None]:
        """Refcount block ``index`` from disk, or why it cannot be read (QEMU's get_refcount)."""
        table = self.disk.table
        offset = table[index] & L.REFT_OFFSET_MASK if index < len(table) else 0
        if offset & (self.cs - 1):
            self.repair.signal_corruption(
                f"Refblock offset {alt_hex(offset)} unaligned (reftable index: {alt_hex(index)})"
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

    # -- walking the metadata -----------------------------------------------------------

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
            self.counter.rebuild = True
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
        imrt = self.counter.imrt
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
        counter = self.counter
        counter.count(res, fix)
        res.total_clusters = -(-(self.header.size // 512 * 512) // self.cs)
        pre_compare = copy.copy(res)
        highest = self._compare(res, 0)
        if counter.rebuild and fix & FIX_ERRORS:
            old = copy.copy(res)
            fresh_leaks = 0
            self.report("Rebuilding refcount structure")
            self.repair.rebuild_refcount_structure(res, counter.imrt)
            self.disk = self.meta.refcounts
            self._decoded.clear()
            res.corruptions = res.leaks = 0
            counter.count(res, 0, nb_clusters=len(counter.imrt))
            if fix & FIX_LEAKS:
                saved = copy.copy(res)
                scratch = CheckResult()
                highest = self._compare(scratch, FIX_LEAKS)
                if self.counter.rebuild:
                    self.report("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = scratch.leaks
                res.assign(saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.counter.rebuild:
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
