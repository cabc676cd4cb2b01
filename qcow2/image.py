"""A qcow2 image as one layer of a chain: mapping, reads and block status."""

from __future__ import annotations

import operator
import os
import struct
import sys
from array import array
from bisect import bisect_left
from collections import OrderedDict
from enum import IntEnum
from itertools import compress

from . import layout as L
from .compression import decompress_cluster
from .errors import CorruptImageError, ImageError
from .header import Header, parse_header
from .hostfile import HostFile
from .refcount import Refcounts
from .status import DATA, OFFSET_VALID, RECURSE, ZERO, Status

MAX_CHAIN_DEPTH = 64
MAX_FIDELITY_READ = 64 << 20  # bytes of snapshot/bitmap metadata read at open (QEMU's table limit)
_LITTLE_ENDIAN = sys.byteorder == "little"
L2_CACHE_BYTES = 32 << 20
_ZEROS = bytes(1 << 20)


class SubclusterType(IntEnum):
    """QEMU's QCow2SubclusterType (a standard cluster is one subcluster)."""

    NORMAL = 0
    COMPRESSED = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    UNALLOCATED_PLAIN = 4
    UNALLOCATED_ALLOC = 5
    INVALID = 6


NORMAL, COMPRESSED, ZERO_PLAIN, ZERO_ALLOC, UNALLOC_PLAIN, UNALLOC_ALLOC, INVALID = SubclusterType
_HAS_HOST = (NORMAL, ZERO_ALLOC, UNALLOC_ALLOC)
_STATUS_FLAGS = {
    NORMAL: DATA | OFFSET_VALID,
    COMPRESSED: DATA,
    ZERO_PLAIN: ZERO,
    ZERO_ALLOC: ZERO | OFFSET_VALID,
    UNALLOC_PLAIN: 0,
    UNALLOC_ALLOC: OFFSET_VALID,
}


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

    def pack(self, first: int, count: int) -> bytes:
        """On-disk bytes of entries ``first .. first+count-1``."""
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


def _ctz32(v: int) -> int:
    return 32 if v == 0 else (v & -v).bit_length() - 1


def _cto32(v: int) -> int:
    return _ctz32(~v & 0xFFFFFFFF)


