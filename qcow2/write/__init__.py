"""Writes to a qcow2 image, split by what they do around one shared L2-update core.

``core`` (the table to change, stored entries, deferred frees, the guest
view), ``allocate`` (data writes: in place or allocation with copy-on-write),
``zero`` (zero writes), ``discard`` (trim), ``resize``.  :class:`Qcow2Writer`
is what a disk holds for an image opened read-write.  Metadata changes go
through the image's :class:`~qcow2.metadata.owner.ImageMetadata`, which
decides when and in which order they reach the file.
"""

from __future__ import annotations

from ..format.snapshots import Snapshot, SnapshotRef
from ..image import Qcow2Image
from ..metadata import snapshots as snapshot_ops
from .allocate import DataWrites
from .core import L2Update
from .discard import Discard
from .resize import Resize
from .zero import ZeroWrites


class Qcow2Writer:
    """The write side of one image opened read-write (callers serialise its calls)."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image = image
        self.meta = meta = image.meta
        meta.data_file = image.data_file
        meta.start_writing()
        core = L2Update(image, meta)
        self._data = DataWrites(core)
        self._discard = Discard(core)
        self._zero = ZeroWrites(core, self._data, self._discard)
        self._resize = Resize(core, self._data, self._zero, self._discard)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.meta.begin_update()
        self.meta.bitmaps.mark(offset, len(data))
        self._data.write(offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False, fast: bool = False) -> None:
        self.meta.begin_update()
        self.meta.bitmaps.mark(offset, length)
        self._zero.write_zeroes(offset, length, may_unmap, fast)

    def trim(self, offset: int, length: int) -> None:
        self.meta.begin_update()
        self.meta.bitmaps.mark(offset, length)
        self._discard.trim(offset, length)

    def resize(self, size: int) -> None:
        self.meta.begin_update()
        self.meta.bitmaps.resize(size)
        self._resize.resize(size)

    # Internal snapshots (qcow2.metadata.snapshots works on the metadata owner); the disk size
    # follows an apply.

    def create_snapshot(self, name: bytes, date_sec: int, date_nsec: int) -> Snapshot:
        return snapshot_ops.create(self.meta, name, date_sec, date_nsec)

    def delete_snapshot(self, ref: SnapshotRef) -> None:
        snapshot_ops.delete(self.meta, ref)

    def apply_snapshot(self, ref: SnapshotRef) -> None:
        self.image.size = snapshot_ops.apply(self.meta, ref) // 512 * 512

    def flush(self) -> None:
        self.meta.write_back()

    def close(self) -> None:
        """Write everything back and mark the image clean."""
        self.meta.close()
