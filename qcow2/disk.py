"""A whole chain as one :class:`~qcow2.device.Disk`, and opening one from a path."""

from __future__ import annotations

import errno
from collections.abc import Iterator

from .device import Extent
from .status import ALLOCATED, DATA, ZERO, Layer, status_above


class ChainDisk:
    """The top layer of a chain seen as one disk."""

    def __init__(self, top: Layer, read_only: bool = True) -> None:
        self.top = top
        self._read_only = read_only

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.top.readinto(offset, buf)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes in a buffer of their own (often filled by the kernel without a copy)."""
        return self.top.read(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = min(offset + length, self.top.size)
        while offset < end:
            st, depth = status_above(self.top, offset, end - offset)
            flags = st.flags
            yield Extent(st.length, bool(flags & DATA), bool(flags & ZERO), depth if flags & ALLOCATED else 0)
            offset += st.length

    # -- writes -------------------------------------------------------------------

    @property
    def can_write(self) -> bool:
        return not self._read_only

    can_trim = can_zero = can_fast_zero = can_write

    def _writer(self, offset: int = 0, length: int = 0):
        if self._read_only:
            raise OSError(errno.EPERM, "the disk is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.ENOSPC, "request beyond the end of the disk")
        writer = getattr(self.top, "writer", None)
        return writer if writer is not None else self.top

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._writer(offset, len(data)).write(offset, data)
        if fua:
            self.flush()

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._writer(offset, length).write_zeroes(offset, length, may_unmap, fast)
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._writer(offset, length).trim(offset, length)
        if fua:
            self.flush()

    def resize(self, size: int) -> None:
        self._writer().resize(size)

    def flush(self) -> None:
        if not self._read_only:
            self.top.flush()

    def close(self) -> None:
        layer = self.top
        while layer is not None:
            layer.close()
            layer = layer.backing
