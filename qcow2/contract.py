"""The block-device contract: what a disk offers to whoever serves it.

In the spirit of nbdkit's plugin API, a :class:`Disk` states its size, what
it can do (``can_*``), how its calls may overlap (:class:`ThreadModel`),
and offers read / read_sparse / extents / extent_map / bitmap / write /
write_zeroes / trim / flush / cache / close.  Every method and capability has a documented
default, so a small disk overrides only what it really does.  Raw files and
qcow2 chains look alike through it; the server asks it and nothing else.

Errors are ``OSError`` with the errno a client should see (EIO, ENOSPC,
EPERM, ENOTSUP for a fast zero that would be slow, ...).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

Buffer = bytes | bytearray | memoryview
SparseRun = tuple[int, int, Buffer | None]  # (offset, length, bytes); None: the run reads as zeros
ZERO_WRITE_CHUNK = 1 << 20


class ThreadModel(IntEnum):
    """How calls to one disk may overlap; the caller (the server) enforces it.

    Calls are grouped into *reads* (read, read_sparse, extents, extent_map, cache),
    *flush*, and *writes* (write, write_zeroes, trim, resize); close comes
    after everything else.
    """

    SERIALIZE_ALL_REQUESTS = 1
    """One call at a time, from any thread."""

    PARALLEL_READS = 2
    """Reads side by side with each other and with a flush; a write, or a
    second flush, only alone."""

    PARALLEL = 3
    """Any calls at once: the disk needs no help."""


class WouldBlock(BlockingIOError):
    """A read made under :data:`without_waiting` would have to wait for the device."""


class _WithoutWaiting(threading.local):
    """``with without_waiting:`` -- reads in this thread raise :class:`WouldBlock` instead of
    waiting for the device.

    For an event loop that tries a read itself before handing it to a thread:
    data in the page cache is served at once, anything else is refused before
    it could stall the loop.  A disk that cannot tell simply reads.  Reads are
    free of side effects, so a refused one can be retried anywhere.  (A class,
    not a generator: it sits on the path of every small read.)
    """

    depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


without_waiting = _WithoutWaiting()


def waiting_allowed() -> bool:
    return not without_waiting.depth


class Access(IntEnum):
    """The group a call belongs to, for the thread model."""

    READ = 0
    FLUSH = 1
    WRITE = 2


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one status, as the whole disk sees it.

    ``data``: false means a hole (NBD_STATE_HOLE).  ``zero``: reads as zeros
    (NBD_STATE_ZERO).  ``depth``: 1 = allocated in the top layer, 2 = in its
    backing file, ...; 0 = allocated nowhere in the chain.
    """

    length: int
    data: bool
    zero: bool
    depth: int


def read_plan(extents: Iterable[Extent], offset: int, length: int) -> list[tuple[int, int, bool]]:
    """Split a read into runs ``(offset, length, zero)``; neighbours of one kind merge.

    Where the extents describe less than asked, the rest counts as data.
    """
    runs: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    for e in extents:
        n = min(e.length, end - pos)
        if n <= 0:
            if pos >= end:
                break
            continue
        if runs and runs[-1][2] == e.zero:
            start, size, zero = runs[-1]
            runs[-1] = (start, size + n, zero)
        else:
            runs.append((pos, n, e.zero))
        pos += n
    if pos < end:
        if runs and not runs[-1][2]:
            start, size, _ = runs[-1]
            runs[-1] = (start, size + end - pos, False)
        else:
            runs.append((pos, end - pos, False))
    return runs


EXTENT_DATA = 1  # ExtentMap.flags bits
EXTENT_ZERO = 2


@dataclass(frozen=True)
class ExtentMap:
    """Consecutive extents as numpy arrays, for callers that describe many at once.

    Extent ``i`` covers ``bounds[i] .. bounds[i+1]`` (int64, one more than
    extents); ``flags[i]`` holds :data:`EXTENT_DATA` / :data:`EXTENT_ZERO`
    (uint8); ``depth[i]`` is :attr:`Extent.depth` (uint32).
    """

    bounds: object
    flags: object
    depth: object

    @classmethod
    def of(cls, extents: Iterable[Extent], offset: int) -> ExtentMap:
        import numpy as np  # only maps need numpy; start-up does not

        bounds, flags, depth = [offset], [], []
        for e in extents:
            bounds.append(bounds[-1] + e.length)
            flags.append((EXTENT_DATA if e.data else 0) | (EXTENT_ZERO if e.zero else 0))
            depth.append(e.depth)
        return cls(np.array(bounds, np.int64), np.array(flags, np.uint8), np.array(depth, np.uint32))

    @property
    def end(self) -> int:
        return int(self.bounds[-1])

    def extents(self) -> Iterator[Extent]:
        lengths = (self.bounds[1:] - self.bounds[:-1]).tolist()
        for n, f, d in zip(lengths, self.flags.tolist(), self.depth.tolist(), strict=True):
            yield Extent(n, bool(f & EXTENT_DATA), bool(f & EXTENT_ZERO), d)


class BitmapError(LookupError):
    """A dirty bitmap that cannot be exported; the message says why, in QEMU's words."""


