"""What every kind of write shares: the L2 table to change, and changing it safely.

QEMU's order (qcow2-cluster.c): a table is made ours before it changes
(allocated, or copied when a snapshot shares it); new entries are stored
first (the metadata owner writes them back later); what the old entries
held is freed only after that write-back.  Also here: the guest view that
copy-on-write and zero writes need (reads, "is this range zero").
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..errors import CorruptImageError
from ..format import layout as L
from ..format.l2 import INVALID, L2Table, SubclusterType
from ..hostfile import zero_fill
from ..image import Qcow2Image
from ..metadata.owner import ImageMetadata
from ..status import ZERO, status_above

# Without a backing file these read as zeros whatever want_zero says (status.layer_status).
_READS_AS_ZERO_ALONE = (
    SubclusterType.ZERO_PLAIN,
    SubclusterType.ZERO_ALLOCATED,
    SubclusterType.UNALLOCATED_PLAIN,
    SubclusterType.UNALLOCATED_ALLOCATED,
)

# rule(entry, bitmap, type) -> (new entry, new bitmap, release the old entry's clusters)
EntryRule = Callable[[int, int, SubclusterType], tuple[int, int, bool]]


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def aligned_pieces(offset: int, length: int, align: int):
    """The generic block layer's split of a request: an unaligned head, the aligned
    middle, an unaligned tail (each piece ``(offset, length)``)."""
    end = offset + length
    while offset < end:
        head = offset % align
        if head:
            num = min(end - offset, align - head)
        else:
            num = end - offset
            tail = end % align
            if tail and num > align:
                num -= tail
        yield offset, num
        offset += num


class L2Update:
    """The shared core of data writes, zero writes, discards and resizes of one image."""

    def __init__(self, image: Qcow2Image, meta: ImageMetadata) -> None:
        self.image = image
        self.meta = meta
        self.layout = meta.layout

    def table_for_update(self, offset: int) -> tuple[int, L2Table, int]:
        """(L2 offset, table, index) covering guest ``offset``, the table ours alone to change."""
        meta, layout = self.meta, self.layout
        cbits = layout.cluster_bits
        l1_index = offset >> (cbits + layout.bits)
        l1 = meta.l1
        if l1_index >= len(l1):
            raise OSError(errno.ENOSPC, "write beyond the L1 table")
        l1e = l1[l1_index]
        l2_offset = l1e & L.L1E_OFFSET_MASK
        if l2_offset and l1e & L.QCOW_OFLAG_COPIED:
            table = meta.l2_tables.get(l2_offset)
        else:
            l2_offset, table = meta.allocate_l2(l1_index)
        return l2_offset, table, (offset >> cbits) & (layout.entries - 1)

    def range_type(self, table: L2Table, index: int, sc: int, l2_offset: int) -> tuple[SubclusterType, int]:
        t, count = self.layout.range_type(table.entries[index], table.bitmap(index), sc)
        if t == INVALID:
            raise CorruptImageError(f"{self.image.filename}: invalid L2 entry in table {l2_offset:#x}")
        return t, count

    def store(self, l2_offset: int, first: int, count: int) -> None:
        """Entries changed in memory; they reach the file at the next write-back."""
        self.meta.l2_changed(l2_offset, first, count)

    def release_later(self, entry: int, discard: bool = False) -> None:
        self.meta.free_entry_later(entry, discard)

    def rewrite(self, offset: int, nb_clusters: int, rule: EntryRule) -> int:
        """Apply ``rule`` to the entries of ``nb_clusters`` clusters from ``offset`` in one table.

        Changed entries are stored first, then what they released is freed:
        QEMU's order, so no cluster is free while an entry on disk still uses
        it.  Returns how many clusters were covered (at most to the table's end).
        """
        layout = self.layout
        l2_offset, table, l2_index = self.table_for_update(offset)
        nb_clusters = min(nb_clusters, layout.entries - l2_index)
        bitmaps = table.bitmaps
        freed = []
        lo = hi = None
        for i in range(l2_index, l2_index + nb_clusters):
            old_entry = table.entries[i]
            old_bitmap = bitmaps[i] if bitmaps else 0
            new_entry, new_bitmap, release = rule(old_entry, old_bitmap, layout.cluster_type(old_entry))
            if new_entry == old_entry and new_bitmap == old_bitmap:
                continue
            table.set(i, new_entry, new_bitmap)
            lo = i if lo is None else lo
            hi = i
            if release:
                freed.append(old_entry)
        if lo is not None:
            self.store(l2_offset, lo, hi - lo + 1)
        for entry in freed:
            self.release_later(entry, discard=True)
        return nb_clusters

    # -- the guest view ---------------------------------------------------------------

    def read_guest(self, offset: int, buf: memoryview) -> None:
        """Guest bytes, zeros past the end of the disk (the padded last cluster)."""
        img = self.image
        inside = max(0, min(len(buf), img.size - offset))
        if inside:
            img.readinto(offset, buf[:inside])
        if inside < len(buf):
            zero_fill(buf[inside:])

    def is_zero_fast(self, offset: int, length: int) -> bool:
        """QEMU's bdrv_co_is_zero_fast: one status query, without want_zero."""
        img = self.image
        if not length or offset >= img.size:
            return True
        length = min(length, img.size - offset)
        if img.backing is None:  # the same answer straight from the mapping: no chain to ask
            stype, n, _ = img.lookup(offset, length)
            return n >= length and stype in _READS_AS_ZERO_ALONE
        st, _ = status_above(img, offset, length, want_zero=False)
        return st.length == length and bool(st.flags & ZERO)

    def is_zero(self, offset: int, length: int) -> bool:
        """QEMU's is_zero: the whole range reads as zeros, by block status."""
        img = self.image
        length = min(length, img.size - offset)
        while length > 0:
            st, _ = status_above(img, offset, length)
            if not st.flags & ZERO or not st.length:
                return False
            offset += st.length
            length -= st.length
        return True
