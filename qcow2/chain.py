"""A whole chain (an image and its backing files) as one :class:`~qcow2.contract.Disk`.

Thread model.  A raw file is PARALLEL: positioned reads and writes need no
help.  A qcow2 chain is PARALLEL_READS: reads, sparse reads, block status
and cache run side by side in any number of threads (the host preads release
the GIL, the table caches take a short mutex), and beside a flush, which
changes no mapping (it writes back what the last write left, and frees only
clusters no mapping names any more).  Writes, zero writes, trims and resizes
run alone, because they change L2 entries and refcounts in place and may
free or reuse clusters a concurrent read could still be reading.  The server
enforces this (``nbdserver.gate``); a single-threaded caller needs nothing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from .contract import Bitmap, BitmapError, Buffer, Disk, Extent, ExtentMap, SparseRun, ThreadModel
from .hostfile import HostFile
from .image import Qcow2Image
from .status import ALLOCATED, DATA, OFFSET_VALID, ZERO, Layer, status_above


class RawWriter:
    """The write side of a raw top layer: the host file itself.

    ``probed``: the format was guessed, not given.  Then, as QEMU's raw
    driver does, no write may make the first sector announce another format
    (:mod:`qcow2.format.probe`): EPERM, and nothing is written.
    """

    def __init__(self, file: HostFile, probed: bool = False) -> None:
        self.file = file
        self.probed = probed

    def _guard_first_sector(self, offset: int, data: Buffer | None, length: int) -> None:
        """The sector as the write would leave it (zeros for ``data=None``) must still probe as raw."""
        from .format.probe import PROBE_SIZE, announced_format

        sector = bytearray(self.file.pread(0, PROBE_SIZE))
        end = min(offset + length, PROBE_SIZE)
        sector[offset:end] = bytes(end - offset) if data is None else memoryview(data)[: end - offset]
        fmt = announced_format(sector)
        if fmt is not None:
            raise OSError(
                errno.EPERM,
                f"refused: the write would make the first sector of a probed raw image a {fmt} header "
                "(give the format explicitly, -f raw, to allow it)",
            )

    def write(self, offset: int, data: Buffer) -> None:
        if self.probed and offset < 512:
            self._guard_first_sector(offset, data, len(data))
        self.file.write(offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False, fast: bool = False) -> None:
        if self.probed and offset < 512:
            self._guard_first_sector(offset, None, length)
        self.file.write_zeroes(offset, length, may_unmap, fast)

    def trim(self, offset: int, length: int) -> None:
        self.file.trim(offset, length)

    def resize(self, size: int) -> None:
        self.file.resize(size)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.flush()


class ChainDisk(Disk):
    """The top layer of a chain seen as one disk; ``writer`` is None when read-only."""

    can_flush = can_fua = can_cache = can_multi_conn = can_extents = True

    def __init__(self, top: Layer, writer=None, shared: Layer | None = None) -> None:
        self.top = top
        self.writer = writer
        self.shared = shared  # a layer of the chain that others use too: close leaves it open
        self.thread_model = ThreadModel.PARALLEL if isinstance(top, HostFile) else ThreadModel.PARALLEL_READS
        window, layer = top.map_window, top
        while layer is not None:  # one window is cheap on every layer
            window = min(window, layer.map_window)
            layer = layer.backing
        self.map_window = window

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def can_write(self) -> bool:
        return self.writer is not None

    can_trim = can_zero = can_fast_zero = can_write

    # -- reads ----------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.top.readinto(offset, buf)

    def read(self, offset: int, length: int) -> Buffer:
        """Guest bytes in a buffer of their own (often filled by the kernel without a copy)."""
        return self.top.read(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = min(offset + length, self.top.size)
        while offset < end:
            m = self.extent_map(offset, end - offset)
            yield from m.extents()
            offset = m.end

    def extent_map(self, offset: int, length: int) -> ExtentMap:
        """One window of the chain (see :mod:`qcow2.extentmap`): whole L2 tables of every
        layer classified at once, the layers merged by array operations."""
        from .extentmap import merge_chain  # numpy: loaded with the first map, not at start-up

        end = min(offset + length, self.top.size, offset + self.map_window)
        return ExtentMap(*merge_chain(self.top, offset, end))

    def read_sparse(self, offset: int, length: int) -> list[SparseRun]:
        """One walk of the mapping for both questions: where the zeros are, and where the data lives.

        A run with data at a known host offset is read straight from the file
        that holds it (the layer that decided, at whatever depth); other data
        (compressed clusters) is read through that layer.  Neighbouring data
        runs share one buffer, so they leave as one chunk.
        """
        top = self.top
        end = offset + length
        runs: list[SparseRun] = []
        pending: list[tuple[int, int, object, int, int]] = []  # data runs not read yet
        pos = offset
        while pos < end:
            st, depth = status_above(top, pos, end - pos)
            n = st.length
            flags = st.flags
            if n <= 0:  # past every layer's end: the rest reads as data, through the top
                pending.append((pos, end - pos, None, 0, 0))
                break
            if flags & ZERO:
                if pending:
                    runs.append(self._read_runs(pending))
                    pending = []
                if runs and runs[-1][2] is None:
                    start, size, _ = runs[-1]
                    runs[-1] = (start, size + n, None)
                else:
                    runs.append((pos, n, None))
            elif flags & DATA and flags & OFFSET_VALID and st.file is not None:
                if n == length:  # one run of data for the whole request: the usual case
                    return [(offset, length, st.file.pread(st.host_offset, length))]
                pending.append((pos, n, st.file, st.host_offset, 0))
            else:
                pending.append((pos, n, None, 0, depth if flags & ALLOCATED else 1))
            pos += n
        if pending:
            runs.append(self._read_runs(pending))
        return runs

    def _read_runs(self, pending: list[tuple[int, int, object, int, int]]) -> SparseRun:
        start = pending[0][0]
        total = sum(p[1] for p in pending)
        if len(pending) == 1 and pending[0][2] is not None:
            _, n, file, host, _ = pending[0]
            return start, n, file.pread(host, n)
        buf = bytearray(total)
        view = memoryview(buf)
        for pos, n, file, host, depth in pending:
            part = view[pos - start : pos - start + n]
            if file is not None:
                file.readinto(host, part)
            else:
                self._layer(depth).readinto(pos, part)
        return start, total, buf

    def _layer(self, depth: int) -> Layer:
        layer = self.top
        for _ in range(max(depth, 1) - 1):
            layer = layer.backing
        return layer

    def cache(self, offset: int, length: int) -> None:
        """Ask the kernel to read ahead the host ranges that hold the range's data (a remote
        backing file is left alone: the hint is for the local page cache)."""
        end = min(offset + length, self.top.size)
        while offset < end:
            st, _ = status_above(self.top, offset, end - offset)
            if st.length <= 0:
                return
            if st.flags & DATA and st.flags & OFFSET_VALID and isinstance(st.file, HostFile):
                try:
                    os.posix_fadvise(st.file.fd, st.host_offset, st.length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return  # a hint
            offset += st.length

    def bitmap(self, name: str) -> Bitmap:
        """The first layer from the top with a bitmap of that name has it (qemu-nbd ``-B``);
        one that was not stored cleanly (in use at open) is refused, in QEMU's words."""
        from .dirtymap import ImageBitmap

        layer: Layer | None = self.top
        while layer is not None:
            found = layer.meta.bitmaps.find(name) if isinstance(layer, Qcow2Image) else None
            if found is not None:
                if found.inconsistent:
                    raise BitmapError(f"Bitmap '{name}' is inconsistent and cannot be used")
                return ImageBitmap(found)
            layer = layer.backing
        raise BitmapError(f"Bitmap '{name}' is not found")

    # -- writes ---------------------------------------------------------------------

    def _writer(self, offset: int = 0, length: int = 0):
        if self.writer is None:
            raise OSError(errno.EPERM, "the disk is read-only")
        if offset < 0 or length < 0 or offset + length > self.top.size:
            raise OSError(errno.ENOSPC, "request beyond the end of the disk")
        return self.writer

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
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
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Write everything back (and mark the image clean), then release every file of the chain."""
        try:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        finally:
            close_chain(self.top, self.shared)


def close_chain(layer: Layer | None, shared: Layer | None = None) -> None:
    """Close a layer and everything under it, down to ``shared`` (which stays open)."""
    while layer is not None and layer is not shared:
        layer.close()
        layer = layer.backing
