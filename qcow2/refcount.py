"""Read access to the refcount table and blocks."""

from __future__ import annotations

import struct

from .errors import CorruptImageError
from .hostfile import HostFile
from .layout import REFT_OFFSET_MASK

_WIDE = {16: "H", 32: "I", 64: "Q"}


class Refcounts:
    """Refcounts of host clusters; blocks are decoded whole, one at a time."""

    def __init__(self, file: HostFile, cluster_bits: int, order: int, table_offset: int, table_clusters: int):
        self.file = file
        self.cluster_bits = cluster_bits
        self.bits = 1 << order
        self.entries_per_block = (1 << cluster_bits) * 8 // self.bits
        raw = file.pread(table_offset, table_clusters << cluster_bits)
        self.table = struct.unpack(f">{len(raw) // 8}Q", raw)

    def block(self, index: int) -> list[int] | bytes | None:
        """Refcounts covered by refcount-table entry ``index`` (None: no block)."""
        if index >= len(self.table):
            return None
        offset = self.table[index] & REFT_OFFSET_MASK
        if not offset:
            return None
        if offset & ((1 << self.cluster_bits) - 1):
            raise CorruptImageError(f"refcount block offset {offset:#x} is unaligned")
        raw = self.file.pread(offset, 1 << self.cluster_bits)
        bits = self.bits
        if bits == 8:
            return raw
        if bits > 8:
            return list(struct.unpack(f">{len(raw) * 8 // bits}{_WIDE[bits]}", raw))
        mask = (1 << bits) - 1
        per_byte = 8 // bits
        return [(byte >> (i * bits)) & mask for byte in raw for i in range(per_byte)]

    def get(self, cluster_index: int) -> int:
        blk = self.block(cluster_index // self.entries_per_block)
        return 0 if blk is None else blk[cluster_index % self.entries_per_block]

    def count_in_use(self, end_cluster: int, stop_at: int) -> int:
        """Clusters below ``end_cluster`` with a non-zero refcount, counting up to ``stop_at``."""
        count = 0
        per = self.entries_per_block
        for index in range(-(-end_cluster // per)):
            blk = self.block(index)
            if blk is None:
                continue
            n = min(per, end_cluster - index * per)
            part = blk[:n]
            count += n - part.count(0)
            if count >= stop_at:
                break
        return count
