"""A qcow2 image as one layer of a chain: guest-to-host mapping, reads, block status.

Read side only.  The tables come from the image's metadata owner
(:class:`~qcow2.metadata.owner.ImageMetadata`); opening, repairing and
writing live in :mod:`qcow2.opening` and :mod:`qcow2.write`.  Several threads
may read at once (see :mod:`qcow2.chain` for the thread model).
"""

from __future__ import annotations

from .errors import CorruptImageError
from .format import layout as L
from .format.compression import decompress_cluster
from .format.l2 import (
    COMPRESSED,
    HAS_HOST_CLUSTER,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOCATED,
    UNALLOCATED_PLAIN,
    ZERO_ALLOCATED,
    ZERO_PLAIN,
)
from .hostfile import HostFile, zero_fill
from .metadata.owner import ImageMetadata
from .status import DATA, OFFSET_VALID, RECURSE, ZERO, Layer, Status

MAP_WINDOW_CLUSTERS = 1 << 18  # L2 entries one block-status window classifies at most

_STATUS_FLAGS = {
    NORMAL: DATA | OFFSET_VALID,
    COMPRESSED: DATA,
    ZERO_PLAIN: ZERO,
    ZERO_ALLOCATED: ZERO | OFFSET_VALID,
    UNALLOCATED_PLAIN: 0,
    UNALLOCATED_ALLOCATED: OFFSET_VALID,
}


