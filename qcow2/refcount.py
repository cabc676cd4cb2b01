"""Refcount table and blocks: reading, counting, and QEMU's allocation strategy.

Writes go through to the file as they happen (a refcount is raised on disk
before anything points at its cluster, lowered only after nothing does), so an
image killed at any instant has refcount >= references.  With lazy refcounts
the block updates stay in memory until :meth:`Refcounts.write_back`, and the
image's dirty bit covers the gap.
"""

from __future__ import annotations

import errno
import os
import struct
from collections import OrderedDict
from collections.abc import Callable

from .errors import CorruptImageError
from .hostfile import HostFile
from .layout import REFT_OFFSET_MASK, U64

_WIDE = {16: "H", 32: "I", 64: "Q"}
BLOCK_CACHE = 64


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
    ):
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.bits = 1 << order
        self.max_refcount = (1 << self.bits) - 1
        self.entries_per_block = self.cluster_size * 8 // self.bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.pread(table_offset, table_clusters << cluster_bits)
        self.table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        self.on_table_moved = on_table_moved
        self.lazy = False
        self.free_index = 0
        self.alloc_end = -(-file.file_size >> cluster_bits)
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self.version = 0  # bumped whenever the table or its blocks move

    # -- reading ---------------------------------------------------------------------

    def block_offset(self, index: int) -> int:
        if index >= len(self.table):
            return 0
        offset = self.table[index] & REFT_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise CorruptImageError(f"refcount block offset {offset:#x} is unaligned")
        return offset

    def _block(self, index: int) -> bytearray | None:
        blk = self._blocks.get(index)
        if blk is not None:
            self._blocks.move_to_end(index)
            return blk
        offset = self.block_offset(index)
        if not offset:
            return None
        blk = bytearray(self.file.pread(offset, self.cluster_size))
        self._cache(index, blk)
        return blk

    def _cache(self, index: int, blk: bytearray) -> None:
        self._blocks[index] = blk
        while len(self._blocks) > BLOCK_CACHE:
            old, old_blk = next(iter(self._blocks.items()))
            if old in self._dirty:
                self._write_block(old, old_blk, 0, len(old_blk))
                self._dirty.discard(old)
            del self._blocks[old]

    def decoded(self, index: int) -> list[int] | bytes | None:
        """All refcounts of block ``index`` (None: no block, all zero)."""
        blk = self._block(index)
        if blk is None:
            return None
        bits = self.bits
        if bits == 8:
            return bytes(blk)
        if bits > 8:
            return list(struct.unpack(f">{len(blk) * 8 // bits}{_WIDE[bits]}", blk))
        mask = (1 << bits) - 1
        return [(byte >> (i * bits)) & mask for byte in blk for i in range(8 // bits)]

    def _get_entry(self, blk: bytearray, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            b = bits >> 3
            return int.from_bytes(blk[i * b : i * b + b], "big")
        bit = i * bits
        return (blk[bit >> 3] >> (bit & 7)) & self.max_refcount

    def _set_entry(self, blk: bytearray, i: int, value: int) -> tuple[int, int]:
        """Store ``value``; returns the byte range that changed."""
        bits = self.bits
        if bits >= 8:
            b = bits >> 3
            blk[i * b : i * b + b] = value.to_bytes(b, "big")
            return i * b, i * b + b
        bit = i * bits
        shift = bit & 7
        byte = blk[bit >> 3] & ~(self.max_refcount << shift) & 0xFF
        blk[bit >> 3] = byte | (value << shift)
        return bit >> 3, (bit >> 3) + 1

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

    def metadata_clusters(self) -> set[int]:
        """Clusters holding the table and the blocks (for overlap checks)."""
        first = self.table_offset >> self.cluster_bits
        used = set(range(first, first + self.table_clusters))
        used.update((e & REFT_OFFSET_MASK) >> self.cluster_bits for e in self.table if e & REFT_OFFSET_MASK)
        return used

    # -- writing ---------------------------------------------------------------------

    def _write_block(self, index: int, blk: bytearray, start: int, end: int) -> None:
        offset = self.block_offset(index)
        os.pwrite(self.file.fd, blk[start:end], offset + start)

    def change(self, cluster: int, count: int, delta: int, discard: bool = False) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster``.

        ``discard``: punch out clusters whose refcount drops to zero (QEMU passes
        guest discard requests through to the image file this way).
        """
        per = self.entries_per_block
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
                value = self._get_entry(blk, i) + delta
                if value < 0 or value > self.max_refcount:
                    raise OSError(errno.EIO, f"refcount of cluster {index * per + i} out of range ({value})")
                a, b = self._set_entry(blk, i, value)
                lo, hi = min(lo, a), max(hi, b)
                if value == 0:
                    freed = index * per + i
                    self.free_index = min(self.free_index, freed)
                    if discard:
                        self.file.trim(freed << self.cluster_bits, self.cluster_size)
            if self.lazy:
                self._dirty.add(index)
            else:
                self._write_block(index, blk, lo, hi)
            cluster += n
        if delta > 0:
            self.alloc_end = max(self.alloc_end, end)

    def _find_free(self, count: int, start: int | None = None) -> int:
        cluster = self.free_index if start is None else start
        first, run = cluster, 0
        per = self.entries_per_block
        while run < count:
            blk = self._block(cluster // per)
            if blk is None or not self._get_entry(blk, cluster % per):
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
                self._set_entry(blk, cluster % per, 1)
                break
            if self.block_offset(owner):
                self.change(cluster, 1, +1)
                break
            self._create_block(owner)
        os.pwrite(self.file.fd, blk, cluster << self.cluster_bits)
        os.fsync(self.file.fd)  # the block is on disk before the table points at it
        self.file.refresh_size()
        self._hook_block(index, cluster << self.cluster_bits)
        self._cache(index, blk)
        self.alloc_end = max(self.alloc_end, cluster + 1)

    def _hook_block(self, index: int, offset: int) -> None:
        self.version += 1
        self.table[index] = offset
        os.pwrite(self.file.fd, U64.pack(offset), self.table_offset + index * 8)

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
                self._set_entry(new_blocks[index], cluster % per, 1)
            else:
                self.change(cluster, 1, +1)
        for index, blk in new_blocks.items():
            os.pwrite(self.file.fd, blk, table[index])
        table_offset = (start + blocks) * cs
        os.pwrite(self.file.fd, struct.pack(f">{entries}Q", *table), table_offset)
        os.fsync(self.file.fd)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        if self.on_table_moved is not None:
            self.on_table_moved(table_offset, table_clusters)
        self.table, self.table_offset, self.table_clusters = table, table_offset, table_clusters
        self.version += 1
        for index, blk in new_blocks.items():
            self._cache(index, blk)
        self.alloc_end = max(self.alloc_end, start + area)
        self.file.refresh_size()
        self.free(old_offset >> self.cluster_bits, old_clusters)

    def write_back(self) -> None:
        """Write the blocks lazy mode kept in memory."""
        for index in sorted(self._dirty):
            blk = self._blocks.get(index)
            if blk is not None:
                self._write_block(index, blk, 0, len(blk))
        self._dirty.clear()
