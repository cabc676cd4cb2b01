"""The layout of a new image, computed the way ``qemu-img create`` arrives at it.

QEMU does not compute a layout up front: it writes a header plus a one-cluster
refcount table, reopens the image and lets its ordinary allocator place the
L1 table, L2 tables, data clusters and any refcount blocks it needs one
allocation at a time (``qcow2_co_create`` -> ``qcow2_co_truncate``).  To get
the very same bytes (and so images that any qemu tool compares equal to its
own), :class:`_Allocator` replays that sequence against an in-memory model of
the refcount structures: first-fit search from a moving free index,
self-describing refcount blocks that restart the search, refcount-table
growth into a new area past the covered range, and the old table freed
afterwards.  The result is a :class:`Plan`: the metadata writes and how the
files are sized.  (This replay stays apart from :mod:`qcow2.metadata.refcounts`
on purpose: it must match QEMU's creation sequence byte for byte, which the
allocator of a live image does not promise.)

Sizes everywhere are bytes; "clusters" are host clusters of the new image.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from ..format import layout as L
from ..format.header import HeaderTooLarge, build_header
from ..format.refblock import encode_refcounts
from .options import COMPRESSION_TYPES, EXTL2_SUBCLUSTERS, CreateError, CreateOptions, ImageTooLarge, validate

# QEMU's limits, with its own (byte vs. entry) comparisons kept as they are.
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE = 8 << 20  # QCOW_MAX_REFTABLE_SIZE, compared against entry counts
MAX_CLUSTER_OFFSET = (1 << 56) - 1
INT_MAX = (1 << 31) - 1
REQUEST_MAX_BYTES = (INT_MAX >> 9) << 9  # BDRV_REQUEST_MAX_BYTES


class _Retry(Exception):
    """QEMU's -EAGAIN: a refcount block was just placed; restart the cluster search."""


@dataclass
class _Write:
    """One write to the new file; ``data`` is called when the file is written."""

    offset: int
    length: int
    data: Callable[[], bytes]


@dataclass
class Plan:
    writes: list[_Write] = field(default_factory=list)
    file_length: int = 0
    # how the external data file is sized: (length, mode); mode "cow" = zeros written at the tail
    data_file: tuple[int, str] = (0, "off")
    data_cow: tuple[int, int] | None = None
    # (start, end, mode): the file grows here with falloc/full preallocation
    prealloc: list[tuple[int, int, str]] = field(default_factory=list)


