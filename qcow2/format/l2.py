"""L2 tables and their entries: what a guest cluster is, and where its bytes live.

:class:`L2Layout` holds one image's geometry (cluster and subcluster sizes,
entries per table) and the decoding rules of QEMU's qcow2-cluster.c:
``qcow2_get_cluster_type`` and ``qcow2_get_subcluster_type`` as
:meth:`L2Layout.cluster_type` and :meth:`L2Layout.range_type`, and the one
decoder of compressed-cluster descriptors.  :class:`L2Table` is a table
decoded whole, once, into native arrays.
"""

from __future__ import annotations

import operator
import sys
from array import array
from bisect import bisect_left
from enum import IntEnum
from itertools import compress

from . import layout as L

_LITTLE_ENDIAN = sys.byteorder == "little"
ALL_ZEROES = L.SUBCLUSTER_ZERO_MASK  # extended L2 bitmap: every subcluster reads as zeros


class SubclusterType(IntEnum):
    """QEMU's QCow2SubclusterType (a standard cluster is one subcluster)."""

    NORMAL = 0
    COMPRESSED = 1
    ZERO_PLAIN = 2
    ZERO_ALLOCATED = 3
    UNALLOCATED_PLAIN = 4
    UNALLOCATED_ALLOCATED = 5
    INVALID = 6


NORMAL, COMPRESSED, ZERO_PLAIN, ZERO_ALLOCATED, UNALLOCATED_PLAIN, UNALLOCATED_ALLOCATED, INVALID = (
    SubclusterType
)
HAS_HOST_CLUSTER = (NORMAL, ZERO_ALLOCATED, UNALLOCATED_ALLOCATED)  # the entry names a host cluster


def ctz32(v: int) -> int:
    v &= 0xFFFFFFFF
    return 32 if v == 0 else (v & -v).bit_length() - 1


def cto32(v: int) -> int:
    return ctz32(~v)


def clz32(v: int) -> int:
    return 32 - (v & 0xFFFFFFFF).bit_length()


def subcluster_range(first: int, end: int) -> int:
    """Bitmap bits ``first .. end-1`` (QEMU's QCOW_OFLAG_SUB_ALLOC_RANGE)."""
    return (1 << end) - (1 << first)


