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

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Consecutive extents from ``offset``, covering exactly ``length`` bytes.

        Neighbours may share a status (callers merge); never past ``size``.
        """

    def flush(self) -> None: ...

    def close(self) -> None: ...
