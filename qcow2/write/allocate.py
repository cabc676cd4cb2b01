"""Guest data writes: in place where QEMU writes in place, else allocation with copy-on-write.

The rules are QEMU's (qcow2_alloc_host_offset, calculate_l2_meta,
perform_cow, qcow2_alloc_cluster_link_l2), so the same requests leave the
same allocation behind: which clusters are new, which subclusters are
allocated, what is copied around the guest data.
"""

from __future__ import annotations

from ..format import layout as L
from ..format.l2 import (
    COMPRESSED,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOCATED,
    UNALLOCATED_PLAIN,
    ZERO_ALLOCATED,
    ZERO_PLAIN,
    L2Table,
    clz32,
    ctz32,
    subcluster_range,
)
from .core import L2Update, round_up


class DataWrites:
    """``write``: guest bytes into one image, allocating and copying as QEMU does."""

    def __init__(self, core: L2Update) -> None:
        self.core = core
        self.image = core.image
        self.meta = core.meta
        self.layout = core.layout

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            pos += self._write_run(offset + pos, view[pos:])

    def _write_run(self, offset: int, data: memoryview) -> int:
        """Write what fits in one run of like clusters of one L2 table; returns bytes written."""
        layout = self.layout
        cs, cbits = layout.cluster_size, layout.cluster_bits
        needs_new = layout.needs_new_cluster
        l2_offset, table, l2_index = self.core.table_for_update(offset)
        in_cluster = offset & (cs - 1)
        nb = min(layout.entries - l2_index, -(-(in_cluster + len(data)) >> cbits))
        entries = table.entries
        entry = entries[l2_index]
        in_place = not needs_new(entry)
        n = 1
        if in_place:
            host = entry & L.L2E_OFFSET_MASK
            while (
                n < nb
                and not needs_new(entries[l2_index + n])
                and entries[l2_index + n] & L.L2E_OFFSET_MASK == host + (n << cbits)
            ):
                n += 1
        else:
            while n < nb and needs_new(entries[l2_index + n]):
                n += 1
        nbytes = min(len(data), (n << cbits) - in_cluster)
        n = -(-(in_cluster + nbytes) >> cbits)
        if not in_place:
            if self.image.data_file is not None:
                host = offset - in_cluster
            else:
                host = self.meta.refcounts.alloc(n) << cbits
        self._write_clusters(offset, data[:nbytes], l2_offset, table, l2_index, n, host, in_place)
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
        in_place: bool,
    ) -> None:
        """QEMU's calculate_l2_meta + perform_cow + link_l2 for ``n`` clusters at ``host``."""
        layout, core = self.layout, self.core
        cs, scs = layout.cluster_size, layout.subcluster_size
        sbits, sc_mask = layout.subcluster_bits, layout.subclusters - 1
        entries, bitmaps = table.entries, table.bitmaps
        guest_base = offset & ~(cs - 1)
        cow_start_to = offset - guest_base
        cow_end_from = cow_start_to + len(data)

        def sc_index(rel: int) -> int:
            return (rel >> sbits) & sc_mask

        def range_type(i: int, sc: int):
            return core.range_type(table, l2_index + i, sc, l2_offset)

        skip_cow = in_place
        for i in range(n):
            if skip_cow:
                first_sc = ((cow_start_to if cow_start_to > i * cs else i * cs) >> sbits) & sc_mask
                end = cow_end_from if cow_end_from < (i + 1) * cs else (i + 1) * cs
                last_sc = ((end - 1) >> sbits) & sc_mask
                t, cnt = layout.range_type(
                    entries[l2_index + i], bitmaps[l2_index + i] if bitmaps else 0, first_sc
                )
                if t == INVALID:
                    core.range_type(table, l2_index + i, first_sc, l2_offset)  # raises, naming the table
                if t != NORMAL or first_sc + cnt <= last_sc:
                    skip_cow = False
            else:
                range_type(i, 0)
        if skip_cow:
            self.meta.check_data_write(host + cow_start_to, len(data))
            self.image.data.write(host + cow_start_to, data)
            return

        sc_first = sc_index(cow_start_to)
        t_first, _ = range_type(0, sc_first)
        bm_first = table.bitmap(l2_index)
        sc_last = sc_index(cow_end_from - 1)
        t_last, _ = range_type(n - 1, sc_last)
        bm_last = table.bitmap(l2_index + n - 1)
        if not in_place:
            if t_first in (NORMAL, ZERO_ALLOCATED, UNALLOCATED_ALLOCATED) and bitmaps:
                cow_start_from = min(sc_first, ctz32(bm_first)) * scs
            elif t_first in (ZERO_PLAIN, UNALLOCATED_PLAIN):
                cow_start_from = sc_first * scs
            else:
                cow_start_from = 0
            if t_last in (ZERO_PLAIN, UNALLOCATED_PLAIN):
                cow_end_to = round_up(cow_end_from, scs)
            else:
                cow_end_to = round_up(cow_end_from, cs)
                if t_last != COMPRESSED and bitmaps:
                    cow_end_to -= min(layout.subclusters - sc_last - 1, clz32(bm_last)) * scs
        else:
            cow_start_from = cow_start_to if t_first == NORMAL else sc_first * scs
            cow_end_to = cow_end_from if t_last == NORMAL else round_up(cow_end_from, scs)

        try:
            self._perform_cow(guest_base, host, cow_start_from, cow_start_to, cow_end_from, cow_end_to, data)
        except OSError:
            if not in_place and self.image.data_file is None and not self.meta.corrupt:
                self.meta.refcounts.free(host >> layout.cluster_bits, n)  # nothing points at them yet
            raise

        old = []
        for i in range(n):
            idx = l2_index + i
            if not in_place and entries[idx]:
                old.append(entries[idx])
            bitmap = bitmaps[idx] if bitmaps else 0
            if bitmaps:
                first_sc = sc_index(max(cow_start_from, i * cs))
                last_sc = sc_index(min(cow_end_to, (i + 1) * cs) - 1)
                bitmap |= subcluster_range(first_sc, last_sc + 1)
                bitmap &= ~(subcluster_range(first_sc, last_sc + 1) << 32)
            table.set(idx, (host + i * cs) | L.QCOW_OFLAG_COPIED, bitmap)
        core.store(l2_offset, l2_index, n)
        for entry in old:
            core.release_later(entry)

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
        img, core = self.image, self.core
        head, tail = start_to - start_from, end_to - end_from
        self.meta.check_data_write(host + start_from, end_to - start_from)
        if (
            (head or tail)
            and core.is_zero_fast(guest_base + start_from, head)
            and core.is_zero_fast(guest_base + end_from, tail)
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
            core.read_guest(guest_base + end_from, view[head + len(data) :])
        img.data.write(host + start_from, buf)