class _Allocator:
    """QEMU's qcow2 cluster allocator and refcount code, replayed in memory.

    Refcounts never exceed 1 during creation, so each refcount block is a
    ``bytearray`` of per-cluster counts keyed by its host offset, and encoded
    at the image's refcount width only when written.
    """

    def __init__(self, cluster_bits: int, refcount_order: int, extended_l2: bool, data_file: bool) -> None:
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.refcount_bits = 1 << refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order
        self.rb_size = 1 << self.rb_bits
        self.l2_entry = 16 if extended_l2 else 8
        self.l2_entries = self.cs // self.l2_entry
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.data_file = data_file
        self.plan = Plan()
        # The state qcow2_co_create leaves on disk before reopening the image:
        # header at 0, reftable at cluster 1 pointing at an empty block at 2.
        self.reftable: list[int] = [0] * (self.cs // 8)
        self.reftable[0] = 2 * self.cs
        self.reftable_offset = self.cs
        self.blocks: dict[int, bytearray] = {2 * self.cs: bytearray(self.rb_size)}
        self.free_index = 0
        self.max_used = -1  # highest cluster that may have a nonzero refcount
        self.l1: array = array("Q")
        self.l1_offset = 0
        self.l2: dict[int, array] = {}
        self._write_table(self.reftable, self.cs)
        self._write_block(2 * self.cs)

    # -- writes ---------------------------------------------------------------

    def _write(self, offset: int, length: int, data: Callable[[], bytes]) -> None:
        self.plan.writes.append(_Write(offset, length, data))
        self.plan.file_length = max(self.plan.file_length, offset + length)

    def _write_table(self, table: list[int], offset: int) -> None:
        self._write(offset, len(table) * 8, lambda: struct.pack(f">{len(table)}Q", *table))

    def _write_block(self, offset: int) -> None:
        block = self.blocks[offset]
        self._write(offset, self.cs, lambda: encode_refcounts(block, self.refcount_bits))

    def _write_l2(self, offset: int) -> None:
        table = self.l2[offset]

        def data() -> bytes:
            out = array("Q", table)
            if struct.pack("=H", 1) != struct.pack(">H", 1):
                out.byteswap()
            return out.tobytes()

        self._write(offset, self.cs, data)

    # -- refcounts (qcow2-refcount.c) ------------------------------------------

    def get_refcount(self, index: int) -> int:
        t = index >> self.rb_bits
        if t >= len(self.reftable) or not self.reftable[t]:
            return 0
        return self.blocks[self.reftable[t]][index & (self.rb_size - 1)]

    def _set(self, block: bytearray, index: int, value: int) -> None:
        block[index & (self.rb_size - 1)] = value
        if value and index > self.max_used:
            self.max_used = index

    def free_run(self, index: int, limit: int) -> int:
        """How many of the ``limit`` clusters from ``index`` on are free (stops at a used one)."""
        count = 0
        mask = self.rb_size - 1
        while count < limit:
            cur = index + count
            if cur > self.max_used:
                return limit
            t = cur >> self.rb_bits
            end = min(index + limit, (t + 1) << self.rb_bits)
            offset = self.reftable[t] if t < len(self.reftable) else 0
            if offset:
                lo = cur & mask
                seg = self.blocks[offset][lo : lo + end - cur]
                zeros = len(seg) - len(seg.lstrip(b"\0"))
                if zeros < len(seg):
                    return count + zeros
            count += end - cur
        return limit

    def alloc_noref(self, nb: int) -> int:
        """First fit from the free index; a used cluster restarts the count after it.

        The free index ends up past the chosen run (and past every used
        cluster seen), exactly as QEMU's one-cluster-at-a-time scan leaves it.
        """
        while True:
            index = self.free_index
            run = self.free_run(index, nb)
            if run == nb:
                self.free_index = index + nb
                break
            self.free_index = index + run + 1
        if self.free_index - 1 > (MAX_CLUSTER_OFFSET >> self.cb):
            raise ImageTooLarge()
        return (self.free_index - nb) << self.cb

    def update_refcount(self, offset: int, length: int, decrease: bool = False) -> None:
        """Add or remove one reference per cluster, allocating refcount blocks on the way.

        A new refcount block raises :class:`_Retry` after the clusters
        already counted in this call are given back, and the free index is
        moved back so the caller's search sees the same clusters first.
        """
        if length <= 0:
            return
        start = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        mask = self.rb_size - 1
        index = start
        try:
            while index <= last:
                try:
                    block = self.alloc_refcount_block(index)
                except _Retry:
                    self.free_index = min(self.free_index, start)
                    raise
                stop = min(last + 1, (index | mask) + 1)
                lo, hi = index & mask, (stop - 1 & mask) + 1
                if not decrease and block.count(0, lo, hi) == hi - lo:
                    block[lo:hi] = b"\x01" * (hi - lo)  # the common case: fresh clusters
                    self.max_used = max(self.max_used, stop - 1)
                elif decrease and block.count(1, lo, hi) == hi - lo:
                    block[lo:hi] = bytes(hi - lo)  # giving back what a retry counted
                    self.free_index = min(self.free_index, index)
                else:
                    for i in range(index, stop):
                        value = block[i & mask] + (-1 if decrease else 1)
                        if value == 0 and i < self.free_index:
                            self.free_index = i
                        self._set(block, i, value)
                index = stop
        except _Retry:
            self.update_refcount(offset, (index - start) << self.cb, not decrease)
            raise

    def alloc_refcount_block(self, index: int) -> bytearray:
        t = index >> self.rb_bits
        if t < len(self.reftable) and self.reftable[t]:
            return self.blocks[self.reftable[t]]
        new_block = self.alloc_noref(1)
        if new_block >> (self.cb + self.rb_bits) == t:
            block = bytearray(self.rb_size)
            self.blocks[new_block] = block
            self._set(block, new_block >> self.cb, 1)  # describes itself
        else:
            self.update_refcount(new_block, self.cs)
            self.blocks[new_block] = bytearray(self.rb_size)
        self._write_block(new_block)
        if t < len(self.reftable):
            self.reftable[t] = new_block  # hooked up in place
            raise _Retry
        used = -(-max(index + 1, (new_block >> self.cb) + 1) // self.rb_size)
        self.refcount_area(used * self.rb_size * self.cs, 0, False, t, new_block)
        raise _Retry

    def refcount_area(
        self, start: int, additional: int, exact: bool, new_index: int = 0, new_offset: int = 0
    ) -> int:
        """A new reftable plus the refblocks covering itself, placed at ``start``."""
        cs = self.cs
        total = refcount_metadata_blocks(start // cs + additional, cs, self.refcount_bits, not exact)
        if total > MAX_REFTABLE:
            raise ImageTooLarge()
        area_index = (start // cs) // self.rb_size
        table_size = total if exact else total + -(-total // 2)
        per_cluster = cs // 8
        table_size = -(-table_size // per_cluster) * per_cluster
        table_clusters = table_size * 8 // cs
        if table_size > MAX_REFTABLE:
            raise ImageTooLarge()
        last_used = max((i for i, e in enumerate(self.reftable) if e), default=0)
        new_table = [0] * table_size
        keep = last_used + 1 if table_size > last_used else table_size
        new_table[:keep] = self.reftable[:keep]
        if new_offset:
            new_table[new_index] = new_offset
        missing = sum(1 for i in range(area_index, total) if not new_table[i])
        table_offset = start + missing * cs
        end = table_offset + table_clusters * cs
        block_offset = start
        for i in range(area_index, total):
            if new_table[i]:
                block = self.blocks[new_table[i]]
            else:
                block = bytearray(self.rb_size)
                self.blocks[block_offset] = block
                new_table[i] = block_offset
                block_offset += cs
            first = i * self.rb_size * cs
            if first < end:
                j = (start - first) // cs if first < start else 0
                stop = min((end - first) // cs, self.rb_size)
                base = i * self.rb_size
                for k in range(j, stop):
                    self._set(block, base + k, 1)
            self._write_block(new_table[i])
        old_offset, old_size = self.reftable_offset, len(self.reftable)
        self.reftable = new_table
        self.reftable_offset = table_offset
        self._write_table(new_table, table_offset)
        self.free_clusters(old_offset, old_size * 8)
        return end

    def free_clusters(self, offset: int, length: int) -> None:
        self.update_refcount(offset, length, decrease=True)

    def alloc_clusters(self, length: int) -> int:
        nb = -(-length // self.cs)
        while True:
            offset = self.alloc_noref(nb)
            try:
                self.update_refcount(offset, nb * self.cs)
                return offset
            except _Retry:
                continue

    def alloc_clusters_at(self, offset: int, nb: int) -> int:
        """Claim up to ``nb`` clusters exactly at ``offset``; returns how many were free."""
        if nb == 0:
            return 0
        while True:
            free = self.free_run(offset >> self.cb, nb)
            try:
                self.update_refcount(offset, free << self.cb)
                return free
            except _Retry:
                continue

    def last_cluster(self, file_size: int) -> int:
        for i in range(-(-file_size // self.cs) - 1, -1, -1):
            if self.get_refcount(i):
                return i
        return -1

    # -- L1/L2 (qcow2-cluster.c) -----------------------------------------------

    def grow_l1(self, entries: int) -> None:
        if entries <= len(self.l1):
            return
        if entries > INT_MAX // 8 or entries > MAX_L1_BYTES // 8:
            raise ImageTooLarge()
        self.l1_offset = self.alloc_clusters(entries * 8)
        self.l1 = array("Q", bytes(entries * 8))
        l1 = self.l1

        def data() -> bytes:
            out = array("Q", l1)
            if struct.pack("=H", 1) != struct.pack(">H", 1):
                out.byteswap()
            return out.tobytes()

        self._write(self.l1_offset, entries * 8, data)

    def cluster_table(self, guest: int) -> array:
        """The L2 table of ``guest``, allocated (zeroed) if its L1 entry is empty."""
        l1_index = guest >> (self.cb + self.l2_bits)
        entry = self.l1[l1_index]
        if not entry & L.QCOW_OFLAG_COPIED:
            offset = self.alloc_clusters(self.cs)
            self.l2[offset] = array("Q", bytes(self.cs))
            self._write_l2(offset)
            self.l1[l1_index] = offset | L.QCOW_OFLAG_COPIED
            return self.l2[offset]
        return self.l2[entry & L.L1E_OFFSET_MASK]

    def link_l2(self, guest: int, host: int, nb: int) -> None:
        """Point ``nb`` clusters at ``host`` (COPIED; extended bitmaps stay 0 = unallocated)."""
        table = self.cluster_table(guest)
        index = (guest >> self.cb) & (self.l2_entries - 1)
        step = self.l2_entry // 8
        for i in range(nb):
            table[(index + i) * step] = (host + (i << self.cb)) | L.QCOW_OFLAG_COPIED

    def _alloc_data(self, guest: int, host: int | None, nb: int) -> tuple[int, int]:
        if self.data_file:
            return guest & ~(self.cs - 1), nb
        if host is None:
            return self.alloc_clusters(nb * self.cs), nb
        return host, self.alloc_clusters_at(host, nb)

    def alloc_host_offset(self, offset: int, nbytes: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """qcow2_alloc_host_offset for a fresh range: returns (bytes, host offset, allocations)."""
        cs = self.cs
        start, remaining, cur = offset, nbytes, 0
        cluster_offset: int | None = None
        host: int | None = None
        metas: list[tuple[int, int, int]] = []
        while True:
            if host is None and cluster_offset is not None:
                host = cluster_offset
            start += cur
            remaining -= cur
            if cluster_offset is not None:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            self.cluster_table(start)  # handle_copied looks the L2 table up (allocating it)
            in_cluster = start & (cs - 1)
            nb = -(-(in_cluster + cur) // cs)
            nb = min(nb, self.l2_entries - ((start >> self.cb) & (self.l2_entries - 1)))
            nb = min(nb, REQUEST_MAX_BYTES >> self.cb)
            want = None if cluster_offset is None else cluster_offset & ~(cs - 1)
            alloc, nb = self._alloc_data(start, want, nb)
            if nb == 0:
                break
            metas.append((start & ~(cs - 1), alloc, nb))
            cluster_offset = alloc + in_cluster
            cur = min(cur, nb * cs - in_cluster)
        assert host is not None
        return nbytes - remaining, host, metas

    # -- qcow2_co_truncate from size 0 -----------------------------------------

    def preallocate_metadata(self, size: int) -> int:
        """preallocate_co: L2 tables and data clusters in order; returns the host end of the last byte."""
        offset, left = 0, size
        host = cur = 0
        chunk = INT_MAX & ~(self.cs - 1)
        while left:
            cur = min(left, chunk)
            cur, host, metas = self.alloc_host_offset(offset, cur)
            for guest, alloc, nb in metas:
                self.link_l2(guest, alloc, nb)
            left -= cur
            offset += cur
        return host + cur

    def preallocate_data_area(self, size: int, mode: str) -> None:
        """The falloc/full path: new refcount area, one contiguous data run, then L2 tables."""
        cs = self.cs
        old = self.plan.file_length
        last = self.last_cluster(old)
        old = (last + 1) * cs if last >= 0 else -(-old // cs) * cs
        nb_data = -(-size // cs)
        nb_l2 = -(-nb_data // self.l2_entries) + 1
        start = self.refcount_area(old, nb_data + nb_l2, True)
        got = self.alloc_clusters_at(start, nb_data)
        assert got == nb_data
        end = start + nb_data * cs
        if end > self.plan.file_length:
            self.plan.prealloc.append((self.plan.file_length, end, mode))
            self.plan.file_length = end
        guest, host = 0, start
        while nb_data:
            nb = min(nb_data, self.l2_entries - ((guest >> self.cb) & (self.l2_entries - 1)))
            self.link_l2(guest, host, nb)
            guest += nb * cs
            host += nb * cs
            nb_data -= nb


def refcount_metadata_blocks(clusters: int, cluster_size: int, refcount_bits: int, generous: bool) -> int:
    """Refcount blocks needed to count ``clusters`` plus the refcount structures themselves.

    The fixed point of QEMU's qcow2_refcount_metadata_size (whose layout we
    must reproduce, so its rounding and 50 % headroom are kept as they are).
    """
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // refcount_bits
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
        elif n == last:
            return blocks


def plan_image(
    size: int,
    o: CreateOptions,
) -> tuple[Plan, bytes]:
    """Everything to write into the new qcow2 file: (metadata plan, cluster 0)."""
    preallocation = validate(size, o)
    size = -(-size // 512) * 512
    cluster_bits = o.cluster_size.bit_length() - 1
    refcount_order = o.refcount_bits.bit_length() - 1
    a = _Allocator(cluster_bits, refcount_order, o.extended_l2, o.data_file is not None)
    a.alloc_clusters(3 * o.cluster_size)  # header, reftable, first refblock
    l2_span = o.cluster_size * a.l2_entries
    a.grow_l1(-(-size // l2_span))
    a.plan.data_file = (size, "off")
    if preallocation == "metadata" or (preallocation != "off" and o.data_file is not None):
        end = a.preallocate_metadata(size)
        # When the disk ends inside a (sub)cluster, qemu 7.2 copies the rest of
        # it (zeros) on write: that allocates the tail and sizes the file.
        # Otherwise the file is simply truncated to the end.
        unit = o.cluster_size // EXTL2_SUBCLUSTERS if o.extended_l2 else o.cluster_size
        rounded = -(-end // unit) * unit
        cow = (end, rounded) if end != rounded else None
        if o.data_file is not None:
            a.plan.data_file = (
                rounded,
                "cow" if cow else preallocation if preallocation != "metadata" else "off",
            )
            a.plan.data_cow = cow
        else:
            if cow:
                a.plan.prealloc.append((cow[0], cow[1], "zero"))
            a.plan.file_length = max(a.plan.file_length, rounded)
    elif preallocation in ("falloc", "full"):
        a.preallocate_data_area(size, preallocation)
    incompatible = 0
    if o.data_file is not None:
        incompatible |= L.INCOMPAT_DATA_FILE
    if o.compression_type != "zlib":
        incompatible |= L.INCOMPAT_COMPRESSION
    if o.extended_l2:
        incompatible |= L.INCOMPAT_EXTL2
    try:
        header = build_header(
            version=o.version,
            cluster_bits=cluster_bits,
            size=size,
            l1_size=len(a.l1),
            l1_offset=a.l1_offset,
            reftable_offset=a.reftable_offset,
            reftable_clusters=len(a.reftable) * 8 // o.cluster_size,
            incompatible=incompatible,
            compatible=L.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
            autoclear=L.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
            refcount_order=refcount_order,
            compression_type=COMPRESSION_TYPES[o.compression_type],
            backing_file=o.backing_file,
            backing_format=o.backing_format,
            data_file=o.data_file,
        )
    except HeaderTooLarge:
        raise CreateError(
            f"Could not assign backing file '{o.backing_file}' with format '{o.backing_format}': "
            "No space left on device"
        ) from None
    return a.plan, header