class L2Layout:
    """One image's L2 geometry and entry-decoding rules."""

    __slots__ = (
        "cluster_bits",
        "cluster_size",
        "extended",
        "entry_size",
        "entries",
        "bits",
        "subclusters",
        "subcluster_bits",
        "subcluster_size",
        "has_data_file",
        "zero_flag",
        "_csize_shift",
        "_csize_mask",
        "_coffset_mask",
    )

    def __init__(self, cluster_bits: int, extended: bool, has_data_file: bool, version: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.extended = extended
        self.entry_size = 16 if extended else 8
        self.entries = self.cluster_size // self.entry_size
        self.bits = self.entries.bit_length() - 1
        self.subclusters = 32 if extended else 1
        self.subcluster_bits = cluster_bits - (5 if extended else 0)
        self.subcluster_size = 1 << self.subcluster_bits
        self.has_data_file = has_data_file
        self.zero_flag = version >= 3  # v2 has no zero clusters
        # Compressed descriptor (spec §"Compressed Clusters Descriptor"): x = 62 - (cluster_bits - 8).
        self._csize_shift = 62 - (cluster_bits - 8)
        self._csize_mask = (1 << (cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1

    @classmethod
    def of(cls, header) -> L2Layout:
        return cls(header.cluster_bits, header.extended_l2, header.has_data_file, header.version)

    def l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.bits)

    def l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.entries - 1)

    def subcluster_index(self, offset_in_cluster: int) -> int:
        return (offset_in_cluster >> self.subcluster_bits) & (self.subclusters - 1)

    def cluster_type(self, entry: int) -> SubclusterType:
        """QEMU's qcow2_get_cluster_type, in subcluster terms for standard L2."""
        if entry & L.QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & L.QCOW_OFLAG_ZERO and not self.extended:
            return ZERO_ALLOCATED if entry & L.L2E_OFFSET_MASK else ZERO_PLAIN
        if not entry & L.L2E_OFFSET_MASK:
            if self.has_data_file and entry & L.QCOW_OFLAG_COPIED:
                return NORMAL
            return UNALLOCATED_PLAIN
        return NORMAL

    def range_type(self, entry: int, bitmap: int, sc: int) -> tuple[SubclusterType, int]:
        """Type of subcluster ``sc`` and how many subclusters from it share that type."""
        ctype = self.cluster_type(entry)
        if not self.extended or ctype == COMPRESSED:
            return ctype, self.subclusters - sc
        low = (1 << sc) - 1
        if ctype == NORMAL:
            if (bitmap >> 32) & bitmap:
                return INVALID, 0
            if bitmap >> (32 + sc) & 1:
                return ZERO_ALLOCATED, cto32((bitmap >> 32) | low) - sc
            if bitmap >> sc & 1:
                return NORMAL, cto32((bitmap & 0xFFFFFFFF) | low) - sc
            return UNALLOCATED_ALLOCATED, ctz32(((bitmap >> 32) | bitmap) & ~low) - sc
        if bitmap & 0xFFFFFFFF:
            return INVALID, 0
        if bitmap >> (32 + sc) & 1:
            return ZERO_PLAIN, cto32((bitmap >> 32) | low) - sc
        return UNALLOCATED_PLAIN, ctz32((bitmap >> 32) & ~low) - sc

    def needs_new_cluster(self, entry: int) -> bool:
        """A write here must allocate: the cluster is not ours alone to write in place."""
        return not (self.cluster_type(entry) in (NORMAL, ZERO_ALLOCATED) and entry & L.QCOW_OFLAG_COPIED)

    # -- compressed clusters: the one decoder of the descriptor ------------------------

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """Host offset and byte count of the compressed data an entry points at.

        The descriptor counts 512-byte sectors from the one the data starts in,
        so the byte count runs to the end of the last sector.
        """
        offset = entry & self._coffset_mask
        nb_sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return offset, nb_sectors * 512 - (offset & 511)

    def compressed_clusters(self, entry: int) -> tuple[int, int]:
        """First host cluster and number of clusters the compressed data touches."""
        offset, length = self.compressed_range(entry)
        first = offset >> self.cluster_bits
        return first, ((offset + length - 1) >> self.cluster_bits) - first + 1


class L2Table:
    """One L2 table decoded whole: entries, subcluster bitmaps, and where non-empty entries are.

    Entries live in native ``array('Q')`` (8 bytes each, like the table on
    disk); ``used`` indexes the non-empty ones so runs of empty entries are
    skipped without looking at them.
    """

    __slots__ = ("entries", "bitmaps", "used")

    def __init__(self, raw: bytes, extended: bool) -> None:
        words = array("Q", raw)
        if _LITTLE_ENDIAN:
            words.byteswap()
        if extended:
            self.entries = words[0::2]
            self.bitmaps = words[1::2]
            either = map(operator.or_, self.entries, self.bitmaps)
        else:
            self.entries = words
            self.bitmaps = None
            either = words
        self.used = list(compress(range(len(self.entries)), either))

    @classmethod
    def empty(cls, layout: L2Layout) -> L2Table:
        return cls(bytes(layout.cluster_size), layout.extended)

    def bitmap(self, index: int) -> int:
        return self.bitmaps[index] if self.bitmaps is not None else 0

    def set(self, index: int, entry: int, bitmap: int = 0) -> None:
        self.entries[index] = entry
        if self.bitmaps is not None:
            self.bitmaps[index] = bitmap
        i = bisect_left(self.used, index)
        present = i < len(self.used) and self.used[i] == index
        if (entry or bitmap) and not present:
            self.used.insert(i, index)
        elif not (entry or bitmap) and present:
            del self.used[i]

    def pack(self, first: int = 0, count: int | None = None) -> bytes:
        """On-disk bytes of entries ``first .. first+count-1`` (all by default)."""
        if count is None:
            count = len(self.entries) - first
        if self.bitmaps is None:
            words = self.entries[first : first + count]
        else:
            words = array("Q", bytes(16 * count))
            words[0::2] = self.entries[first : first + count]
            words[1::2] = self.bitmaps[first : first + count]
        if _LITTLE_ENDIAN:
            words.byteswap()  # a copy: slicing made it
        return words.tobytes()

    def next_used(self, index: int) -> int:
        """Index of the first non-empty entry at or after ``index`` (len if none)."""
        i = bisect_left(self.used, index)
        return self.used[i] if i < len(self.used) else len(self.entries)
