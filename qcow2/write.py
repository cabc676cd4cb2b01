"""Writes to a qcow2 image: allocation, copy-on-write, zero writes, discard.

The rules are QEMU's (block/qcow2-cluster.c), so that the same requests leave
the same allocation behind: which clusters become ZERO_PLAIN or ZERO_ALLOC,
which subclusters are allocated, when a write goes in place.  Metadata goes
to the file in an order that keeps the image consistent at every instant:
data before the L2 entry that points at it, a refcount raised before the
entry that uses the cluster and lowered after the entry that dropped it.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

from . import layout as L
from .errors import CorruptImageError
from .image import (
    COMPRESSED,
    INVALID,
    NORMAL,
    UNALLOC_ALLOC,
    UNALLOC_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    L2Table,
    Qcow2Image,
    _zero,
)
from .status import ZERO, status_above

log = logging.getLogger(__name__)

ALL_ZEROES = 0xFFFFFFFF << 32
ZERO_CHUNK = 1 << 20
DIRTY_L2_BYTES = 32 << 20  # write back before more table bytes than this are pending
MAX_PENDING_FREES = 1 << 16

# Header field offsets (§2.1, §2.2).
HDR_SIZE = 24
HDR_L1 = 36  # l1_size (u32) then l1_table_offset (u64)
HDR_REFTABLE = 48  # refcount_table_offset (u64) then refcount_table_clusters (u32)
HDR_INCOMPAT = 72
HDR_AUTOCLEAR = 88


def _alloc_range(a: int, b: int) -> int:
    """Bitmap bits a..b-1 (QEMU's QCOW_OFLAG_SUB_ALLOC_RANGE)."""
    return (1 << b) - (1 << a)


def _ctz32(v: int) -> int:
    v &= 0xFFFFFFFF
    return 32 if v == 0 else (v & -v).bit_length() - 1


def _clz32(v: int) -> int:
    return 32 - (v & 0xFFFFFFFF).bit_length()


def _round_up(v: int, align: int) -> int:
    return -(-v // align) * align


class Qcow2Writer:
    """The write side of one image opened read-write."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        h = img.header
        self.fd = img.file.fd
        self.corrupt = False
        self.refs = img.refs
        self.refs.on_table_moved = self._reftable_moved
        self.dirty_marked = False
        # Write-back state: L1/L2 changes reach the file at flush, after the data
        # and refcounts they depend on are synced; frees wait until after that.
        self._dirty_l2: dict[int, list[int]] = {}
        self._dirty_l1: set[int] = set()
        self._pending_frees: list[tuple[int, bool]] = []
        self._pending_table_frees: list[int] = []
        if h.dirty:
            from .check import repair_dirty_image

            # QEMU's open of a dirty image: check -r all, then trust the (new) refcounts.
            repair_dirty_image(img)
            self.refs = img.refs = img.load_refcounts()
            self.refs.on_table_moved = self._reftable_moved
        self._clear_autoclear()
        self._refblocks: tuple[int, set[int]] = (-1, set())
        self._l2_clusters = {
            (e & L.L1E_OFFSET_MASK) >> h.cluster_bits for e in img.l1 if e & L.L1E_OFFSET_MASK
        }

    # -- header --------------------------------------------------------------------

    def _write_header(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        os.fsync(self.fd)

    def _clear_autoclear(self) -> None:
        """Autoclear bits we do not maintain (bitmaps) must go before the first write."""
        h = self.img.header
        if h.version < 3:
            return
        keep = h.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW
        if keep != h.autoclear_features:
            self._write_header(HDR_AUTOCLEAR, struct.pack(">Q", keep))
            h.autoclear_features = keep

    def _set_incompatible(self, value: int) -> None:
        self._write_header(HDR_INCOMPAT, struct.pack(">Q", value))
        self.img.header.incompatible_features = value

    def _reftable_moved(self, offset: int, clusters: int) -> None:
        self._write_header(HDR_REFTABLE, struct.pack(">QI", offset, clusters))
        self.img.header.refcount_table_offset = offset
        self.img.header.refcount_table_clusters = clusters

    def _begin_update(self) -> None:
        """Before the first change: refuse if corrupt; mark a v3 image dirty while we write.

        The dirty bit makes whoever opens the image after a crash rebuild its
        refcounts (L2 updates not yet written back leave leaks behind).  With
        lazy refcounts the refcount blocks themselves are also deferred.
        """
        if self.corrupt:
            raise OSError(errno.EIO, "image is marked corrupt")
        if not self.dirty_marked and self.img.header.version >= 3:
            self._set_incompatible(self.img.header.incompatible_features | L.INCOMPAT_DIRTY)
            self.refs.lazy = self.img.header.lazy_refcounts
            self.dirty_marked = True

    def _mark_corrupt(self, why: str) -> None:
        log.error("%s: marking image as corrupt: %s", self.img.filename, why)
        self.corrupt = True
        self._set_incompatible(self.img.header.incompatible_features | L.INCOMPAT_CORRUPT)
        raise OSError(errno.EIO, f"{self.img.filename}: {why}")

    # -- overlap check -------------------------------------------------------------

    def _check_overlap(self, host: int, length: int) -> None:
        """Refuse a write that would hit metadata (QEMU's overlap check, cached template)."""
        if self.img.data_file is not None or length <= 0:
            return
        img = self.img
        h = img.header
        cbits = img.cluster_bits
        first, last = host >> cbits, (host + length - 1) >> cbits
        l1_first = h.l1_table_offset >> cbits
        l1_last = (h.l1_table_offset + len(img.l1) * 8 - 1) >> cbits
        rt_first = h.refcount_table_offset >> cbits
        rt_last = rt_first + h.refcount_table_clusters - 1
        for c in range(first, last + 1):
            if c == 0:
                what = "qcow2 header"
            elif l1_first <= c <= l1_last:
                what = "active L1 table"
            elif rt_first <= c <= rt_last:
                what = "refcount table"
            elif c in self._l2_clusters:
                what = "active L2 table"
            elif c in self._refblock_clusters():
                what = "refcount block"
            else:
                continue
            self._mark_corrupt(f"preventing invalid write on metadata (overlaps with {what})")

    def _refblock_clusters(self) -> set[int]:
        if self._refblocks[0] != self.refs.version:
            self._refblocks = (self.refs.version, self.refs.metadata_clusters())
        return self._refblocks[1]

    # -- L2 tables -----------------------------------------------------------------

    def _l2_for_write(self, offset: int) -> tuple[int, L2Table, int]:
        """The L2 table covering ``offset``, allocated or copied so that it is ours alone."""
        img = self.img
        cbits = img.cluster_bits
        l1_index = offset >> (cbits + img.l2_bits)
        l2_index = (offset >> cbits) & (img.l2_entries - 1)
        if l1_index >= len(img.l1):
            raise OSError(errno.ENOSPC, "write beyond the L1 table")
        l1e = img.l1[l1_index]
        old = l1e & L.L1E_OFFSET_MASK
        if old and l1e & L.QCOW_OFLAG_COPIED:
            return old, img._l2_table(old), l2_index
        new = self.refs.alloc(1) << cbits
        if self.refs.lazy:
            self.refs.write_back()  # QEMU flushes its refcount cache on every L2 allocation
        self._check_overlap(new, img.cluster_size)
        if old:
            old_table = img._l2_table(old)
            raw = old_table.pack(0, len(old_table.entries))
        else:
            raw = bytes(img.cluster_size)
        img.file.write(new, raw)
        self._l2_clusters.add(new >> cbits)
        self._set_l1(l1_index, new | L.QCOW_OFLAG_COPIED)
        table = L2Table(raw, img.extended_l2)
        img._l2_cache[new] = table
        if old:
            img._l2_cache.pop(old, None)
            self._l2_clusters.discard(old >> cbits)
            self._pending_table_frees.append(old >> cbits)
        return new, table, l2_index

    def _set_l1(self, index: int, value: int) -> None:
        self.img.l1[index] = value
        self._dirty_l1.add(index)

    def _store_l2(self, l2_offset: int, table: L2Table, first: int, count: int) -> None:
        """Record changed entries; they go to the file at the next write-back."""
        span = self._dirty_l2.get(l2_offset)
        if span is None:
            self._dirty_l2[l2_offset] = [first, first + count]
            self.img.pinned_l2[l2_offset] = table
            if len(self._dirty_l2) * self.img.cluster_size > DIRTY_L2_BYTES:
                self.write_back()
        else:
            span[0] = min(span[0], first)
            span[1] = max(span[1], first + count)

    def _free_any(self, entry: int, discard: bool = False) -> None:
        """Free what an old L2 entry held, once the entry's removal is on disk.

        Data-file clusters are not refcounted and sit at their guest offset:
        nothing can reuse them, and a later write may land on the same spot,
        so their discard happens now.
        """
        if self.img.data_file is not None:
            self._release(entry, discard)
            return
        self._pending_frees.append((entry, discard))
        if len(self._pending_frees) > MAX_PENDING_FREES:
            self.write_back()

    def _release(self, entry: int, discard: bool) -> None:
        """Drop the reference an old L2 entry held (QEMU's qcow2_free_any_cluster).

        ``discard`` (a guest discard or unmapping zero write): clusters nobody
        uses any more are punched out of the file, the data file included.
        """
        img = self.img
        ctype = img._cluster_type(entry)
        if ctype == COMPRESSED:
            coffset = entry & img._coffset_mask
            nb_sectors = ((entry >> img._csize_shift) & img._csize_mask) + 1
            end = coffset + nb_sectors * 512 - (coffset & 511)
            first = coffset >> img.cluster_bits
            self.refs.free(first, ((end - 1) >> img.cluster_bits) - first + 1, discard)
        elif ctype in (NORMAL, ZERO_ALLOC):
            host = entry & L.L2E_OFFSET_MASK
            if img.data_file is not None:
                if discard:
                    img.data_file.trim(host, img.cluster_size)
            elif host:
                self.refs.free(host >> img.cluster_bits, 1, discard)

    def _needs_new_alloc(self, entry: int) -> bool:
        ctype = self.img._cluster_type(entry)
        return not (ctype in (NORMAL, ZERO_ALLOC) and entry & L.QCOW_OFLAG_COPIED)

    # -- guest writes --------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._begin_update()
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            pos += self._write_chunk(offset + pos, view[pos:])

    def _write_chunk(self, offset: int, data: memoryview) -> int:
        """Write what fits in one run of like clusters of one L2 table; returns bytes written."""
        img = self.img
        cs, cbits = img.cluster_size, img.cluster_bits
        l2_offset, table, l2_index = self._l2_for_write(offset)
        in_cluster = offset & (cs - 1)
        nb = min(img.l2_entries - l2_index, -(-(in_cluster + len(data)) >> cbits))
        entries = table.entries
        entry = entries[l2_index]
        keep_old = not self._needs_new_alloc(entry)
        n = 1
        if keep_old:
            host = entry & L.L2E_OFFSET_MASK
            while (
                n < nb
                and not self._needs_new_alloc(entries[l2_index + n])
                and entries[l2_index + n] & L.L2E_OFFSET_MASK == host + (n << cbits)
            ):
                n += 1
        else:
            while n < nb and self._needs_new_alloc(entries[l2_index + n]):
                n += 1
        nbytes = min(len(data), (n << cbits) - in_cluster)
        n = -(-(in_cluster + nbytes) >> cbits)
        if not keep_old:
            if img.data_file is not None:
                host = offset - in_cluster
            else:
                host = self.refs.alloc(n) << cbits
        self._write_clusters(offset, data[:nbytes], l2_offset, table, l2_index, n, host, keep_old)
        return nbytes

    def _write_clusters(
        self,
        offset: int,
        data: memoryview,
        l2_offset: int,
        table: L2Table,
        l2_index: int,
        n: int,
        host: int,
        keep_old: bool,
    ) -> None:
        """QEMU's calculate_l2_meta + perform_cow + link_l2 for ``n`` clusters at ``host``."""
        img = self.img
        cs = img.cluster_size
        entries, bitmaps = table.entries, table.bitmaps
        guest_base = offset & ~(cs - 1)
        cow_start_to = offset - guest_base
        cow_end_from = cow_start_to + len(data)

        def range_type(i: int, sc: int) -> tuple[int, int]:
            t, cnt = img._range_type(entries[l2_index + i], bitmaps[l2_index + i] if bitmaps else 0, sc)
            if t == INVALID:
                raise CorruptImageError(f"{img.filename}: invalid L2 entry in table {l2_offset:#x}")
            return t, cnt

        skip_cow = keep_old
        for i in range(n):
            if skip_cow:
                write_from = max(cow_start_to, i * cs)
                write_to = min(cow_end_from, (i + 1) * cs)
                first_sc = self._sc_index(write_from)
                last_sc = self._sc_index(write_to - 1)
                t, cnt = range_type(i, first_sc)
                if t != NORMAL or first_sc + cnt <= last_sc:
                    skip_cow = False
            else:
                range_type(i, 0)
        if skip_cow:
            self._check_overlap(host + cow_start_to, len(data))
            img.data.write(host + cow_start_to, data)
            return

        sc_first = self._sc_index(cow_start_to)
        t_first, _ = range_type(0, sc_first)
        bm_first = bitmaps[l2_index] if bitmaps else 0
        sc_last = self._sc_index(cow_end_from - 1)
        t_last, _ = range_type(n - 1, sc_last)
        bm_last = bitmaps[l2_index + n - 1] if bitmaps else 0
        scs = img.subcluster_size
        if not keep_old:
            if t_first in (NORMAL, ZERO_ALLOC, UNALLOC_ALLOC) and bitmaps:
                cow_start_from = min(sc_first, _ctz32(bm_first)) * scs
            elif t_first in (ZERO_PLAIN, UNALLOC_PLAIN):
                cow_start_from = sc_first * scs
            else:
                cow_start_from = 0
            if t_last in (ZERO_PLAIN, UNALLOC_PLAIN):
                cow_end_to = _round_up(cow_end_from, scs)
            else:
                cow_end_to = _round_up(cow_end_from, cs)
                if t_last != COMPRESSED and bitmaps:
                    cow_end_to -= min(img.subclusters - sc_last - 1, _clz32(bm_last)) * scs
        else:
            cow_start_from = cow_start_to if t_first == NORMAL else sc_first * scs
            cow_end_to = cow_end_from if t_last == NORMAL else _round_up(cow_end_from, scs)

        try:
            self._perform_cow(guest_base, host, cow_start_from, cow_start_to, cow_end_from, cow_end_to, data)
        except OSError:
            if not keep_old and img.data_file is None and not self.corrupt:
                self.refs.free(host >> img.cluster_bits, n)  # nothing points at them yet
            raise

        old = []
        for i in range(n):
            idx = l2_index + i
            if not keep_old and entries[idx]:
                old.append(entries[idx])
            bitmap = bitmaps[idx] if bitmaps else 0
            if bitmaps:
                written_from = max(cow_start_from, i * cs)
                written_to = min(cow_end_to, (i + 1) * cs)
                first_sc = self._sc_index(written_from)
                last_sc = self._sc_index(written_to - 1)
                bitmap |= _alloc_range(first_sc, last_sc + 1)
                bitmap &= ~(_alloc_range(first_sc, last_sc + 1) << 32)
            table.set(idx, (host + i * cs) | L.QCOW_OFLAG_COPIED, bitmap)
        self._store_l2(l2_offset, table, l2_index, n)
        for entry in old:
            self._free_any(entry)

    def _sc_index(self, rel: int) -> int:
        img = self.img
        return (rel >> img.subcluster_bits) & (img.subclusters - 1)

    def _perform_cow(
        self,
        guest_base: int,
        host: int,
        start_from: int,
        start_to: int,
        end_from: int,
        end_to: int,
        data: memoryview,
    ) -> None:
        """Write the guest data with what the guest sees around it, in one go where possible."""
        img = self.img
        head, tail = start_to - start_from, end_to - end_from
        self._check_overlap(host + start_from, end_to - start_from)
        if (
            (head or tail)
            and self._is_zero_fast(guest_base + start_from, head)
            and self._is_zero_fast(guest_base + end_from, tail)
            and img.data.zero_range(host + start_from, end_to - start_from)
        ):
            img.data.write(host + start_to, data)
            return
        if not head and not tail:
            img.data.write(host + start_to, data)
            return
        buf = bytearray(end_to - start_from)
        view = memoryview(buf)
        if head:
            img.readinto(guest_base + start_from, view[:head])
        view[head : head + len(data)] = data
        if tail:
            self._read_guest(guest_base + end_from, view[head + len(data) :])
        img.data.write(host + start_from, buf)

    def _read_guest(self, offset: int, buf: memoryview) -> None:
        """Guest view, zeros past the end of the disk (the padded last cluster)."""
        inside = max(0, min(len(buf), self.img.size - offset))
        if inside:
            self.img.readinto(offset, buf[:inside])
        if inside < len(buf):
            _zero(buf[inside:])

    def _is_zero_fast(self, offset: int, length: int) -> bool:
        """QEMU's bdrv_co_is_zero_fast: one status query, without want_zero."""
        if not length:
            return True
        if offset >= self.img.size:
            return True
        length = min(length, self.img.size - offset)
        st, _ = status_above(self.img, offset, length, want_zero=False)
        return st.length == length and bool(st.flags & ZERO)

    def _is_zero(self, offset: int, length: int) -> bool:
        """QEMU's is_zero: the whole range reads as zeros, by block status."""
        length = min(length, self.img.size - offset)
        while length > 0:
            st, _ = status_above(self.img, offset, length)
            if not st.flags & ZERO or not st.length:
                return False
            offset += st.length
            length -= st.length
        return True

    # -- zero writes -----------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False, fast: bool = False) -> None:
        """Generic split by subcluster alignment, efficient zeroing, explicit zeros as fallback."""
        self._begin_update()
        if fast and self.img.header.version < 3:
            # QEMU's qcow2 offers no fast zeroing without the v3 zero flag.
            raise OSError(errno.ENOTSUP, "v2 images cannot zero without writing")
        pieces = list(self._zero_pieces(offset, length))
        if fast and not all(self._pwrite_zeroes(o, n, may_unmap, dry_run=True) for o, n in pieces):
            raise OSError(errno.ENOTSUP, "zeroing this range needs data writes")
        for o, n in pieces:
            if not self._pwrite_zeroes(o, n, may_unmap):
                self._write_zero_bytes(o, n)

    def _zero_pieces(self, offset: int, length: int):
        align = self.img.subcluster_size
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

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, ZERO_CHUNK))
        while length:
            n = min(length, len(zeros))
            self.write(offset, memoryview(zeros)[:n])
            offset += n
            length -= n

    def _pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, dry_run: bool = False) -> bool:
        """QEMU's qcow2_co_pwrite_zeroes; False where it answers ENOTSUP."""
        img = self.img
        scs = img.subcluster_size
        head = offset % scs
        tail = _round_up(offset + length, scs) - (offset + length)
        if offset + length == img.size:
            tail = 0
        if head or tail:
            if not (self._is_zero(offset - head, head) and self._is_zero(offset + length, tail)):
                return False
            offset -= head
            length = scs
            stype, _, _ = img.lookup(offset, scs)
            if stype not in (UNALLOC_PLAIN, UNALLOC_ALLOC, ZERO_PLAIN, ZERO_ALLOC):
                return False
        return self._zeroize(offset, length, may_unmap, dry_run)

    def _zeroize(self, offset: int, length: int, may_unmap: bool, dry_run: bool) -> bool:
        """QEMU's qcow2_subcluster_zeroize."""
        img = self.img
        cs = img.cluster_size
        if img.header.version < 3:
            if img.backing is not None:
                return False
            if not dry_run:
                self._discard(offset, length, full=False)
            return True
        end = offset + length
        head = min(end, _round_up(offset, cs)) - offset
        offset += head
        tail = 0 if end >= img.size else end - max(offset, end & ~(cs - 1))
        end -= tail
        if dry_run:
            for start, n in ((offset - head, head), (end, tail)):
                if n and img.lookup(start, n)[0] == COMPRESSED:
                    return False
            return True
        if img.header.data_file_raw:
            self._zero_data_file(offset - head, length, may_unmap)
        if head and not self._zero_subclusters(offset - head, -(-head // img.subcluster_size)):
            return False
        nb = -(-(end - offset) // cs) if end > offset else 0
        while nb > 0:
            cleared = self._zero_in_l2(offset, nb, may_unmap)
            nb -= cleared
            offset += cleared * cs
        if tail and not self._zero_subclusters(end, -(-tail // img.subcluster_size)):
            return False
        return True

    def _zero_data_file(self, offset: int, length: int, may_unmap: bool) -> None:
        data = self.img.data
        if not data.zero_range(offset, length):
            zeros = bytes(min(length, ZERO_CHUNK))
            for pos in range(offset, offset + length, len(zeros)):
                data.write(pos, memoryview(zeros)[: min(len(zeros), offset + length - pos)])

    def _zero_in_l2(self, offset: int, nb_clusters: int, may_unmap: bool) -> int:
        """QEMU's zero_in_l2_slice: set zero flags, release clusters the client lets go."""
        extended = self.img.extended_l2

        def rule(entry: int, bitmap: int, ctype: int) -> tuple[int, int, bool]:
            unmap = ctype == COMPRESSED or (may_unmap and ctype in (NORMAL, ZERO_ALLOC))
            new_entry = 0 if unmap else entry
            if extended:
                return new_entry, ALL_ZEROES, unmap
            return new_entry | L.QCOW_OFLAG_ZERO, bitmap, unmap

        return self._rewrite_l2(offset, nb_clusters, rule)

    def _rewrite_l2(self, offset: int, nb_clusters: int, rule) -> int:
        """Apply ``rule(entry, bitmap, type) -> (entry, bitmap, release)`` across one L2 table.

        Changed entries are stored first, then what they released is freed:
        QEMU's order, so no cluster is free while an entry on disk still uses it.
        Returns how many clusters were covered (at most to the table's end).
        """
        img = self.img
        l2_offset, table, l2_index = self._l2_for_write(offset)
        nb_clusters = min(nb_clusters, img.l2_entries - l2_index)
        bitmaps = table.bitmaps
        freed = []
        lo = hi = None
        for i in range(l2_index, l2_index + nb_clusters):
            old_entry = table.entries[i]
            old_bitmap = bitmaps[i] if bitmaps else 0
            new_entry, new_bitmap, release = rule(old_entry, old_bitmap, img._cluster_type(old_entry))
            if new_entry == old_entry and new_bitmap == old_bitmap:
                continue
            table.set(i, new_entry, new_bitmap)
            lo = i if lo is None else lo
            hi = i
            if release:
                freed.append(old_entry)
        if lo is not None:
            self._store_l2(l2_offset, table, lo, hi - lo + 1)
        for entry in freed:
            self._free_any(entry, discard=True)
        return nb_clusters

    def _zero_subclusters(self, offset: int, count: int) -> bool:
        """QEMU's zero_l2_subclusters (extended L2, part of one cluster)."""
        img = self.img
        l2_offset, table, l2_index = self._l2_for_write(offset)
        if img._cluster_type(table.entries[l2_index]) == COMPRESSED:
            return False
        sc = self._sc_index(offset & (img.cluster_size - 1))
        old = table.bitmaps[l2_index]
        bitmap = (old | (_alloc_range(sc, sc + count) << 32)) & ~_alloc_range(sc, sc + count)
        if bitmap != old:
            table.set(l2_index, table.entries[l2_index], bitmap)
            self._store_l2(l2_offset, table, l2_index, 1)
        return True

    # -- discard -----------------------------------------------------------------------

    def trim(self, offset: int, length: int) -> None:
        """Discard: the generic split by cluster alignment, then QEMU's qcow2_co_pdiscard."""
        self._begin_update()
        img = self.img
        cs = img.cluster_size
        end = offset + length
        while offset < end:
            head = offset % cs
            if head:
                num = min(end - offset, cs - head)
            else:
                num = end - offset
                tail = end % cs
                if tail and num > cs:
                    num -= tail
            self._pdiscard(offset, num)
            offset += num

    def _pdiscard(self, offset: int, length: int) -> None:
        img = self.img
        cs = img.cluster_size
        if img.header.version < 3 and img.backing is not None:
            return
        if (offset | length) % cs and (offset % cs or offset + length != img.size):
            return
        self._discard(offset, length, full=False)

    def _discard(self, offset: int, length: int, full: bool) -> None:
        """QEMU's qcow2_cluster_discard over whole clusters (the last may be the partial tail)."""
        nb = -(-length // self.img.cluster_size)
        while nb > 0:
            done = self._discard_in_l2(offset, nb, full)
            nb -= done
            offset += done * self.img.cluster_size

    def _discard_in_l2(self, offset: int, nb_clusters: int, full: bool) -> int:
        """QEMU's discard_in_l2_slice: zero clusters (or plain holes when ``full``)."""
        img = self.img
        extended, v3 = img.extended_l2, img.header.version >= 3
        hide_backing = img.backing is not None

        def rule(entry: int, bitmap: int, ctype: int) -> tuple[int, int, bool]:
            if full:
                return 0, 0, True
            if hide_backing or ctype in (COMPRESSED, NORMAL, ZERO_ALLOC):
                if extended:
                    return 0, ALL_ZEROES, True
                return (L.QCOW_OFLAG_ZERO if v3 else 0), bitmap, True
            return entry, bitmap, True

        return self._rewrite_l2(offset, nb_clusters, rule)

    # -- durability --------------------------------------------------------------------

    def write_back(self) -> None:
        """Sync data and refcounts, then write the pending L2/L1 changes, then free."""
        img = self.img
        if img.data_file is not None:
            img.data_file.flush()
        img.file.flush()
        if not (self._dirty_l2 or self._dirty_l1 or self._pending_frees or self._pending_table_frees):
            return
        esize = img.l2_entry_size
        for l2_offset, (lo, hi) in sorted(self._dirty_l2.items()):
            table = img.pinned_l2[l2_offset]
            os.pwrite(self.fd, table.pack(lo, hi - lo), l2_offset + lo * esize)
        l1_offset = img.header.l1_table_offset
        for index in sorted(self._dirty_l1):
            os.pwrite(self.fd, struct.pack(">Q", img.l1[index]), l1_offset + index * 8)
        img.file.flush()
        for l2_offset in self._dirty_l2:
            table = img.pinned_l2.pop(l2_offset)
            img._l2_cache.setdefault(l2_offset, table)
        self._dirty_l2.clear()
        self._dirty_l1.clear()
        frees, self._pending_frees = self._pending_frees, []
        for entry, discard in frees:
            self._release(entry, discard)
        tables, self._pending_table_frees = self._pending_table_frees, []
        for cluster in tables:
            self.refs.free(cluster)

    def flush(self) -> None:
        self.write_back()

    def close(self) -> None:
        """Write everything back, then clear the dirty bit: the image is clean again."""
        if self.corrupt:
            return
        self.write_back()
        if self.dirty_marked:
            self.refs.write_back()
            self.img.file.flush()
            self._set_incompatible(self.img.header.incompatible_features & ~L.INCOMPAT_DIRTY)
            self.dirty_marked = False
            self.refs.lazy = False

    # -- resize ------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow (moving the L1 table when too small) or shrink when nothing allocated is cut off.

        Growing over a longer backing file zeroes the new area, as QEMU does, so
        the old backing bytes past the old end do not show through.
        """
        self._begin_update()
        self.write_back()
        img = self.img
        old_size = img.size
        new_size = _round_up(new_size, 512)
        offset = new_size
        while offset < old_size:
            stype, n, _ = img.lookup(offset, old_size - offset)
            if stype not in (UNALLOC_PLAIN, ZERO_PLAIN):
                raise OSError(errno.EINVAL, f"shrinking would cut off allocated data at offset {offset}")
            offset += n
        first_gone = _round_up(new_size, img.cluster_size)
        if first_gone < old_size:
            self._discard(first_gone, old_size - first_gone, full=True)
        need = -(-new_size // (img.cluster_size * img.l2_entries))
        if need > len(img.l1):
            self._grow_l1(need)
        self._write_header(HDR_SIZE, struct.pack(">Q", new_size))
        img.header.size = img.size = new_size
        if new_size > old_size and img.backing is not None and img.backing.size > old_size:
            zero_start = _round_up(old_size, img.subcluster_size)
            if new_size > zero_start:
                self._zeroize(zero_start, new_size - zero_start, False, False)
            if zero_start > old_size:
                self.write(old_size, bytes(min(zero_start, new_size) - old_size))
        self.flush()

    def _grow_l1(self, entries: int) -> None:
        """Copy the L1 table to a bigger place, switch the header to it, free the old one."""
        img = self.img
        h = img.header
        cs, cbits = img.cluster_size, img.cluster_bits
        clusters = -(-entries * 8 // cs)
        self.write_back()
        new = self.refs.alloc(clusters) << cbits
        table = img.l1 + [0] * (entries - len(img.l1))
        raw = struct.pack(f">{entries}Q", *table)
        img.file.write(new, raw + bytes(clusters * cs - len(raw)))
        img.file.flush()
        old, old_clusters = h.l1_table_offset, -(-len(img.l1) * 8 // cs)
        self._write_header(HDR_L1, struct.pack(">IQ", entries, new))
        h.l1_size, h.l1_table_offset = entries, new
        img.l1 = table
        if old and old_clusters:
            self.refs.free(old >> cbits, old_clusters)
