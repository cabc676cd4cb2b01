"""Zero writes: zero flags and unmapping instead of zero bytes, where QEMU does the same.

Follows the generic block layer's split by subcluster alignment
(bdrv_co_do_pwrite_zeroes), qcow2_co_pwrite_zeroes (unaligned ends widened
when what they cover already reads as zeros) and qcow2_subcluster_zeroize:
which clusters become ZERO_PLAIN or ZERO_ALLOCATED, and which are released
because the client allowed unmapping.  What cannot be zeroed that way is
written as zero bytes, unless the client asked for a fast zero.
"""

from __future__ import annotations

import errno

from ..format import layout as L
from ..format.l2 import (
    ALL_ZEROES,
    COMPRESSED,
    NORMAL,
    UNALLOCATED_ALLOCATED,
    UNALLOCATED_PLAIN,
    ZERO_ALLOCATED,
    ZERO_PLAIN,
    SubclusterType,
    subcluster_range,
)
from .allocate import DataWrites
from .core import L2Update, aligned_pieces, round_up
from .discard import Discard

ZERO_CHUNK = 1 << 20


class ZeroWrites:
    """``write_zeroes`` for one image."""

    def __init__(self, core: L2Update, data: DataWrites, discard: Discard) -> None:
        self.core = core
        self.image = core.image
        self.layout = core.layout
        self.data = data
        self.discard = discard

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False, fast: bool = False) -> None:
        """Generic split by subcluster alignment, efficient zeroing, explicit zeros as fallback."""
        if fast and self.image.header.version < 3:
            # QEMU's qcow2 offers no fast zeroing without the v3 zero flag.
            raise OSError(errno.ENOTSUP, "v2 images cannot zero without writing")
        pieces = list(aligned_pieces(offset, length, self.layout.subcluster_size))
        if fast and not all(self._pwrite_zeroes(o, n, may_unmap, dry_run=True) for o, n in pieces):
            raise OSError(errno.ENOTSUP, "zeroing this range needs data writes")
        for o, n in pieces:
            if not self._pwrite_zeroes(o, n, may_unmap):
                self._write_zero_bytes(o, n)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, ZERO_CHUNK))
        while length:
            n = min(length, len(zeros))
            self.data.write(offset, memoryview(zeros)[:n])
            offset += n
            length -= n

    def _pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, dry_run: bool = False) -> bool:
        """QEMU's qcow2_co_pwrite_zeroes; False where it answers ENOTSUP."""
        img, core = self.image, self.core
        scs = self.layout.subcluster_size
        head = offset % scs
        tail = round_up(offset + length, scs) - (offset + length)
        if offset + length == img.size:
            tail = 0
        if head or tail:
            if not (core.is_zero(offset - head, head) and core.is_zero(offset + length, tail)):
                return False
            offset -= head
            length = scs
            stype, _, _ = img.lookup(offset, scs)
            if stype not in (UNALLOCATED_PLAIN, UNALLOCATED_ALLOCATED, ZERO_PLAIN, ZERO_ALLOCATED):
                return False
        return self.zeroize(offset, length, may_unmap, dry_run)

    def zeroize(self, offset: int, length: int, may_unmap: bool, dry_run: bool = False) -> bool:
        """QEMU's qcow2_subcluster_zeroize."""
        img, layout = self.image, self.layout
        cs, scs = layout.cluster_size, layout.subcluster_size
        if img.header.version < 3:
            if img.backing is not None:
                return False
            if not dry_run:
                self.discard.discard_clusters(offset, length, full=False)
            return True
        end = offset + length
        head = min(end, round_up(offset, cs)) - offset
        offset += head
        tail = 0 if end >= img.size else end - max(offset, end & ~(cs - 1))
        end -= tail
        if dry_run:
            for start, n in ((offset - head, head), (end, tail)):
                if n and img.lookup(start, n)[0] == COMPRESSED:
                    return False
            return True
        if img.header.data_file_raw:
            self._zero_data_file(offset - head, length)
        if head and not self._zero_subclusters(offset - head, -(-head // scs)):
            return False
        nb = -(-(end - offset) // cs) if end > offset else 0
        while nb > 0:
            cleared = self._zero_in_l2(offset, nb, may_unmap)
            nb -= cleared
            offset += cleared * cs
        if tail and not self._zero_subclusters(end, -(-tail // scs)):
            return False
        return True

    def _zero_data_file(self, offset: int, length: int) -> None:
        """A raw data file must read as the guest does: zero its bytes too."""
        data = self.image.data
        if not data.zero_range(offset, length):
            data.write_zero_bytes(offset, length)

    def _zero_in_l2(self, offset: int, nb_clusters: int, may_unmap: bool) -> int:
        """QEMU's zero_in_l2_slice: set zero flags, release clusters the client lets go."""
        extended = self.layout.extended

        def rule(entry: int, bitmap: int, ctype: SubclusterType) -> tuple[int, int, bool]:
            unmap = ctype == COMPRESSED or (may_unmap and ctype in (NORMAL, ZERO_ALLOCATED))
            new_entry = 0 if unmap else entry
            if extended:
                return new_entry, ALL_ZEROES, unmap
            return new_entry | L.QCOW_OFLAG_ZERO, bitmap, unmap

        return self.core.rewrite(offset, nb_clusters, rule)

    def _zero_subclusters(self, offset: int, count: int) -> bool:
        """QEMU's zero_l2_subclusters (extended L2, part of one cluster)."""
        layout = self.layout
        l2_offset, table, l2_index = self.core.table_for_update(offset)
        if layout.cluster_type(table.entries[l2_index]) == COMPRESSED:
            return False
        sc = layout.subcluster_index(offset & (layout.cluster_size - 1))
        old = table.bitmaps[l2_index]
        span = subcluster_range(sc, sc + count)
        bitmap = (old | (span << 32)) & ~span
        if bitmap != old:
            table.set(l2_index, table.entries[l2_index], bitmap)
            self.core.store(l2_offset, l2_index, 1)
        return True
