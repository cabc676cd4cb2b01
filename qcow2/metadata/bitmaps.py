"""Persistent dirty bitmaps, kept in step with the image as QEMU keeps them (qcow2-bitmap.c).

At open every bitmap not marked in use is read into memory; one marked in
use was not saved cleanly and stays *inconsistent*: kept as it is on disk,
never recorded into, never exported.  While the image is open for writing
the consistent ones carry the in-use flag on disk (so a crash leaves them
inconsistent, as QEMU's), every write, zero write and trim sets the bits of
the enabled ones, and a clean close stores them: new data clusters (only
where a bit is set), new tables, a new directory, the header extension,
and only then the old clusters freed.

Offline edits (``qcow2 bitmap``, as ``qemu-img bitmap``) change the list in
memory -- :meth:`PersistentBitmaps.create`, :meth:`~PersistentBitmaps.discard`,
and a bitmap's bits and ``enabled`` -- and reach the file at the same close,
removals first, as QEMU writes them.

The bits of a bitmap: bit ``i`` covers guest bytes ``i << granularity_bits``
up to the next granule, least significant bit of each byte first, in whole
64-bit words -- the on-disk layout, so a cluster of the table is a slice.
"""

from __future__ import annotations

import errno
import re
from typing import Protocol

from ..format import layout as L
from ..format.bitmaps import (
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    BitmapDirectoryError,
    BitmapEntry,
    bitmap_data_size,
    bitmap_table_size,
    build_bitmap_directory,
    decode_bitmap_table,
    load_bitmap_directory,
    table_entry_valid,
)
from ..format.header import Header
from ..hostfile import HostFile
from .refcounts import Refcounts


class BitmapOwner(Protocol):
    """What the bitmaps need of the image's metadata owner (which holds them)."""

    file: HostFile
    header: Header
    refcounts: Refcounts
    cluster_size: int
    cluster_bits: int
    corrupt: bool

    def set_header(self, **fields: int) -> None: ...
    def check_write(self, offset: int, length: int) -> None: ...
    def write_synced(self, offset: int, data: bytes) -> None: ...
    def rewrite_header(self, **changes: object) -> None: ...
    def metadata_moved(self) -> None: ...


MAX_BITMAP_MEMORY = 1 << 30  # bytes of bits held for one image, all bitmaps together
_TOO_BIG = f"bitmaps need more than {MAX_BITMAP_MEMORY >> 20} MiB of memory"
_NOT_CLEAR = re.compile(rb"[^\x00]")


def set_bits(bits: bytearray, first: int, end: int) -> None:
    """Set bits ``first .. end-1``."""
    if first >= end:
        return
    b0, b1 = first >> 3, (end - 1) >> 3
    if b0 == b1:
        bits[b0] |= ((1 << (end - first)) - 1) << (first & 7)
        return
    bits[b0] |= (0xFF << (first & 7)) & 0xFF
    if b1 > b0 + 1:
        bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
    bits[b1] |= (1 << (((end - 1) & 7) + 1)) - 1


class DirtyBitmap:
    """One persistent bitmap: its directory entry, and its bits when consistent."""

    __slots__ = ("entry", "table", "bits", "size", "enabled")

    def __init__(self, entry: BitmapEntry, table: tuple[int, ...], bits: bytearray | None, size: int) -> None:
        self.entry = entry  # as the directory on disk has it (table_offset 0: not stored yet)
        self.table = table  # the table on disk (what a store frees)
        self.bits = bits  # None: inconsistent (in use at open)
        self.size = size  # guest bytes covered
        self.enabled = entry.auto  # records writes; stored as the auto flag

    @property
    def name(self) -> str:
        return self.entry.name.decode("utf-8", "replace")

    @property
    def inconsistent(self) -> bool:
        return self.bits is None

    @property
    def on_disk(self) -> bool:
        return self.entry.table_offset != 0

    def mark(self, offset: int, length: int) -> None:
        """Guest bytes ``offset .. offset+length`` changed."""
        if length > 0 and self.bits is not None:
            g = self.entry.granularity_bits
            set_bits(self.bits, offset >> g, ((offset + length - 1) >> g) + 1)


