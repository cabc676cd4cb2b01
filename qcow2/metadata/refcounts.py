"""Refcount table and blocks: counting, and QEMU's cluster allocator.

Blocks live in a :class:`~.cache.TableCache`; a change marks its block dirty
and the owner decides when dirty blocks reach the file (:meth:`write_dirty`,
called in the image's write-back order).  Structural changes are written at
once and synced before anything points at them: a new block before the
table entry that names it, a moved table before the header switches to it.
Every write goes through the image's :class:`~qcow2.hostfile.HostFile`.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from ..errors import CorruptImageError
from ..format.layout import REFT_OFFSET_MASK, U64
from ..format.refblock import RefcountCodec
from ..hostfile import HostFile
from . import overlap as O
from .cache import TableCache

BLOCK_CACHE = 64  # refcount blocks kept in memory
_IGNORE_BLOCK = frozenset({O.REFCOUNT_BLOCK})  # what a block or table write may overlap: itself
_IGNORE_TABLE = frozenset({O.REFCOUNT_TABLE})


class Refcounts:
    """Refcounts of the host clusters of one image file."""

    def __init__(
        self,
        file: HostFile,
        cluster_bits: int,
        order: int,
        table_offset: int,
        table_clusters: int,
        on_table_moved: Callable[[int, int], None] | None = None,
        check_write: Callable[..., None] | None = None,
    ):
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.codec = RefcountCodec(order, self.cluster_size)
        self.bits = self.codec.bits
        self.max_refcount = self.codec.max_value
        self.entries_per_block = self.codec.per_block
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.pread(table_offset, table_clusters << cluster_bits)
        self.table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        self.on_table_moved = on_table_moved
        self.check_write = check_write  # the owner's overlap check, before a structure is written
        self.lazy = False  # lazy refcounts: blocks reach the file only when the owner says so
        self.free_index = 0
        self.alloc_end = -(-file.file_size >> cluster_bits)
        self.blocks: TableCache[bytearray] = TableCache(BLOCK_CACHE, self._load_block, self._spill_block)
        self.version = 0  # bumped whenever the table or its blocks move

    # -- reading ---------------------------------------------------------------------

    def block_offset(self, index: int) -> int:
        if index >= len(self.table):
            return 0
        offset = self.table[index] & REFT_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise CorruptImageError(f"refcount block offset {offset:#x} is unaligned")
        return offset

    def _load_block(self, index: int) -> bytearray:
        return bytearray(self.file.pread(self.block_offset(index), self.cluster_size))

    def _block(self, index: int) -> bytearray | None:
        if not self.block_offset(index):
            return None
        return self.blocks.get(index)

    def decoded(self, index: int):
        """All refcounts of block ``index`` (None: no block, all zero)."""
        blk = self._block(index)
        return None if blk is None else self.codec.decode(blk)

    def get(self, cluster: int) -> int:
        blk = self._block(cluster // self.entries_per_block)
        return 0 if blk is None else self.codec.get(blk, cluster % self.entries_per_block)

    def count_in_use(self, end_cluster: int, stop_at: int) -> int:
        """Clusters below ``end_cluster`` with a non-zero refcount, counting up to ``stop_at``."""
        count = 0
        per = self.entries_per_block
        for index in range(-(-end_cluster // per)):
            blk = self.decoded(index)
            if blk is None:
                continue
            n = min(per, end_cluster - index * per)
            part = blk[:n]
            count += n - part.count(0)
            if count >= stop_at:
                break
        return count

    def table_clusters_range(self) -> range:
        first = self.table_offset >> self.cluster_bits
        return range(first, first + self.table_clusters)

    def block_clusters(self) -> list[int]:
        """Host clusters of the refcount blocks, sorted (for the overlap check)."""
        return sorted(
            {(e & REFT_OFFSET_MASK) >> self.cluster_bits for e in self.table if e & REFT_OFFSET_MASK}
        )

    # -- writing ---------------------------------------------------------------------

    def _spill_block(self, index: int, blk: bytearray, lo: int, hi: int) -> None:
        offset = self.block_offset(index) + lo
        if self.check_write is not None:
            self.check_write(offset, hi - lo, _IGNORE_BLOCK)
        self.file.write(offset, memoryview(blk)[lo:hi])

    def write_dirty(self) -> None:
        """Write every changed block (the changed bytes of each); no sync."""
        entries = self.blocks.dirty_entries()
        for index, blk, lo, hi in entries:
            self._spill_block(index, blk, lo, hi)
        self.blocks.mark_clean(index for index, _, _, _ in entries)

    def change(self, cluster: int, count: int, delta: int, discard: bool = False) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster``.

        ``discard``: punch out clusters whose refcount drops to zero (QEMU passes
        guest discard requests through to the image file this way).
        """
        per = self.entries_per_block
        codec = self.codec
        end = cluster + count
        while cluster < end:
            index = cluster // per
            blk = self._block(index)
            if blk is None:
                if delta < 0:
                    raise CorruptImageError(f"freeing cluster {cluster} that has no refcount block")
                self._create_block(index)
                continue
            first = cluster % per
            n = min(end - cluster, per - first)
            lo, hi = len(blk), 0
            for i in range(first, first + n):
                value = codec.get(blk, i) + delta
                if value < 0 or value > self.max_refcount:
                    cluster_no = index * per + i  # EINVAL: QEMU's update_refcount
                    raise OSError(errno.EINVAL, f"refcount of cluster {cluster_no} out of range ({value})")
                a, b = codec.set(blk, i, value)
                lo, hi = min(lo, a), max(hi, b)
                if value == 0:
                    freed = index * per + i
                    self.free_index = min(self.free_index, freed)
                    if discard:
                        # A cluster the image's own structures use (the header, a table)
                        # is never punched out, whatever an L2 entry claims it holds.
                        if self.check_write is not None:
                            self.check_write(freed << self.cluster_bits, self.cluster_size, action="discard")
                        self.file.trim(freed << self.cluster_bits, self.cluster_size)
            self.blocks.mark_dirty(index, lo, hi)
            cluster += n
        if delta > 0:
            self.alloc_end = max(self.alloc_end, end)

    def _find_free(self, count: int, start: int | None = None) -> int:
        cluster = self.free_index if start is None else start
        first, run = cluster, 0
        per = self.entries_per_block
        codec = self.codec
        while run < count:
            blk = self._block(cluster // per)
            if blk is None or not codec.get(blk, cluster % per):
                run += 1
            else:
                first, run = cluster + 1, 0
            cluster += 1
        return first

    def alloc(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1); returns the first index."""
        while True:
            first = self._find_free(count)
            per = self.entries_per_block
            span = range(first // per, (first + count - 1) // per + 1)
            missing = [i for i in span if not self.block_offset(i)]
            if missing:
                self._create_block(missing[0])
                continue  # the new block may sit in the range we chose
            self.change(first, count, +1)
            self.free_index = first + count
            return first

    def free(self, cluster: int, count: int = 1, discard: bool = False) -> None:
        self.change(cluster, count, -1, discard)

    def _sync_structure(self) -> None:
        """Before a structural change becomes visible: the counts it relies on are on disk."""
        if not self.lazy:
            self.write_dirty()
        self.file.flush()

    def _create_block(self, index: int) -> None:
        """Create refcount block ``index``; it describes itself when it lies in its own range."""
        per = self.entries_per_block
        if index >= len(self.table):
            self._grow_table(index)
            if self.block_offset(index):
                return
        while True:
            cluster = self._find_free(1)
            owner = cluster // per
            blk = bytearray(self.cluster_size)
            if owner == index:
                self.codec.set(blk, cluster % per, 1)
                break
            if self.block_offset(owner):
                self.change(cluster, 1, +1)
                break
            self._create_block(owner)
        if self.check_write is not None:
            self.check_write(cluster << self.cluster_bits, self.cluster_size)
        self.file.write(cluster << self.cluster_bits, blk)
        self._sync_structure()  # the block is on disk before the table points at it
        self._hook_block(index, cluster << self.cluster_bits)
        self.blocks.insert(index, blk)
        self.alloc_end = max(self.alloc_end, cluster + 1)

    def _hook_block(self, index: int, offset: int) -> None:
        self.version += 1
        self.table[index] = offset
        if self.check_write is not None:
            self.check_write(self.table_offset + index * 8, 8, _IGNORE_TABLE)
        self.file.write(self.table_offset + index * 8, U64.pack(offset))

    def _grow_table(self, need_index: int) -> None:
        """Move the table to the end of the file with room to spare (QEMU's refcount area)."""
        cs, per = self.cluster_size, self.entries_per_block
        start = max(self.alloc_end, -(-self.file.file_size >> self.cluster_bits))
        blocks = 0
        while True:
            entries = max(need_index + 1, len(self.table) * 3 // 2, (start + blocks + 64) // per + 2)
            table_clusters = -(-entries * 8 // cs)
            area = blocks + table_clusters
            span = range(start // per, (start + area - 1) // per + 1)
            missing = [i for i in span if not self.block_offset(i)]
            if len(missing) <= blocks:
                break
            blocks = len(missing)
        used = list(range(start, start + len(missing))) + list(range(start + blocks, start + area))
        entries = table_clusters * cs // 8
        table = self.table + [0] * (entries - len(self.table))
        new_blocks = {}
        for k, index in enumerate(missing):
            table[index] = (start + k) * cs
            new_blocks[index] = bytearray(cs)
        for cluster in used:
            index = cluster // per
            if index in new_blocks:
                self.codec.set(new_blocks[index], cluster % per, 1)
            else:
                self.change(cluster, 1, +1)
        table_offset = (start + blocks) * cs
        if self.check_write is not None:
            self.check_write(start * cs, area * cs)
        for index, blk in new_blocks.items():
            self.file.write(table[index], blk)
        self.file.write(table_offset, struct.pack(f">{entries}Q", *table))
        self._sync_structure()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        if self.on_table_moved is not None:
            self.on_table_moved(table_offset, table_clusters)
        self.table, self.table_offset, self.table_clusters = table, table_offset, table_clusters
        self.version += 1
        for index, blk in new_blocks.items():
            self.blocks.insert(index, blk)
        self.alloc_end = max(self.alloc_end, start + area)
        self.file.refresh_size()
        self.free(old_offset >> self.cluster_bits, old_clusters)
