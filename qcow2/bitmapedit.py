"""Offline changes to an image's persistent bitmaps: qemu-img bitmap's operations.

A :class:`BitmapEditor` opens one image read-write under QEMU's locks and
without its backing chain (the bits describe this image alone, as QEMU's
``BDRV_O_NO_BACKING``).  Add, remove, clear, enable, disable and merge
follow QEMU's rules (block/dirty-bitmap.c, blockdev.c, qcow2-bitmap.c) and
fail with its messages, and change the bitmaps in memory only: the file is
written by :meth:`BitmapEditor.commit`, through the image's metadata owner,
in QEMU's order (removals, then every bitmap stored).  A sequence refused
anywhere therefore leaves the file as it was; qemu-img would keep what the
operations before the refused one did.
"""

from __future__ import annotations

from dataclasses import replace

from .chain import close_chain
from .dirtymap import dirty_runs
from .format.bitmaps import entry_size, new_bitmap_problem
from .format.header import MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS, HeaderTooLarge, rebuild_header
from .hostfile import HostFile
from .image import Qcow2Image
from .metadata.bitmaps import DirtyBitmap, PersistentBitmaps
from .opening import FileOpener, lock_chain, open_layer


class BitmapRefused(ValueError):
    """An operation QEMU refuses; the message is QEMU's."""


def default_granularity(cluster_size: int) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size, at least 4 KiB."""
    return max(4096, cluster_size)


class BitmapEditor:
    """The persistent bitmaps of one image, opened for changes (or, ``writable=False``, to be
    read as the source of a merge)."""

    def __init__(self, filename: str, fmt: str | None = None, writable: bool = True,
                 opener: FileOpener = HostFile) -> None:  # fmt: skip
        self.filename = filename
        self.top = open_layer(filename, fmt, writable=writable, opener=opener, backing=False)
        try:
            lock_chain(self.top, writable)
        except BaseException:
            close_chain(self.top)
            raise
        self.image = self.top if isinstance(self.top, Qcow2Image) else None

    @property
    def bitmaps(self) -> PersistentBitmaps | None:
        return self.image.meta.bitmaps if self.image is not None else None

    # -- looking up, as block_dirty_bitmap_lookup and bdrv_dirty_bitmap_check -----------

    def find(self, name: str) -> DirtyBitmap:
        found = self.bitmaps.find(name) if self.bitmaps is not None else None
        if found is None:
            raise BitmapRefused(f"Dirty bitmap '{name}' not found")
        return found

    @staticmethod
    def usable(bitmap: DirtyBitmap) -> DirtyBitmap:
        if bitmap.inconsistent:
            raise BitmapRefused(
                f"Bitmap '{bitmap.name}' is inconsistent and cannot be used "
                "(--remove deletes it from the image)"
            )
        return bitmap

    # -- the operations -----------------------------------------------------------------

    def add(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """QEMU's block_dirty_bitmap_add with persistent=on; ``granularity`` None or 0: the default."""
        if not name:
            raise BitmapRefused("Bitmap name cannot be empty")
        if granularity and (granularity < 512 or granularity >= 1 << 32 or granularity & (granularity - 1)):
            raise BitmapRefused("Granularity must be power of 2 and at least 512")
        if self.image is None:
            raise BitmapRefused(f"Can't store persistent bitmaps to {self.filename}: Operation not supported")
        if self.bitmaps.find(name) is not None:
            raise BitmapRefused(f"Bitmap already exists: {name}")
        meta = self.image.meta
        granularity = granularity or default_granularity(meta.cluster_size)
        why = self._cannot_store(name, granularity.bit_length() - 1)
        if why:
            raise BitmapRefused(f"Can't make bitmap '{name}' persistent in '{self.filename}': {why}")
        try:
            self.bitmaps.create(name, granularity.bit_length() - 1, enabled)
        except OSError as e:
            why = f"Can't make bitmap '{name}' persistent in '{self.filename}': {e.strerror}"
            raise BitmapRefused(why) from None

    def _cannot_store(self, name: str, granularity_bits: int) -> str | None:
        """QEMU's qcow2_co_can_store_new_dirty_bitmap, and whether cluster 0 can hold the
        bitmaps extension should it be the first bitmap."""
        meta, h = self.image.meta, self.image.header
        if h.version < 3:
            return "Cannot store dirty bitmaps in qcow2 v2 files"
        raw = name.encode("utf-8")
        why = new_bitmap_problem(raw, granularity_bits, h.size, meta.cluster_size)
        if why:
            return why
        names = [b.entry.name for b in self.bitmaps.bitmaps] + [raw]
        if len(names) > MAX_BITMAPS:
            return "Maximum number of persistent bitmaps is already reached"
        if sum(entry_size(len(n)) for n in names) > MAX_BITMAP_DIRECTORY_SIZE:
            return "Not enough space in the bitmap directory"
        fields = {"nb_bitmaps": 1, "bitmap_directory_size": 0, "bitmap_directory_offset": 0}
        try:
            rebuild_header(replace(h, bitmaps=fields))
        except HeaderTooLarge:
            return "No space left on device (cluster 0 cannot hold the bitmaps extension)"
        return None

    def remove(self, name: str) -> None:
        """Inconsistent bitmaps too: removing is what QEMU offers for them."""
        bitmap = self.find(name)
        self.bitmaps.discard(bitmap)

    def clear(self, name: str) -> None:
        bitmap = self.usable(self.find(name))
        bitmap.bits[:] = bytes(len(bitmap.bits))

    def enable(self, name: str) -> None:
        self.usable(self.find(name)).enabled = True

    def disable(self, name: str) -> None:
        self.usable(self.find(name)).enabled = False

    def merge(self, name: str, source_name: str, source: BitmapEditor | None = None) -> None:
        """QEMU's block_dirty_bitmap_merge: every byte dirty in the source becomes dirty here
        (granularities may differ; the disk sizes may not)."""
        dst = self.find(name)
        src = (source or self).find(source_name)
        self.usable(dst)
        self.usable(src)
        if src.size != dst.size:
            raise BitmapRefused(
                f"Bitmaps are of different sizes (destination size is {dst.size}, "
                f"source size is {src.size}) and can't be merged"
            )
        if src.entry.granularity_bits == dst.entry.granularity_bits:
            import numpy as np

            into = np.frombuffer(dst.bits, np.uint8)
            np.bitwise_or(into, np.frombuffer(src.bits, np.uint8), out=into)
            return
        offset = 0
        while offset < src.size:
            runs = dirty_runs(src.bits, src.entry.granularity_bits, src.size, offset, src.size - offset)
            bounds = runs.bounds.tolist()
            for start, end, dirty in zip(bounds, bounds[1:], runs.dirty.tolist(), strict=False):
                if dirty:
                    dst.mark(start, end - start)
            offset = runs.end

    # -- writing ------------------------------------------------------------------------

    def commit(self) -> None:
        """Store what changed, as QEMU's close stores it: a dirty image repaired first (QEMU's
        read-write open), then the removals, then every consistent bitmap."""
        if self.image is None or self.image.header.version < 3:
            return
        meta = self.image.meta
        if meta.header.dirty:
            from .check.dirty import repair_dirty_image

            repair_dirty_image(meta)
        meta.bitmaps.start_editing()
        meta.close()

    def close(self) -> None:
        close_chain(self.top)