class PersistentBitmaps:
    """The persistent bitmaps of one image; the image's metadata owner holds it and stores it."""

    def __init__(self, meta: BitmapOwner) -> None:
        self.meta = meta
        self.bitmaps: list[DirtyBitmap] = []
        self.error: str | None = None  # why QEMU would refuse to open the image, if it would
        self.recording: list[DirtyBitmap] = []  # enabled and consistent, while the image is written
        self.removed: list[DirtyBitmap] = []  # stored ones discarded since the open, in order
        self.writing = False

    # -- open -------------------------------------------------------------------------

    def load(self) -> None:
        """The directory, then each consistent bitmap's table and data (QEMU's order at open)."""
        meta, h = self.meta, self.meta.header
        if not h.bitmaps or not h.autoclear_features & L.AUTOCLEAR_BITMAPS or not h.bitmaps["nb_bitmaps"]:
            return
        cs = meta.cluster_size
        try:
            ext = h.bitmaps
            directory = meta.file.pread(ext["bitmap_directory_offset"], ext["bitmap_directory_size"])
            if not directory:
                raise BitmapDirectoryError("Requested bitmap directory size is zero")
            entries = load_bitmap_directory(directory, h.bitmaps["nb_bitmaps"], cs, h.size)
        except BitmapDirectoryError as e:
            self.error = str(e)
            return
        budget = MAX_BITMAP_MEMORY
        for entry in entries:
            if entry.in_use:
                self.bitmaps.append(DirtyBitmap(entry, (), None, h.size))
                continue
            name = entry.name.decode("utf-8", "replace")
            table = decode_bitmap_table(meta.file.pread(entry.table_offset, entry.table_size * 8))
            if not all(table_entry_valid(v, cs) for v in table):
                self.error = f"Could not read bitmap_table table from image for bitmap '{name}'"
                return
            size = bitmap_data_size(h.size, entry.granularity_bits)
            if -(-size // cs) != entry.table_size:
                self.error = f"Could not read bitmap '{name}' from image"
                return
            budget -= size
            if budget < 0:
                self.error = _TOO_BIG
                return
            self.bitmaps.append(DirtyBitmap(entry, table, self._read_bits(entry, table, size), h.size))

    def _read_bits(self, entry: BitmapEntry, table: tuple[int, ...], size: int) -> bytearray:
        meta = self.meta
        cs = meta.cluster_size
        bits = bytearray(size)
        granules = -(-meta.header.size >> entry.granularity_bits)
        for i, value in enumerate(table):
            offset = value & L.BME_OFFSET_MASK
            if offset:
                chunk = meta.file.pread(offset, cs)
                bits[i * cs : i * cs + len(chunk)] = chunk[: max(0, min(cs, size - i * cs))]
            elif value & L.BME_ALL_ONES:
                set_bits(bits, i * cs * 8, min(granules, (i + 1) * cs * 8))
        # Bits past the disk's end are zero (the spec's rule for the last cluster).
        if granules & 7:
            bits[granules >> 3] &= (1 << (granules & 7)) - 1
        bits[-(-granules // 8) :] = bytes(len(bits) - -(-granules // 8))
        return bits

    def find(self, name: str) -> DirtyBitmap | None:
        wanted = name.encode("utf-8")
        return next((b for b in self.bitmaps if b.entry.name == wanted), None)

    # -- offline edits (in memory until the store) --------------------------------------

    def create(self, name: str, granularity_bits: int, enabled: bool) -> DirtyBitmap:
        """A new bitmap, all clean, last in the directory (the caller checked QEMU's rules)."""
        size = self.meta.header.size
        held = sum(len(b.bits) for b in self.bitmaps if b.bits is not None)
        data = bitmap_data_size(size, granularity_bits)
        if held + data > MAX_BITMAP_MEMORY:
            raise OSError(errno.ENOMEM, _TOO_BIG)
        entry = BitmapEntry(0, 0, BME_FLAG_AUTO if enabled else 0, granularity_bits, name.encode("utf-8"))
        bitmap = DirtyBitmap(entry, (), bytearray(data), size)
        self.bitmaps.append(bitmap)
        return bitmap

    def discard(self, bitmap: DirtyBitmap) -> None:
        """Out of the list; a stored one leaves the file (and frees its clusters) at the store."""
        self.bitmaps.remove(bitmap)
        if bitmap.on_disk:
            self.removed.append(bitmap)

    def start_editing(self) -> None:
        """Offline edits are stored at close.  Unlike an open for guest writes nothing is
        marked in use first: no guest data changes, and until the new directory is
        written the old one stays valid, so a crash leaves the old bitmaps, consistent."""
        self.writing = True

    # -- writing ----------------------------------------------------------------------

    def start_writing(self) -> None:
        """Before the first change: consistent bitmaps are marked in use, in place, as QEMU does
        (autoclear bit off, directory rewritten, autoclear bit on; each step synced)."""
        self.writing = True
        consistent = [b for b in self.bitmaps if not b.inconsistent]
        self.recording = [b for b in consistent if b.enabled]
        if not consistent:
            return
        for b in consistent:
            b.entry = b.entry.with_(flags=b.entry.flags | BME_FLAG_IN_USE)
        meta, h = self.meta, self.meta.header
        offset = h.bitmaps["bitmap_directory_offset"]
        directory = build_bitmap_directory([b.entry for b in self.bitmaps])
        meta.set_header(autoclear_features=h.autoclear_features & ~L.AUTOCLEAR_BITMAPS)
        meta.file.write(offset, directory)
        meta.file.flush()
        meta.set_header(autoclear_features=h.autoclear_features | L.AUTOCLEAR_BITMAPS)

    def mark(self, offset: int, length: int) -> None:
        for b in self.recording:
            b.mark(offset, length)

    def resize(self, size: int) -> None:
        """A new disk size: bits past it go, new ones start clear (QEMU refuses with an
        inconsistent bitmap, which could not be stored at the new size)."""
        for b in self.bitmaps:
            if b.inconsistent:
                why = f"Bitmap '{b.name}' is inconsistent and cannot be used"
                raise OSError(errno.ENOTSUP, f"{why}; cannot resize the image")
        for b in self.bitmaps:
            g = b.entry.granularity_bits
            new = bytearray(bitmap_data_size(size, g))
            keep = min(size, b.size)
            granules = -(-keep >> g)
            new[: granules >> 3] = b.bits[: granules >> 3]
            if granules & 7:
                new[granules >> 3] = b.bits[granules >> 3] & ((1 << (granules & 7)) - 1)
            b.bits, b.size = new, size

    def store(self) -> None:
        """QEMU's qcow2_store_persistent_dirty_bitmaps, for every consistent bitmap.

        Data clusters and tables are written first, then the new directory
        (synced with the refcounts), then the header extension; the old
        tables, their data and the old directory are freed last, so a crash
        at any point leaves the old state or the new one, and at worst leaks.
        """
        meta = self.meta
        if not self.writing or meta.corrupt:
            return
        removed, self.removed = self.removed, []
        for i, gone in enumerate(removed):  # QEMU removes at once: directory, header, frees
            left = [b.entry for b in self.bitmaps if b.on_disk] + [b.entry for b in removed[i + 1 :]]
            self._write_directory(left)
            self._free_table(gone.entry, gone.table if not gone.inconsistent else None)
        stored = [b for b in self.bitmaps if not b.inconsistent]
        if not stored:
            self.writing = False
            return
        cs, cbits = meta.cluster_size, meta.cluster_bits
        refs = meta.refcounts
        drop: list[tuple[BitmapEntry, tuple[int, ...]]] = []  # old entries and tables
        size = meta.header.size
        for b in stored:
            tb_size = bitmap_table_size(size, b.entry.granularity_bits, cs)
            table = [0] * tb_size
            bits = b.bits
            for i in range(tb_size):
                chunk = bits[i * cs : (i + 1) * cs]
                if _NOT_CLEAR.search(chunk) is None:
                    continue
                offset = refs.alloc(1) << cbits
                meta.check_write(offset, cs)
                meta.file.write(offset, bytes(chunk) + bytes(cs - len(chunk)))
                table[i] = offset
            clusters = -(-tb_size * 8 // cs)
            tb_offset = refs.alloc(clusters) << cbits
            meta.check_write(tb_offset, tb_size * 8)
            meta.file.write(tb_offset, b"".join(L.U64.pack(v) for v in table))
            if b.on_disk:
                drop.append((b.entry, b.table))
            flags = BME_FLAG_AUTO if b.enabled else 0
            b.entry = b.entry.with_(table_offset=tb_offset, table_size=tb_size, flags=flags)
            b.table = tuple(table)
        self._write_directory([b.entry for b in self.bitmaps])
        for entry, table in drop:
            self._free_table(entry, table)
        self.writing = False
        self.recording = []

    def _write_directory(self, entries: list[BitmapEntry]) -> None:
        """QEMU's update_ext_header_and_dir: a new directory, synced, the header pointed at it
        (no directory and no extension when no bitmap is left), then the old directory freed."""
        meta, h = self.meta, self.meta.header
        cs, cbits = meta.cluster_size, meta.cluster_bits
        refs = meta.refcounts
        old_offset, old_size = 0, 0
        if h.bitmaps and h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            old_offset, old_size = h.bitmaps["bitmap_directory_offset"], h.bitmaps["bitmap_directory_size"]
        directory, offset = build_bitmap_directory(entries), 0
        if entries:
            offset = refs.alloc(-(-len(directory) // cs)) << cbits
            meta.check_write(offset, len(directory))
            meta.file.write(offset, directory)
            refs.write_dirty()
            meta.file.flush()
        self._set_extension(len(entries), len(directory), offset)
        if old_size:
            refs.free(old_offset >> cbits, -(-(old_offset % cs + old_size) // cs))
        meta.metadata_moved()

    def _set_extension(self, nb_bitmaps: int, directory_size: int, directory_offset: int) -> None:
        """Point the bitmaps header extension at a new directory (synced), as QEMU's
        update_ext_header_and_dir: the autoclear bit set with bitmaps, cleared without.

        An extension already there is rewritten in place; one that appears (the
        first bitmap) or goes (the last one removed) changes the shape of the
        header, which the owner then writes again whole, as qcow2_update_header does.
        """
        h = self.meta.header
        fields = {
            "nb_bitmaps": nb_bitmaps,
            "reserved": 0,
            "bitmap_directory_size": directory_size,
            "bitmap_directory_offset": directory_offset,
        }
        if nb_bitmaps and h.bitmaps and h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            self.meta.write_synced(h.bitmaps_extension_offset, L.BitmapsExtension.build(fields))
            h.bitmaps.update(fields)
            return
        bit = L.AUTOCLEAR_BITMAPS if nb_bitmaps else 0
        self.meta.rewrite_header(
            bitmaps=fields if nb_bitmaps else None,
            autoclear_features=(h.autoclear_features & ~L.AUTOCLEAR_BITMAPS) | bit,
        )

    def _free_table(self, entry: BitmapEntry, table: tuple[int, ...] | None) -> None:
        """QEMU's free_bitmap_clusters: the data clusters, then the table.  ``table`` None: read
        it from the file (an inconsistent bitmap's); one QEMU would not load is left (a leak)."""
        meta = self.meta
        cs, cbits = meta.cluster_size, meta.cluster_bits
        if table is None:
            table = decode_bitmap_table(meta.file.pread(entry.table_offset, entry.table_size * 8))
            if not all(table_entry_valid(v, cs) for v in table):
                return
        for value in table:
            if value & L.BME_OFFSET_MASK:
                meta.refcounts.free((value & L.BME_OFFSET_MASK) >> cbits, 1, True)
        meta.refcounts.free(entry.table_offset >> cbits, -(-entry.table_size * 8 // cs))
