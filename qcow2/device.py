"""The block-device surface every layer and every whole disk offers.

The server sees only :class:`Disk`: a size, reads, and extents that say for
each byte range whether it holds data, reads as zeros, and at which depth of
the backing chain it is allocated (the NBD contexts ``base:allocation`` and
``qemu:allocation-depth``).  Raw files and qcow2 chains look alike here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one status, as the whole chain sees it.

    ``data``: false means a hole (NBD_STATE_HOLE).  ``zero``: reads as zeros
    (NBD_STATE_ZERO).  ``depth``: 1 = allocated in the top layer, 2 = in its
    backing file, ...; 0 = allocated nowhere in the chain.
    """

    length: int
    data: bool
    zero: bool
    depth: int


class Disk(Protocol):
    """What an export serves: one image with its whole backing chain."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the guest bytes at ``offset`` (``offset + len(buf) <= size``)."""

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The guest bytes at ``offset`` in a new buffer."""

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Consecutive extents from ``offset``, covering exactly ``length`` bytes.

        Neighbours may share a status (callers merge); never past ``size``.
        """

    # Writes (issue 3).  Errors are OSError with the errno the client should
    # see (ENOSPC, EIO, EPERM...).  ``fua``: durable before returning.

    @property
    def can_trim(self) -> bool: ...

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """Make the range read as zeros.

        ``may_unmap``: the client allows holes (NBD: no NO_HOLE flag).  ``fast``:
        fail with ENOTSUP instead of writing zero bytes (NBD FAST_ZERO).
        """

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard whole clusters in the range (a hint; partial clusters are kept)."""

    def flush(self) -> None: ...

    def close(self) -> None:
        """Flush, mark the image clean, release files."""