@dataclass(frozen=True)
class DirtyMap:
    """Consecutive runs of a dirty bitmap as arrays, for block status.

    Run ``i`` covers ``bounds[i] .. bounds[i+1]`` (int64, one more than runs);
    ``dirty[i]`` (uint32) is 1 where the bitmap says the bytes changed since it
    was cleared, else 0 -- the values of NBD's ``qemu:dirty-bitmap:`` context.
    """

    bounds: object
    dirty: object

    @property
    def end(self) -> int:
        return int(self.bounds[-1])


class Bitmap:
    """A persistent dirty bitmap of a disk, as :meth:`Disk.bitmap` hands it out.

    It follows the disk: writes through the disk set its bits while it is
    enabled.  :meth:`dirty_map` is a read (same thread-model group as
    :meth:`Disk.extent_map`).
    """

    name: str = ""

    def dirty_map(self, offset: int, length: int) -> DirtyMap:
        """Runs from ``offset`` covering at least one byte and at most ``length`` (callers ask
        again from where it ended).  Bytes past what the bitmap covers read as clean."""
        raise NotImplementedError


class Disk:
    """Base class and written contract of every disk; the defaults are those of a plain read-only disk.

    Subclasses set :attr:`size` and implement :meth:`read`; everything else
    is optional.  Offsets and lengths are bytes; callers keep every range
    inside ``[0, size)`` and respect :attr:`thread_model`.
    """

    size: int = 0

    #: How calls may overlap.  Default: one at a time.
    thread_model: ThreadModel = ThreadModel.SERIALIZE_ALL_REQUESTS

    #: write/write_zeroes/trim/resize may be called.  Default False: the disk is read-only.
    can_write: bool = False
    #: trim does something (a hint either way).  Default False.
    can_trim: bool = False
    #: write_zeroes is cheaper than writing zeros.  Default False (the default writes them).
    can_zero: bool = False
    #: write_zeroes(fast=True) answers ENOTSUP instead of writing zeros.  Default False.
    can_fast_zero: bool = False
    #: flush makes completed writes durable.  Default False.
    can_flush: bool = False
    #: writes accept fua=True (durable before returning).  Default False.
    can_fua: bool = False
    #: cache prefetches.  Default False (cache is then a no-op).
    can_cache: bool = False
    #: every handle of this disk sees every other handle's completed writes, and a
    #: flush through one covers all (NBD_FLAG_CAN_MULTI_CONN).  Default False.
    can_multi_conn: bool = False
    #: extents tells holes, zeros and depths apart.  Default False (everything is data, depth 1).
    can_extents: bool = False
    #: the smallest request the disk wants (advertised to clients).  Default 1 byte.
    min_block_size: int = 1

    # -- reads ----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        """The bytes at ``offset`` in a buffer the caller may keep.  Required.

        Under :data:`without_waiting`, reads (read, readinto, read_sparse,
        extents, cache) may raise :class:`WouldBlock`.
        """
        raise NotImplementedError

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``.  Default: copies :meth:`read`."""
        buf[:] = self.read(offset, len(buf))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Consecutive extents from ``offset`` covering exactly ``length`` bytes (neighbours may
        share a status; callers merge).  Default: one data extent at depth 1."""
        yield Extent(length, True, False, 1)

    def extent_map(self, offset: int, length: int) -> ExtentMap:
        """Extents from ``offset`` as arrays, covering at least one byte and at most ``length``:
        as much as the disk describes cheaply in one go (callers ask again from
        where it ended).  Default: :meth:`extents` of the whole range."""
        return ExtentMap.of(self.extents(offset, length), offset)

    def read_sparse(self, offset: int, length: int) -> list[SparseRun]:
        """The range as runs of data (a buffer) and runs that read as zeros (None).

        Default: :meth:`extents` for the zeros, :meth:`read` for the rest (two
        walks); a disk that can tell both in one walk overrides it.
        """
        return [
            (start, size, None if zero else self.read(start, size))
            for start, size, zero in read_plan(self.extents(offset, length), offset, length)
        ]

    def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (a hint).  Default: nothing."""

    def bitmap(self, name: str) -> Bitmap:
        """The persistent dirty bitmap ``name``, searched from the top of a chain down, as
        qemu-nbd ``-B`` finds it.  Raises :class:`BitmapError` when there is none, or it
        cannot be trusted.  Default: no bitmaps."""
        raise BitmapError(f"Bitmap '{name}' is not found")

    # -- writes -----------------------------------------------------------------------

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; ``fua``: durable before returning.  Default: EROFS."""
        raise OSError(errno.EROFS, "the disk is read-only")

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """Make the range read as zeros.

        ``may_unmap``: holes are allowed (NBD: no NO_HOLE flag).  ``fast``: answer
        ENOTSUP, before changing anything, where zeroing means writing zero
        bytes (NBD FAST_ZERO).  Default: ENOTSUP when fast, else zero bytes
        through :meth:`write`.
        """
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing needs data writes")
        zeros = memoryview(bytes(min(length, ZERO_WRITE_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            self.write(offset, zeros[:n], fua=fua and offset + n == end)
            offset += n

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range (a hint: what it reads afterwards is up to the disk).  Default: nothing."""

    def flush(self) -> None:
        """Make every completed write durable.  Default: nothing."""

    def resize(self, size: int) -> None:
        """A new size.  Default: ENOTSUP."""
        raise OSError(errno.ENOTSUP, "this disk cannot be resized")

    def close(self) -> None:
        """Flush what must be flushed and release the disk.  Default: nothing."""