class Qcow2Image:
    """One qcow2 file, with its backing layer and optional external data file."""

    supports_backing = True

    def __init__(
        self,
        filename: str,
        file: HostFile,
        header: Header,
        backing,
        data_file: HostFile | None,
    ) -> None:
        self.filename = filename
        self.file = file
        self.header = header
        self.backing = backing
        self.data_file = data_file
        self.data = data_file or file
        h = header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.extended_l2 = h.extended_l2
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_entries = self.cluster_size // self.l2_entry_size
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.subclusters = 32 if self.extended_l2 else 1
        self.subcluster_bits = self.cluster_bits - (5 if self.extended_l2 else 0)
        self.subcluster_size = 1 << self.subcluster_bits
        self.size = h.size // 512 * 512  # QEMU counts whole sectors
        self.has_data_file = h.has_data_file
        raw = file.pread(h.l1_table_offset, h.l1_size * 8)
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        self.refs = self.load_refcounts()
        for pos in h.extension_offsets:  # QEMU's second pass over the extensions
            file.pread(pos, 8)
        if h.backing_file_offset:
            file.pread(h.backing_file_offset, h.backing_file_size)
        self._read_snapshot_table()
        self._read_bitmaps()
        self._l2_cache: OrderedDict[int, L2Table] = OrderedDict()
        self._l2_cache_max = max(16, L2_CACHE_BYTES >> self.cluster_bits)
        self._csize_shift = 62 - (self.cluster_bits - 8)
        self._csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._compressed_cache: tuple[int, bytes] | None = None
        self._metadata_prealloc: bool | None = None
        self.writer = None  # a Qcow2Writer when opened read-write
        self.pinned_l2: dict[int, L2Table] = {}  # tables with changes not yet on disk

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls, filename: str, writable: bool = False, _depth: int = 0, file: HostFile | None = None
    ) -> Qcow2Image:
        """Open an image and its backing chain (backing files always read-only).

        Reads happen in QEMU's order and sizes (header page, L1, refcount
        table, snapshots, bitmaps): the kernel's readahead then caches the
        same pages QEMU's would, and block status over unwritten extents
        (which SEEK_HOLE reports by page-cache state) comes out the same.
        """
        if _depth > MAX_CHAIN_DEPTH:
            raise ImageError(f"{filename}: backing chain deeper than {MAX_CHAIN_DEPTH} (a loop?)")
        if file is None:
            file = open_host_file(filename, writable)
        data_file = backing = None
        try:
            header = parse_header(_read_cluster0(file), filename)
            if writable and header.corrupt:
                raise ImageError(f"{filename}: image is corrupt; cannot be opened read/write")
            image = cls(filename, file, header, None, None)
            data_file = image.data_file = cls._open_data_file(filename, header, writable)
            if data_file is not None:
                image.data = data_file
            backing = image.backing = cls._open_backing(filename, header, _depth)
            if writable:
                from .write import Qcow2Writer

                image.writer = Qcow2Writer(image)
        except BaseException:
            for layer in (file, data_file, backing):
                if layer is not None:
                    layer.close()
            raise
        return image

    @staticmethod
    def _open_data_file(filename: str, h: Header, writable: bool) -> HostFile | None:
        if not h.has_data_file:
            return None
        if not h.data_file:
            raise ImageError(f"{filename}: the image needs an external data file but names none")
        path = os.path.join(os.path.dirname(filename), h.data_file)
        try:
            return HostFile(path, writable)
        except OSError as e:
            raise ImageError(f"{filename}: cannot open data file {path}: {e.strerror}") from None

    @staticmethod
    def _open_backing(filename: str, h: Header, depth: int):
        if not h.backing_file:
            return None
        name = h.backing_file
        if ":" in name.split("/", 1)[0] and not os.path.exists(os.path.join(os.path.dirname(filename), name)):
            raise ImageError(f"{filename}: backing file {name!r} uses a protocol we do not support")
        path = os.path.join(os.path.dirname(filename), name)
        if not os.path.exists(path):
            raise ImageError(f"{filename}: backing file {path} does not exist")
        fmt = h.backing_format
        file = open_host_file(path, False)
        if fmt is None:
            fmt = "qcow2" if file.pread(0, 4) == L.MAGIC else "raw"
        if fmt == "raw":
            return file
        if fmt == "qcow2":
            return Qcow2Image.open(path, _depth=depth + 1, file=file)
        file.close()
        raise ImageError(f"{filename}: backing file format {fmt!r} is not supported")

    # -- tables ---------------------------------------------------------------------

    def _l2_table(self, l2_offset: int) -> L2Table:
        cache = self._l2_cache
        table = cache.get(l2_offset)
        if table is not None:
            cache.move_to_end(l2_offset)
            return table
        table = self.pinned_l2.get(l2_offset)
        if table is not None:
            return table
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImageError(f"{self.filename}: L2 table offset {l2_offset:#x} unaligned")
        table = L2Table(self.file.pread(l2_offset, self.cluster_size), self.extended_l2)
        cache[l2_offset] = table
        if len(cache) > self._l2_cache_max:
            cache.popitem(last=False)
        return table

    def _cluster_type(self, entry: int) -> int:
        """QEMU's qcow2_get_cluster_type, in subcluster terms for standard L2."""
        if entry & L.QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & L.QCOW_OFLAG_ZERO and not self.extended_l2:
            return ZERO_ALLOC if entry & L.L2E_OFFSET_MASK else ZERO_PLAIN
        if not entry & L.L2E_OFFSET_MASK:
            if self.has_data_file and entry & L.QCOW_OFLAG_COPIED:
                return NORMAL
            return UNALLOC_PLAIN
        return NORMAL

    def _range_type(self, entry: int, bitmap: int, sc: int) -> tuple[int, int]:
        """Type of subcluster ``sc`` and how many subclusters from it share it."""
        ctype = self._cluster_type(entry)
        if not self.extended_l2 or ctype == COMPRESSED:
            return ctype, self.subclusters - sc
        low = (1 << sc) - 1
        if ctype == NORMAL:
            if (bitmap >> 32) & bitmap:
                return INVALID, 0
            if bitmap >> (32 + sc) & 1:
                return ZERO_ALLOC, _cto32((bitmap >> 32) | low) - sc
            if bitmap >> sc & 1:
                return NORMAL, _cto32((bitmap & 0xFFFFFFFF) | low) - sc
            return UNALLOC_ALLOC, _ctz32(((bitmap >> 32) | bitmap) & 0xFFFFFFFF & ~low) - sc
        if bitmap & 0xFFFFFFFF:
            return INVALID, 0
        if bitmap >> (32 + sc) & 1:
            return ZERO_PLAIN, _cto32((bitmap >> 32) | low) - sc
        return UNALLOC_PLAIN, _ctz32((bitmap >> 32) & ~low & 0xFFFFFFFF) - sc

    def lookup(self, offset: int, length: int) -> tuple[int, int, int]:
        """Map guest ``[offset, offset+length)``: (type, bytes of that run, host offset).

        Mirrors qcow2_get_host_offset: the run has one subcluster type, contiguous
        host offsets, and stays inside one L2 table.  For compressed clusters the
        "host offset" is the raw L2 entry.
        """
        cbits = self.cluster_bits
        in_cluster = offset & (self.cluster_size - 1)
        l2_index = (offset >> cbits) & (self.l2_entries - 1)
        needed = min(length + in_cluster, (self.l2_entries - l2_index) << cbits)
        l1_index = offset >> (cbits + self.l2_bits)
        l2_offset = self.l1[l1_index] & L.L1E_OFFSET_MASK if l1_index < len(self.l1) else 0
        if not l2_offset:
            return UNALLOC_PLAIN, needed - in_cluster, 0
        table = self._l2_table(l2_offset)
        entries, bitmaps = table.entries, table.bitmaps
        nb_clusters = -(-needed >> cbits)
        sc_index = (offset >> self.subcluster_bits) & (self.subclusters - 1)
        entry = entries[l2_index]
        bitmap = bitmaps[l2_index] if bitmaps else 0
        if not entry and not bitmap:
            # A run of empty entries: found through the table's index, not entry by entry.
            count = table.next_used(l2_index) - l2_index
            return UNALLOC_PLAIN, min(count << cbits, needed) - in_cluster, 0
        stype, n = self._range_type(entry, bitmap, sc_index)
        host = 0
        if stype == INVALID:
            raise CorruptImageError(f"{self.filename}: invalid L2 entry at guest offset {offset:#x}")
        if self.header.version < 3 and stype in (ZERO_PLAIN, ZERO_ALLOC):
            raise CorruptImageError(f"{self.filename}: zero cluster entry in a v2 image")
        if stype == COMPRESSED:
            if self.has_data_file:
                raise CorruptImageError(f"{self.filename}: compressed cluster in an image with a data file")
            avail = (sc_index + n) << self.subcluster_bits
            return COMPRESSED, min(avail, needed) - in_cluster, entry
        if stype in _HAS_HOST:
            host_cluster = entry & L.L2E_OFFSET_MASK
            if host_cluster & (self.cluster_size - 1):
                raise CorruptImageError(f"{self.filename}: data cluster offset {host_cluster:#x} unaligned")
            host = host_cluster + in_cluster
            if self.has_data_file and host != offset:
                raise CorruptImageError(
                    f"{self.filename}: data file cluster {host_cluster:#x} does not match guest offset"
                )
        count = n
        full = sc_index + n == self.subclusters
        expected = entry & L.L2E_OFFSET_MASK
        check_offset = stype in _HAS_HOST
        i = 1
        while full and i < nb_clusters:
            entry = entries[l2_index + i]
            bitmap = bitmaps[l2_index + i] if bitmaps else 0
            t, n = self._range_type(entry, bitmap, 0)
            if t == INVALID:
                raise CorruptImageError(f"{self.filename}: invalid L2 entry in table {l2_offset:#x}")
            if t != stype:
                break
            if check_offset:
                expected += self.cluster_size
                if entry & L.L2E_OFFSET_MASK != expected:
                    break
            count += n
            full = n == self.subclusters
            i += 1
        avail = (sc_index + count) << self.subcluster_bits
        return stype, min(avail, needed) - in_cluster, host

    # -- layer surface ----------------------------------------------------------------

    def driver_status(self, offset: int, length: int, want_zero: bool) -> Status:
        prealloc = self.metadata_preallocated()  # first, as QEMU: it reads the refcount blocks
        stype, n, host = self.lookup(offset, length)
        flags = _STATUS_FLAGS[stype]
        if flags & DATA and flags & OFFSET_VALID and prealloc:
            flags |= RECURSE
        return Status(flags, n, host, self.data if flags & OFFSET_VALID else None)

    def load_refcounts(self) -> Refcounts:
        h = self.header
        return Refcounts(
            self.file, h.cluster_bits, h.refcount_order, h.refcount_table_offset, h.refcount_table_clusters
        )

    def _read_snapshot_table(self) -> None:
        """Walk the snapshot table as QEMU does at open (contents unused while reading)."""
        h = self.header
        offset = h.snapshots_offset
        for _ in range(min(h.nb_snapshots, 65536)):
            if offset - h.snapshots_offset > MAX_FIDELITY_READ:
                return
            offset = (offset + 7) & ~7
            fixed = self.file.pread(offset, 40)
            extra, id_len, name_len = (
                int.from_bytes(fixed[36:40], "big"),
                int.from_bytes(fixed[12:14], "big"),
                int.from_bytes(fixed[14:16], "big"),
            )
            if extra > 1024:
                return
            self.file.pread(offset + 40, extra + id_len + name_len)
            offset += 40 + extra + id_len + name_len

    def _read_bitmaps(self) -> None:
        """Read the bitmap directory and tables, as QEMU loads persistent bitmaps at open."""
        h = self.header
        if not h.bitmaps or not h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            return
        size = h.bitmaps["bitmap_directory_size"]
        if not 0 < size <= 64 << 20:
            return
        directory = self.file.pread(h.bitmaps["bitmap_directory_offset"], size)
        pos = budget = 0
        while pos + 24 <= len(directory) and budget <= MAX_FIDELITY_READ:
            table_offset = int.from_bytes(directory[pos : pos + 8], "big")
            table_size = int.from_bytes(directory[pos + 8 : pos + 12], "big")
            name_size = int.from_bytes(directory[pos + 18 : pos + 20], "big")
            extra = int.from_bytes(directory[pos + 20 : pos + 24], "big")
            if table_offset and table_size <= 1 << 16:
                table = struct.unpack(f">{table_size}Q", self.file.pread(table_offset, table_size * 8))
                for entry in table:
                    if entry & L.L2E_OFFSET_MASK and budget <= MAX_FIDELITY_READ:
                        self.file.pread(entry & L.L2E_OFFSET_MASK, self.cluster_size)
                        budget += self.cluster_size
            pos += (24 + extra + name_size + 7) & ~7

    def metadata_preallocated(self) -> bool:
        """QEMU's heuristic: far more clusters in use than the host file really stores."""
        if self._metadata_prealloc is None:
            real_clusters = self.file.allocated_bytes() // self.cluster_size
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-self.file.file_size // self.cluster_size)
            self._metadata_prealloc = self.refs.count_in_use(end_cluster, threshold) >= threshold
        return self._metadata_prealloc

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Guest bytes at ``offset``; unallocated ranges come from the backing layer."""
        pos, end = 0, len(buf)
        while pos < end:
            stype, n, host = self.lookup(offset + pos, end - pos)
            part = buf[pos : pos + n]
            if stype == NORMAL:
                self.data.readinto(host, part)
            elif stype == COMPRESSED:
                cluster = self._compressed(host)
                start = (offset + pos) & (self.cluster_size - 1)
                part[:] = cluster[start : start + n]
            elif stype in (ZERO_PLAIN, ZERO_ALLOC) or self.backing is None:
                _zero(part)
            else:
                self._read_backing(offset + pos, part)
            pos += n

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes; one host read straight into a new buffer when a single run covers them."""
        stype, n, host = self.lookup(offset, length)
        if stype == NORMAL and n == length:
            return self.data.pread(host, length)
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return buf

    def _read_backing(self, offset: int, part: memoryview) -> None:
        backing_size = self.backing.size
        inside = max(0, min(len(part), backing_size - offset))
        if inside:
            self.backing.readinto(offset, part[:inside])
        if inside < len(part):
            _zero(part[inside:])

    def _compressed(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        coffset = entry & self._coffset_mask
        nb_sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        csize = nb_sectors * 512 - (coffset & 511)
        raw = self.file.pread(coffset, csize)
        data = decompress_cluster(raw, self.cluster_size, self.header.compression_type)
        if data is None:
            raise CorruptImageError(
                f"{self.filename}: compressed cluster at {coffset:#x} does not decompress"
            )
        self._compressed_cache = (entry, data)
        return data

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.file.close()
        if self.data_file is not None:
            self.data_file.close()


def _read_cluster0(file: HostFile) -> bytes:
    """The header page; the rest of cluster 0 only when extensions or the backing name reach it."""
    first = file.pread(0, 4096)
    cluster_bits = int.from_bytes(first[20:24], "big")
    if first[:4] != L.MAGIC or not 9 <= cluster_bits <= 21:
        return first
    csize = 1 << cluster_bits
    if csize <= 4096:
        return first[:csize]
    version = int.from_bytes(first[4:8], "big")
    backing_end = int.from_bytes(first[8:16], "big") + int.from_bytes(first[16:20], "big")
    pos = int.from_bytes(first[100:104], "big") if version >= 3 else L.V2_HEADER_LENGTH
    while pos + 8 <= 4096:
        ext_type = int.from_bytes(first[pos : pos + 4], "big")
        if ext_type == L.EXT_END:
            break
        pos += 8 + ((int.from_bytes(first[pos + 4 : pos + 8], "big") + 7) & ~7)
    if pos + 8 > 4096 or backing_end > 4096:
        return file.pread(0, csize)
    return first


def open_host_file(filename: str, writable: bool = False) -> HostFile:
    try:
        return HostFile(filename, writable)
    except OSError as e:
        raise ImageError(f"{filename}: cannot open: {e.strerror}") from None


def _zero(part: memoryview) -> None:
    n = len(part)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        part[pos : pos + k] = _ZEROS[:k]
        pos += k
