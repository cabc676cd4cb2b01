"""A persistent bitmap's bits read as runs of clean and dirty bytes, for block status.

QEMU's ``bitmap_to_extents``: a run changes where a granule's bit changes,
so dirty runs start and end on granule boundaries except where the request
clips them, and bytes past the end of what the bitmap covers (a bitmap of a
shorter backing file) read as clean.  One call looks at a bounded window of
granules; a clean window is told by one byte search, not by unpacking bits.
numpy is imported with the first map, as in :mod:`qcow2.extentmap`.
"""

from __future__ import annotations

import re

from .contract import Bitmap, DirtyMap
from .metadata.bitmaps import DirtyBitmap

WINDOW_GRANULES = 1 << 23  # bits looked at per call: 1 MiB of the bitmap
_NOT_CLEAR = re.compile(rb"[^\x00]")


def dirty_runs(
    bits: bytes | bytearray, granularity_bits: int, covered: int, offset: int, length: int
) -> DirtyMap:
    """Runs of ``bits`` (bit ``i`` = granule ``i``, least significant bit first) from ``offset``,
    for at most ``length`` bytes; ``covered`` is the number of guest bytes the bits describe."""
    import numpy as np

    end = offset + length
    if offset >= covered:
        return DirtyMap(np.array([offset, end], np.int64), np.zeros(1, np.uint32))
    g = granularity_bits
    first = offset >> g
    stop = min(end, covered, (first + WINDOW_GRANULES) << g)
    last = ((stop - 1) >> g) + 1  # granules first .. last-1
    b0, b1 = first >> 3, (last + 7) >> 3
    if _NOT_CLEAR.search(bits, b0, b1) is None:
        bounds, dirty = np.array([offset, stop], np.int64), np.zeros(1, np.uint32)
    else:
        flags = np.unpackbits(np.frombuffer(bits, np.uint8, b1 - b0, b0), bitorder="little")
        flags = flags[first - 8 * b0 : last - 8 * b0]
        change = np.flatnonzero(flags[1:] != flags[:-1]) + 1
        bounds = np.empty(len(change) + 2, np.int64)
        bounds[0], bounds[-1] = offset, stop
        bounds[1:-1] = (change + first) << g
        dirty = flags[np.concatenate(([0], change))].astype(np.uint32)
    if stop == covered < end:  # the rest lies past the bitmap: clean
        bounds = np.append(bounds, end)
        dirty = np.append(dirty, np.uint32(0))
    return DirtyMap(bounds, dirty)


class ImageBitmap(Bitmap):
    """A consistent bitmap of one image of a chain, read where the image keeps its bits.

    The image's owner replaces the bits on a resize, so they are looked up at
    every call, never kept here.
    """

    def __init__(self, bitmap: DirtyBitmap) -> None:
        self._bitmap = bitmap
        self.name = bitmap.name

    def dirty_map(self, offset: int, length: int) -> DirtyMap:
        b = self._bitmap
        return dirty_runs(b.bits, b.entry.granularity_bits, b.size, offset, length)