class Qcow2Image:
    """One qcow2 file, with its backing layer and optional external data file."""

    supports_backing = True

    def __init__(
        self, filename: str, meta: ImageMetadata, data_file: HostFile | None, backing: Layer | None
    ) -> None:
        self.filename = filename
        self.meta = meta
        self.file = meta.file
        self.header = meta.header
        self.layout = meta.layout
        self.data_file = data_file
        self.data = data_file or meta.file  # where guest data clusters live
        self.backing = backing
        self.cluster_bits = meta.cluster_bits
        self.cluster_size = meta.cluster_size
        self.subcluster_size = meta.layout.subcluster_size
        self.size = meta.header.size // 512 * 512  # QEMU counts whole sectors
        self.map_window = MAP_WINDOW_CLUSTERS << self.cluster_bits
        self._compressed_cache: tuple[int, bytes] | None = None
        self._metadata_prealloc: bool | None = None
        self._l1 = meta.l1  # the owner changes this list in place, never replaces it
        self._l2_table = meta.l2_tables.get

    # -- mapping ---------------------------------------------------------------------

    def lookup(self, offset: int, length: int) -> tuple[int, int, int]:
        """Map guest ``[offset, offset+length)``: (type, bytes of that run, host offset).

        Mirrors qcow2_get_host_offset: the run has one subcluster type, contiguous
        host offsets, and stays inside one L2 table.  For compressed clusters the
        "host offset" is the raw L2 entry.
        """
        layout = self.layout
        cbits = layout.cluster_bits
        in_cluster = offset & (layout.cluster_size - 1)
        l2_index = (offset >> cbits) & (layout.entries - 1)
        needed = min(length + in_cluster, (layout.entries - l2_index) << cbits)
        l1 = self._l1
        l1_index = offset >> (cbits + layout.bits)
        l2_offset = l1[l1_index] & L.L1E_OFFSET_MASK if l1_index < len(l1) else 0
        if not l2_offset:
            return UNALLOCATED_PLAIN, needed - in_cluster, 0
        table = self._l2_table(l2_offset)
        entries, bitmaps = table.entries, table.bitmaps
        nb_clusters = -(-needed >> cbits)
        sc_index = (offset >> layout.subcluster_bits) & (layout.subclusters - 1)
        entry = entries[l2_index]
        bitmap = bitmaps[l2_index] if bitmaps else 0
        if not entry and not bitmap:
            # A run of empty entries: found through the table's index, not entry by entry.
            count = table.next_used(l2_index) - l2_index
            return UNALLOCATED_PLAIN, min(count << cbits, needed) - in_cluster, 0
        stype, n = layout.range_type(entry, bitmap, sc_index)
        host = 0
        if stype == INVALID:
            raise CorruptImageError(f"{self.filename}: invalid L2 entry at guest offset {offset:#x}")
        if not layout.zero_flag and stype in (ZERO_PLAIN, ZERO_ALLOCATED):
            raise CorruptImageError(f"{self.filename}: zero cluster entry in a v2 image")
        if stype == COMPRESSED:
            if layout.has_data_file:
                raise CorruptImageError(f"{self.filename}: compressed cluster in an image with a data file")
            avail = (sc_index + n) << layout.subcluster_bits
            return COMPRESSED, min(avail, needed) - in_cluster, entry
        if stype in HAS_HOST_CLUSTER:
            host_cluster = entry & L.L2E_OFFSET_MASK
            if host_cluster & (layout.cluster_size - 1):
                raise CorruptImageError(f"{self.filename}: data cluster offset {host_cluster:#x} unaligned")
            host = host_cluster + in_cluster
            if layout.has_data_file and host != offset:
                raise CorruptImageError(
                    f"{self.filename}: data file cluster {host_cluster:#x} does not match guest offset"
                )
        count = n
        full = sc_index + n == layout.subclusters
        expected = entry & L.L2E_OFFSET_MASK
        check_offset = stype in HAS_HOST_CLUSTER
        range_type = layout.range_type
        cs = layout.cluster_size
        i = 1
        while full and i < nb_clusters:
            entry = entries[l2_index + i]
            bitmap = bitmaps[l2_index + i] if bitmaps else 0
            t, n = range_type(entry, bitmap, 0)
            if t == INVALID:
                raise CorruptImageError(f"{self.filename}: invalid L2 entry in table {l2_offset:#x}")
            if t != stype:
                break
            if check_offset:
                expected += cs
                if entry & L.L2E_OFFSET_MASK != expected:
                    break
            count += n
            full = n == layout.subclusters
            i += 1
        avail = (sc_index + count) << layout.subcluster_bits
        return stype, min(avail, needed) - in_cluster, host

    # -- layer surface ----------------------------------------------------------------

    def driver_status(self, offset: int, length: int, want_zero: bool) -> Status:
        prealloc = self._metadata_prealloc
        if prealloc is None:
            prealloc = self.metadata_preallocated()  # first, as QEMU: it reads the refcount blocks
        stype, n, host = self.lookup(offset, length)
        flags = _STATUS_FLAGS[stype]
        if flags & DATA and flags & OFFSET_VALID and prealloc:
            flags |= RECURSE
        return Status(flags, n, host, self.data if flags & OFFSET_VALID else None)

    def status_runs(self, start: int, end: int):
        from .extentmap import qcow2_runs  # numpy: loaded with the first map, not at start-up

        return qcow2_runs(self, start, end)

    def metadata_preallocated(self) -> bool:
        """QEMU's heuristic: far more clusters in use than the host file really stores."""
        if self._metadata_prealloc is None:
            try:
                real_clusters = self.file.allocated_bytes() // self.cluster_size
            except OSError:  # a file with no allocated size (an NBD export): QEMU's answer is "no"
                self._metadata_prealloc = False
                return False
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-self.file.file_size // self.cluster_size)
            try:
                in_use = self.meta.refcounts.count_in_use(end_cluster, threshold)
            except OSError:  # refcounts that cannot be read: QEMU's answer is "not preallocated"
                in_use = 0
            self._metadata_prealloc = in_use >= threshold
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
            elif stype in (ZERO_PLAIN, ZERO_ALLOCATED) or self.backing is None:
                zero_fill(part)
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
            zero_fill(part[inside:])

    def _compressed(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        coffset, csize = self.layout.compressed_range(entry)
        raw = self.file.pread(coffset, csize)
        data = decompress_cluster(raw, self.cluster_size, self.header.compression_type)
        if data is None:
            raise CorruptImageError(
                f"{self.filename}: compressed cluster at {coffset:#x} does not decompress"
            )
        self._compressed_cache = (entry, data)
        return data

    def close(self) -> None:
        """Release the files (the writer, if any, has written everything back before)."""
        self.file.close()
        if self.data_file is not None:
            self.data_file.close()
