"""Block status the way QEMU's block layer computes it.

A layer's driver answers for one range with flags (below), a byte count it
vouches for (``pnum``), and, with ``OFFSET_VALID``, where the bytes live on the
host.  :func:`layer_status` adds what QEMU's generic layer adds
(``bdrv_co_block_status``): ALLOCATED, zeros past a short backing file, the
metadata-preallocation recursion into the host file.  :func:`status_above`
walks a backing chain (``bdrv_co_common_block_status_above``) and tells the
depth at which a range was decided.  Values equal QEMU's ``BDRV_BLOCK_*`` bits.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

DATA = 0x01
ZERO = 0x02
OFFSET_VALID = 0x04
ALLOCATED = 0x10
EOF = 0x20
RECURSE = 0x40


class Status(NamedTuple):
    flags: int
    length: int
    host_offset: int  # meaningful only with OFFSET_VALID
    file: Layer | None  # host file holding the bytes (for OFFSET_VALID)


class Layer(Protocol):
    """One node of a chain: a format over a host file, or the host file itself."""

    filename: str
    size: int  # what QEMU's bdrv_getlength says for this node
    backing: Layer | None
    supports_backing: bool
    map_window: int  # bytes one status_runs call should cover at most (bounded work)

    def driver_status(self, offset: int, length: int, want_zero: bool) -> Status:
        """The driver's own answer for ``[offset, offset+length)`` (length > 0, in range)."""

    def readinto(self, offset: int, buf: memoryview) -> None: ...

    def status_runs(self, start: int, end: int):
        """This layer's status over ``[start, end)`` (end <= size) as arrays, see
        :mod:`qcow2.extentmap`: (bounds, codes), code 0 where the layer does not
        allocate, else its DATA / ZERO bits with ALLOCATED."""


def layer_status(layer: Layer, offset: int, length: int, want_zero: bool = True) -> Status:
    """Status of one layer, with the generic block layer's additions."""
    size = layer.size
    if offset >= size:
        return Status(EOF, 0, 0, None)
    if offset + length > size:
        length = size - offset
    st = layer.driver_status(offset, length, want_zero)
    flags, pnum = st.flags, st.length
    if pnum > length:
        pnum = length
    if flags & (DATA | ZERO):
        flags |= ALLOCATED
    elif layer.supports_backing:
        backing = layer.backing
        if backing is None or (want_zero and offset >= backing.size):
            flags |= ZERO
    host, file = st.host_offset, st.file
    if (
        want_zero
        and flags & RECURSE
        and file is not None
        and file is not layer
        and flags & (DATA | ZERO | OFFSET_VALID) == DATA | OFFSET_VALID
    ):
        sub = layer_status(file, host, pnum, want_zero)
        if sub.flags & EOF and (sub.length == 0 or sub.flags & ZERO):
            flags |= ZERO
        else:
            pnum = sub.length
            flags |= sub.flags & ZERO
    flags &= ~(RECURSE | EOF)
    if offset + pnum == size:
        flags |= EOF
    return Status(flags, pnum, host, file)


def status_above(top: Layer, offset: int, length: int, want_zero: bool = True) -> tuple[Status, int]:
    """Status over the whole chain under ``top`` and the 1-based depth that decided it.

    Mirrors ``bdrv_co_common_block_status_above(top, NULL, ...)``: a range no
    layer allocates comes back without ALLOCATED; a range past the end of a
    short backing file counts as zeros allocated in that backing layer.
    """
    st = layer_status(top, offset, length, want_zero)
    depth = 1
    if st.length == 0 or st.flags & ALLOCATED:
        return st, depth
    eof = offset + st.length if st.flags & EOF else -1
    length = st.length
    layer = top.backing
    while layer is not None:
        st = layer_status(layer, offset, length, want_zero)
        depth += 1
        if st.length == 0:
            st = Status(ZERO | ALLOCATED, length, 0, layer)
            break
        if st.flags & ALLOCATED:
            st = st._replace(flags=st.flags & ~EOF)
            break
        length = st.length
        layer = layer.backing
    if offset + st.length == eof:
        st = st._replace(flags=st.flags | EOF)
    return st, depth
