"""Where an image's metadata lives: the overlap check run before every write.

QEMU checks each write to the image file against its metadata
(``qcow2_check_metadata_overlap``); a hit means the image is corrupt and the
write must not happen.  :class:`MetadataMap` covers what QEMU's default
("cached") check covers, plus the bitmap tables: the header cluster, the
active L1 table, active L2 tables, the refcount table and blocks, the
snapshot table, the snapshots' L1 tables, the bitmap directory and the
bitmap tables.  Names are QEMU's, and when a write hits several structures
the one QEMU would name (lowest in its list) is reported.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable

from ..format import layout as L
from ..format.header import Header

# QEMU's metadata_ol_names, in its bit order (the message names the first hit).
HEADER = "qcow2_header"
ACTIVE_L1 = "active L1 table"
ACTIVE_L2 = "active L2 table"
REFCOUNT_TABLE = "refcount table"
REFCOUNT_BLOCK = "refcount block"
SNAPSHOT_TABLE = "snapshot table"
INACTIVE_L1 = "inactive L1 table"
INACTIVE_L2 = "inactive L2 table"
BITMAP_DIRECTORY = "bitmap directory"
BITMAP_TABLE = "bitmap table"
ORDER = (
    HEADER,
    ACTIVE_L1,
    ACTIVE_L2,
    REFCOUNT_TABLE,
    REFCOUNT_BLOCK,
    SNAPSHOT_TABLE,
    INACTIVE_L1,
    INACTIVE_L2,
    BITMAP_DIRECTORY,
    BITMAP_TABLE,
)
_RANK = {name: i for i, name in enumerate(ORDER)}
_CLUSTER_KINDS = (ACTIVE_L2, REFCOUNT_BLOCK)  # one whole cluster each, many of them


class MetadataMap:
    """Byte ranges of the metadata of one image file, kept current by the metadata owner."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self._regions: dict[str, list[tuple[int, int]]] = {HEADER: [(0, self.cluster_size)]}
        self._clusters: dict[str, list[int]] = {kind: [] for kind in _CLUSTER_KINDS}
        self._l2, self._blocks = self._clusters[ACTIVE_L2], self._clusters[REFCOUNT_BLOCK]
        self._index: tuple[list[int], list[int], list[tuple[int, int, str]]] | None = None

    # -- keeping it current ---------------------------------------------------------

    def set_regions(self, what: str, regions: list[tuple[int, int]]) -> None:
        """Every (offset, length) of one kind of multi-cluster structure (empty ones are ignored)."""
        self._regions[what] = [(o, o + n) for o, n in regions if n > 0]
        self._index = None

    def set_clusters(self, what: str, clusters) -> None:
        self._clusters[what][:] = sorted(set(clusters))  # in place: find() holds the lists

    def add_cluster(self, what: str, cluster: int) -> None:
        lst = self._clusters[what]
        i = bisect_left(lst, cluster)
        if i == len(lst) or lst[i] != cluster:
            insort(lst, cluster)

    def remove_cluster(self, what: str, cluster: int) -> None:
        lst = self._clusters[what]
        i = bisect_left(lst, cluster)
        if i < len(lst) and lst[i] == cluster:
            del lst[i]

    # -- the check ------------------------------------------------------------------

    def find(self, offset: int, length: int, ignore: frozenset[str] = frozenset()) -> str | None:
        """The metadata a write of ``length`` bytes at ``offset`` would hit, or None.

        As in QEMU, the write is widened to whole clusters, the structures are not.
        Runs before every write: the usual answer (no hit) costs three bisections.
        """
        if length <= 0:
            return None
        cbits = self.cluster_bits
        first = offset >> cbits
        last = (offset + length - 1) >> cbits
        lo, hi = first << cbits, (last + 1) << cbits
        starts, max_ends, regions = self._index or self._sorted_regions()
        k = bisect_left(starts, hi)  # regions starting before the write's end
        region_hit = k and max_ends[k - 1] > lo
        l2, blocks = self._l2, self._blocks
        i, j = bisect_left(l2, first), bisect_left(blocks, first)
        l2_hit = i < len(l2) and l2[i] <= last
        block_hit = j < len(blocks) and blocks[j] <= last
        if not (region_hit or l2_hit or block_hit):
            return None
        hits = []
        if region_hit:
            hits = [what for start, end, what in regions[:k] if end > lo and what not in ignore]
        if l2_hit and ACTIVE_L2 not in ignore:
            hits.append(ACTIVE_L2)
        if block_hit and REFCOUNT_BLOCK not in ignore:
            hits.append(REFCOUNT_BLOCK)
        return min(hits, key=_RANK.__getitem__) if hits else None

    def _sorted_regions(self) -> tuple[list[int], list[int], list[tuple[int, int, str]]]:
        if self._index is None:
            regions = sorted((s, e, what) for what, spans in self._regions.items() for s, e in spans)
            max_ends, top = [], 0
            for _, end, _ in regions:
                top = max(top, end)
                max_ends.append(top)
            self._index = ([s for s, _, _ in regions], max_ends, regions)
        return self._index


def build_map(
    h: Header,
    l1: list[int],
    snapshot_tables: Iterable[tuple[int, int]],
    bitmap_tables: Iterable[tuple[int, int]],
    snapshot_table_size: int,
) -> MetadataMap:
    """The map of an image from its header, active L1 table, the snapshots' L1 tables and the
    bitmap tables (offset, bytes), but for what an allocation can move
    (:func:`place_refcounts_and_l1`)."""
    cbits = h.cluster_bits
    m = MetadataMap(cbits)
    m.set_clusters(ACTIVE_L2, ((e & L.L1E_OFFSET_MASK) >> cbits for e in l1 if e & L.L1E_OFFSET_MASK))
    m.set_regions(SNAPSHOT_TABLE, [(h.snapshots_offset, snapshot_table_size)])
    m.set_regions(INACTIVE_L1, list(snapshot_tables))
    if h.bitmaps and h.autoclear_features & L.AUTOCLEAR_BITMAPS:
        directory = (h.bitmaps["bitmap_directory_offset"], h.bitmaps["bitmap_directory_size"])
        m.set_regions(BITMAP_DIRECTORY, [directory])
        m.set_regions(BITMAP_TABLE, list(bitmap_tables))
    return m


def place_refcounts_and_l1(
    m: MetadataMap, refcount_blocks: Iterable[int], refcount_table: tuple[int, int], l1: tuple[int, int]
) -> None:
    """What an allocation can move: the refcount blocks (clusters), the refcount table and the
    active L1 table (offset, bytes)."""
    m.set_clusters(REFCOUNT_BLOCK, refcount_blocks)
    m.set_regions(REFCOUNT_TABLE, [refcount_table])
    m.set_regions(ACTIVE_L1, [l1])
