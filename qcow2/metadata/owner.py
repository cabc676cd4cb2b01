"""The one owner of a qcow2 file's metadata.

:class:`ImageMetadata` holds everything the file says about itself: the
header (changed by field name), the dirty and corrupt bits, the L1 table,
the L2 tables and refcount blocks (in :class:`~.cache.TableCache`\\ s), the
frees that wait for a write-back, and where all of it lives (the overlap
check).  Readers and writers ask it; only it (and, for guest data, the
writer through :class:`~qcow2.hostfile.HostFile`) writes to the file.

Changes reach the file in one order, :meth:`ImageMetadata.write_back`:

1. the data is made durable (the data file is synced), and so are the
   refcounts that the new mappings need (dirty refcount blocks are written
   unless refcounts are lazy, then the image file is synced);
2. dirty L2 tables are written, then dirty L1 entries, then the file is
   synced: from here on the new mappings are on disk;
3. the clusters the old mappings held are freed (refcounts lowered,
   discarded clusters punched out); a lost free is a leak, never damage.

Structural changes (new refcount blocks, a moved refcount table, a bigger
L1 table) are written and synced before the header or a table points at
them.  A v3 image carries the dirty bit while it has changes not yet
written back, so a crash leaves an image the next read-write open repairs.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import replace

from ..errors import CorruptImageError
from ..format import layout as L
from ..format.header import Header, parse_header, rebuild_header
from ..format.l2 import COMPRESSED, NORMAL, ZERO_ALLOCATED, L2Layout, L2Table
from ..format.snapshots import Snapshot, SnapshotTableError, walk_snapshot_table
from ..hostfile import HostFile
from . import overlap as O
from .bitmaps import PersistentBitmaps
from .cache import TableCache
from .refcounts import Refcounts

log = logging.getLogger("qcow2")

L2_CACHE_BYTES = 32 << 20  # clean L2 tables kept decoded
DIRTY_L2_BYTES = 32 << 20  # write back before more table bytes than this are pending
MAX_PENDING_FREES = 1 << 16
_IGNORE_L1 = frozenset({O.ACTIVE_L1})
_IGNORE_L2 = frozenset({O.ACTIVE_L2})


class ImageMetadata:
    """Header, tables and refcounts of one qcow2 file, read at open in QEMU's order.

    The reads at open follow QEMU's (L1 table, refcount table, a second pass
    over the extensions, the backing name, snapshot table, bitmaps), so the
    kernel's readahead leaves the same pages cached and block status over
    unwritten extents (which SEEK_HOLE reports by page-cache state) comes
    out the same.
    """

    def __init__(self, filename: str, file: HostFile, header: Header) -> None:
        self.filename = filename
        self.file = file
        self.header = h = header
        self.layout = L2Layout.of(h)
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        raw = file.pread(h.l1_table_offset, h.l1_size * 8)
        self.l1: list[int] = list(struct.unpack(f">{h.l1_size}Q", raw))
        self.refcounts = self._load_refcounts()
        for pos in h.extension_offsets:  # QEMU's second pass over the extensions
            file.pread(pos, 8)
        if h.backing_file_offset:
            file.pread(h.backing_file_offset, h.backing_file_size)
        self.snapshots, self.snapshot_table_size = self._read_snapshots()
        self.bitmaps = PersistentBitmaps(self)
        self.bitmaps.load()
        self.l2_tables: TableCache[L2Table] = TableCache(
            max(16, L2_CACHE_BYTES >> h.cluster_bits), self._load_l2
        )
        self.data_file: HostFile | None = None  # set by the opener
        # Write state (an image opened read-only never changes any of it).
        self.corrupt = False
        self.dirty_marked = False
        self.updating = False  # begin_update has run and nothing since needs it again
        self._dirty_l1: set[int] = set()
        self._pending_frees: list[tuple[int, bool]] = []  # old L2 entries, and whether discarded
        self._pending_cluster_frees: list[int] = []  # old L2 tables
        self._map: O.MetadataMap | None = None
        self._map_version = -1

    # -- reading at open ------------------------------------------------------------

    def _load_refcounts(self) -> Refcounts:
        h = self.header
        return Refcounts(
            self.file,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            on_table_moved=self._refcount_table_moved,
            check_write=self.check_write,
        )

    def reload_refcounts(self) -> None:
        """After a repair rewrote them: read the refcount structure again."""
        self.refcounts = self._load_refcounts()
        self._map_version = -1
        self.updating = False  # the next change sets the dirty bit (and lazy mode) again

    def _read_snapshots(self) -> tuple[list[Snapshot], int]:
        """The table as QEMU reads it at open; a table QEMU refuses, we refuse (CorruptImageError)."""
        h = self.header
        snapshots: list[Snapshot] = []
        size = 0
        try:
            for snapshot, end in walk_snapshot_table(self.file.pread, h.snapshots_offset, h.nb_snapshots):
                if snapshot.disk_size is None:  # QEMU's rule: the image's size when it was opened
                    snapshot = replace(snapshot, disk_size=h.size // 512 * 512)
                snapshots.append(snapshot)
                size = end
        except SnapshotTableError as e:
            raise CorruptImageError(f"{self.filename}: {e}") from None
        return snapshots, size

    def _load_l2(self, offset: int) -> L2Table:
        if offset & (self.cluster_size - 1):
            raise CorruptImageError(f"{self.filename}: L2 table offset {offset:#x} unaligned")
        return L2Table(self.file.pread(offset, self.cluster_size), self.layout.extended)

    def l2_table(self, offset: int) -> L2Table:
        return self.l2_tables.get(offset)

    # -- the header, by field name --------------------------------------------------

    def set_header(self, **fields: int) -> None:
        """Write header fields (adjacent ones in one write), sync, and update the header in memory."""
        runs: list[list] = []
        for offset, data in sorted(L.header_field_bytes(name, value) for name, value in fields.items()):
            if runs and runs[-1][0] + len(runs[-1][1]) == offset:
                runs[-1][1] += data
            else:
                runs.append([offset, bytearray(data)])
        for offset, data in runs:
            self.file.write(offset, data)
        self.file.flush()
        for name, value in fields.items():
            setattr(self.header, name, value)

    def _set_incompatible(self, value: int) -> None:
        if self.header.version >= 3:  # v2 has no feature bits: the state lives in memory only
            self.set_header(incompatible_features=value)
        else:
            self.header.incompatible_features = value

    def _refcount_table_moved(self, offset: int, clusters: int) -> None:
        self.set_header(refcount_table_offset=offset, refcount_table_clusters=clusters)
        self._map_version = -1

    def start_writing(self) -> None:
        """Before the first write (QEMU's read-write open): autoclear bits we do not know go,
        and the persistent bitmaps are marked in use."""
        h = self.header
        if h.version < 3:
            return
        keep = h.autoclear_features & (L.AUTOCLEAR_DATA_FILE_RAW | L.AUTOCLEAR_BITMAPS)
        if keep != h.autoclear_features:
            self.set_header(autoclear_features=keep)
            self._map = None
        self.bitmaps.start_writing()

    def rewrite_header(self, **changes: object) -> None:
        """Cluster 0 written again whole with ``changes`` (synced); the header in memory is
        the one parsed back from it (where its extensions now are included)."""
        new = replace(self.header, **changes)
        raw = rebuild_header(new)
        parsed = parse_header(raw, self.filename)
        self.file.write(0, raw)
        self.file.flush()
        self.header.__dict__.update(parsed.__dict__)
        self._map = None

    def metadata_moved(self) -> None:
        """Structures moved (bitmap directory or tables, snapshot table, the L1 table's
        contents): the overlap map is built again at its next use."""
        self._map = None

    def begin_update(self) -> None:
        """Before a change: refuse if corrupt; mark a v3 image dirty while changes are pending.

        With lazy refcounts the refcount blocks themselves wait too, and the
        dirty bit is what makes the next opener rebuild them.
        """
        if self.updating:
            return
        if self.corrupt:
            raise OSError(errno.EIO, "image is marked corrupt")
        if not self.dirty_marked and self.header.version >= 3:
            self._set_incompatible(self.header.incompatible_features | L.INCOMPAT_DIRTY)
            self.refcounts.lazy = self.header.lazy_refcounts
            self.dirty_marked = True
        self.updating = True

    def set_corrupt_bit(self) -> None:
        """QEMU's qcow2_mark_corrupt: the image may not be opened read-write any more."""
        self._set_incompatible(self.header.incompatible_features | L.INCOMPAT_CORRUPT)

    def mark_corrupt(self, why: str) -> None:
        """Corruption found while writing: set the corrupt bit, fail the request with EIO."""
        log.error("%s: marking image as corrupt: %s", self.filename, why)
        self.corrupt = True
        self.updating = False
        self.set_corrupt_bit()
        raise OSError(errno.EIO, f"{self.filename}: {why}")

    def mark_clean(self) -> None:
        """Clear the dirty and corrupt bits once everything they covered is on disk."""
        h = self.header
        bits = h.incompatible_features & ~(L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT)
        if h.version >= 3 and bits != h.incompatible_features:
            self.file.flush()
            self.set_header(incompatible_features=bits)

    # -- where the metadata is -------------------------------------------------------

    @property
    def map(self) -> O.MetadataMap:
        """The overlap-check map, built at first use and kept current by the owner."""
        refs = self.refcounts
        if self._map is None:
            snapshot_l1s = ((s.l1_table_offset, s.l1_size * 8) for s in self.snapshots)
            bitmap_tables = ((b.entry.table_offset, b.entry.table_size * 8) for b in self.bitmaps.bitmaps)
            self._map = O.build_map(
                self.header, self.l1, snapshot_l1s, bitmap_tables, self.snapshot_table_size
            )
            self._map_version = -1
        if self._map_version != refs.version:
            reftable = (refs.table_offset, refs.table_clusters * self.cluster_size)
            l1 = (self.header.l1_table_offset, len(self.l1) * 8)
            O.place_refcounts_and_l1(self._map, refs.block_clusters(), reftable, l1)
            self._map_version = refs.version
        return self._map

    def overlaps(self, offset: int, length: int, ignore: frozenset[str] = frozenset()) -> str | None:
        return self.map.find(offset, length, ignore)

    def check_write(
        self, offset: int, length: int, ignore: frozenset[str] = frozenset(), action: str = "write"
    ) -> None:
        """QEMU's pre-write overlap check for a write to the image file: a hit marks the image corrupt.

        ``ignore``: the kind of structure being written (QEMU's ``ign``); a
        table may be rewritten in place, but never where anything else lives.
        """
        what = self.map.find(offset, length, ignore)
        if what is not None:
            self.mark_corrupt(f"Preventing invalid {action} on metadata (overlaps with {what})")

    def check_data_write(self, host: int, length: int) -> None:
        """The same for guest data; a data file holds no metadata."""
        if self.data_file is None:
            m = self._map
            if m is None or self._map_version != self.refcounts.version:
                m = self.map
            if m.find(host, length) is not None:
                self.check_write(host, length)

    def write_synced(self, offset: int, data: bytes) -> None:
        """A metadata write in place (a repair's, a header extension's): on disk before the next step."""
        self.file.write(offset, data)
        self.file.flush()

    # -- mapping changes (the writer's side) ------------------------------------------

    def set_l1(self, index: int, value: int) -> None:
        self.l1[index] = value
        self._dirty_l1.add(index)

    def allocate_l2(self, l1_index: int) -> tuple[int, L2Table]:
        """QEMU's l2_allocate: a table of our own for L1 entry ``l1_index``.

        A copy of the old table when there was one (shared with a snapshot),
        else empty; written at once (nothing points at it until the L1 entry
        is written back), the old table freed after that write-back.
        """
        cbits, cs = self.cluster_bits, self.cluster_size
        old = self.l1[l1_index] & L.L1E_OFFSET_MASK
        new = self.refcounts.alloc(1) << cbits
        self.refcounts.write_dirty()  # QEMU flushes its refcount cache on every L2 allocation
        self.check_write(new, cs)
        raw = self.l2_table(old).pack() if old else bytes(cs)
        self.file.write(new, raw)
        self.map.add_cluster(O.ACTIVE_L2, new >> cbits)
        self.set_l1(l1_index, new | L.QCOW_OFLAG_COPIED)
        table = L2Table(raw, self.layout.extended)
        self.l2_tables.insert(new, table)
        if old:
            self.l2_tables.discard(old)
            self.map.remove_cluster(O.ACTIVE_L2, old >> cbits)
            self._pending_cluster_frees.append(old >> cbits)
        return new, table

    def l2_changed(self, l2_offset: int, first: int, count: int) -> None:
        """Entries ``first .. first+count-1`` of a cached table changed; they go out at write-back."""
        tables = self.l2_tables
        if tables.mark_dirty(l2_offset, first, first + count):
            if tables.dirty_count * self.cluster_size > DIRTY_L2_BYTES:
                self.write_back()

    def free_entry_later(self, entry: int, discard: bool = False) -> None:
        """Free what an old L2 entry held, once the entry's removal is on disk.

        Data-file clusters are not refcounted and sit at their guest offset:
        nothing can reuse them, and a later write may land on the same spot,
        so their discard happens now.
        """
        if self.data_file is not None:
            self.release_entry(entry, discard)
            return
        self._pending_frees.append((entry, discard))
        if len(self._pending_frees) > MAX_PENDING_FREES:
            self.write_back()

    def release_entry(self, entry: int, discard: bool) -> None:
        """Drop the reference an old L2 entry held (QEMU's qcow2_free_any_cluster).

        ``discard`` (a guest discard or unmapping zero write): clusters nobody
        uses any more are punched out of the file, the data file included.
        """
        layout = self.layout
        ctype = layout.cluster_type(entry)
        if ctype == COMPRESSED:
            first, count = layout.compressed_clusters(entry)
            self.refcounts.free(first, count, discard)
        elif ctype in (NORMAL, ZERO_ALLOCATED):
            host = entry & L.L2E_OFFSET_MASK
            if self.data_file is not None:
                if discard:
                    self.data_file.trim(host, self.cluster_size)
            elif host:
                self.refcounts.free(host >> self.cluster_bits, 1, discard)

    def write_l1(self, entries: list[int]) -> None:
        """Replace the whole active L1 table in place (same size; synced); nothing may be pending."""
        if self.has_pending() or len(entries) != len(self.l1):
            raise ValueError("write_l1: pending changes, or a table of another size")
        raw = struct.pack(f">{len(entries)}Q", *entries)
        self.check_write(self.header.l1_table_offset, len(raw), _IGNORE_L1)
        self.file.write(self.header.l1_table_offset, raw)
        self.file.flush()
        self.l1[:] = entries  # the same list: readers hold it
        self._map = None

    def grow_l1(self, entries: int) -> None:
        """Copy the L1 table to a bigger place, switch the header to it, free the old one."""
        h = self.header
        cs, cbits = self.cluster_size, self.cluster_bits
        clusters = -(-entries * 8 // cs)
        self.write_back()
        new = self.refcounts.alloc(clusters) << cbits
        table = self.l1 + [0] * (entries - len(self.l1))
        raw = struct.pack(f">{entries}Q", *table)
        self.check_write(new, clusters * cs)
        self.file.write(new, raw + bytes(clusters * cs - len(raw)))
        if not self.refcounts.lazy:
            self.refcounts.write_dirty()
        self.file.flush()
        old, old_clusters = h.l1_table_offset, -(-len(self.l1) * 8 // cs)
        self.set_header(l1_size=entries, l1_table_offset=new)
        self.l1.extend(table[len(self.l1) :])  # the same list: readers hold it
        self._map_version = -1
        if old and old_clusters:
            self.refcounts.free(old >> cbits, old_clusters)

    # -- the write-back order ------------------------------------------------------------

    def has_pending(self) -> bool:
        return bool(
            self.l2_tables.dirty_count or self._dirty_l1 or self._pending_frees or self._pending_cluster_frees
        )

    def write_back(self) -> None:
        """Everything held in memory to the file, in the order the module docstring states."""
        if self.corrupt:  # QEMU makes a corrupt image unusable: nothing more reaches the file
            raise OSError(errno.EIO, f"{self.filename}: image is marked corrupt")
        refcounts = self.refcounts
        # 1. data and refcounts durable
        if self.data_file is not None:
            self.data_file.flush()
        if not refcounts.lazy:
            refcounts.write_dirty()
        self.file.flush()
        if not self.has_pending():
            return
        # 2. new mappings: L2 tables, then L1 entries, then sync
        dirty = self.l2_tables.dirty_entries()
        esize = self.layout.entry_size
        for l2_offset, _, first, end in dirty:  # all checked before the first write
            self.check_write(l2_offset + first * esize, (end - first) * esize, _IGNORE_L2)
        l1_offset = self.header.l1_table_offset
        l1_dirty = sorted(self._dirty_l1)
        if l1_dirty:
            self.check_write(l1_offset + l1_dirty[0] * 8, (l1_dirty[-1] - l1_dirty[0] + 1) * 8, _IGNORE_L1)
        for l2_offset, table, first, end in dirty:
            self.file.write(l2_offset + first * esize, table.pack(first, end - first))
        for index in l1_dirty:
            self.file.write(l1_offset + index * 8, L.U64.pack(self.l1[index]))
        self.file.flush()
        self.l2_tables.mark_clean(l2_offset for l2_offset, _, _, _ in dirty)
        self._dirty_l1.clear()
        # 3. what the old mappings held
        frees, self._pending_frees = self._pending_frees, []
        for entry, discard in frees:
            self.release_entry(entry, discard)
        tables, self._pending_cluster_frees = self._pending_cluster_frees, []
        for cluster in tables:
            refcounts.free(cluster)
        if not refcounts.lazy:
            refcounts.write_dirty()

    def close(self) -> None:
        """Store the bitmaps, write everything back, then clear the dirty bit: the image is clean."""
        if self.corrupt:
            return
        self.bitmaps.store()
        self.write_back()
        if self.dirty_marked:
            self.refcounts.write_dirty()
            self.file.flush()
            self._set_incompatible(self.header.incompatible_features & ~L.INCOMPAT_DIRTY)
            self.dirty_marked = False
            self.refcounts.lazy = False
        self.updating = False
