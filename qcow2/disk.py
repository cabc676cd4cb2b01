"""A whole chain as one :class:`~qcow2.device.Disk`, and opening one from a path."""

from __future__ import annotations

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

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = min(offset + length, self.top.size)
        while offset < end:
            st, depth = status_above(self.top, offset, end - offset)
            flags = st.flags
            yield Extent(st.length, bool(flags & DATA), bool(flags & ZERO), depth if flags & ALLOCATED else 0)
            offset += st.length

    def flush(self) -> None:
        layer = self.top
        while layer is not None:
            flush = getattr(layer, "flush", None)
            if flush is not None:
                flush()
            layer = layer.backing

    def close(self) -> None:
        layer = self.top
        while layer is not None:
            layer.close()
            layer = layer.backing
