"""Resize: grow (with a bigger L1 table when needed) or shrink when nothing allocated is cut off."""

from __future__ import annotations

import errno

from ..format.l2 import UNALLOCATED_PLAIN, ZERO_PLAIN
from .allocate import DataWrites
from .core import L2Update, round_up
from .discard import Discard
from .zero import ZeroWrites


class Resize:
    def __init__(self, core: L2Update, data: DataWrites, zero: ZeroWrites, discard: Discard) -> None:
        self.core = core
        self.image = core.image
        self.meta = core.meta
        self.layout = core.layout
        self.data = data
        self.zero = zero
        self.discard = discard

    def resize(self, new_size: int) -> None:
        """The new virtual size, rounded up to whole sectors.

        Growing over a longer backing file zeroes the new area, as QEMU does, so
        the old backing bytes past the old end do not show through.
        """
        img, meta, layout = self.image, self.meta, self.layout
        meta.write_back()
        old_size = img.size
        new_size = round_up(new_size, 512)
        offset = new_size
        while offset < old_size:
            stype, n, _ = img.lookup(offset, old_size - offset)
            if stype not in (UNALLOCATED_PLAIN, ZERO_PLAIN):
                raise OSError(errno.EINVAL, f"shrinking would cut off allocated data at offset {offset}")
            offset += n
        first_gone = round_up(new_size, layout.cluster_size)
        if first_gone < old_size:
            self.discard.discard_clusters(first_gone, old_size - first_gone, full=True)
        need = -(-new_size // (layout.cluster_size * layout.entries))
        if need > len(meta.l1):
            meta.grow_l1(need)
        meta.set_header(size=new_size)
        img.size = new_size
        if new_size > old_size and img.backing is not None and img.backing.size > old_size:
            zero_start = round_up(old_size, layout.subcluster_size)
            if new_size > zero_start:
                self.zero.zeroize(zero_start, new_size - zero_start, False)
            if zero_start > old_size:
                self.data.write(old_size, bytes(min(zero_start, new_size) - old_size))
        meta.write_back()
