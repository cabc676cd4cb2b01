"""What one export offers: its flags, its metadata contexts, its extent maths.

Everything here is pure: it turns a disk's capabilities into transmission
flags and a disk's :class:`~qcow2.device.Extent` stream into NBD block-status
descriptors or READ chunk plans.  No sockets, no asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qcow2.device import Disk, Extent

from .constants import (
    CTX_ALLOCATION_DEPTH,
    CTX_BASE_ALLOCATION,
    MAX_EXTENTS,
    STATE_HOLE,
    STATE_ZERO,
    TFlag,
)


def base_allocation(e: Extent) -> int:
    return (0 if e.data else STATE_HOLE) | (STATE_ZERO if e.zero else 0)


def allocation_depth(e: Extent) -> int:
    return e.depth


# Context name -> how an extent's status reads in that context.
CONTEXTS: dict[str, Callable[[Extent], int]] = {
    CTX_BASE_ALLOCATION: base_allocation,
    CTX_ALLOCATION_DEPTH: allocation_depth,
}


def list_contexts(queries: Sequence[str]) -> list[str]:
    """Contexts matching LIST_META_CONTEXT queries; ``ns:`` is a namespace wildcard.

    No queries means every context.  Unknown namespaces and leaves match nothing.
    """
    if not queries:
        return list(CONTEXTS)
    found: list[str] = []
    for name in CONTEXTS:
        namespace = name.split(":", 1)[0] + ":"
        if any(q == name or q == namespace for q in queries):
            found.append(name)
    return found


def select_contexts(queries: Sequence[str]) -> list[str]:
    """Contexts SET_META_CONTEXT selects: exact names only (wildcards select nothing)."""
    return [name for name in CONTEXTS if name in queries]


@dataclass
class Export:
    """A disk under a name; capabilities come from the disk, not from here."""

    name: str
    disk: Disk
    description: str = ""

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def writable(self) -> bool:
        return not self.disk.read_only and bool(getattr(self.disk, "can_write", False))

    def transmission_flags(self, structured: bool) -> TFlag:
        """Flags for this export on a connection that did (not) negotiate structured replies.

        CAN_MULTI_CONN holds because every connection shares one Disk object
        in one process: a flush on any connection covers them all.
        """
        flags = TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_CACHE | TFlag.CAN_MULTI_CONN
        if structured:
            flags |= TFlag.SEND_DF
        if not self.writable:
            return flags | TFlag.READ_ONLY
        disk = self.disk
        if getattr(disk, "can_trim", False):
            flags |= TFlag.SEND_TRIM
        if getattr(disk, "can_zero", False):
            flags |= TFlag.SEND_WRITE_ZEROES
            if getattr(disk, "can_fast_zero", False):
                flags |= TFlag.SEND_FAST_ZERO
        return flags


Descriptors = list[tuple[int, int]]  # (length, status)


def block_status(
    extents: Iterable[Extent],
    length: int,
    mappers: Sequence[Callable[[Extent], int]],
    req_one: bool = False,
    limit: int = MAX_EXTENTS,
) -> list[Descriptors]:
    """Descriptors per context for a range of ``length`` bytes starting at the extents' start.

    Equal neighbours merge; each context stops at ``limit`` descriptors (or at
    one with ``req_one``), and the pass over the disk stops as soon as every
    context is complete, so REQ_ONE on a huge range stays cheap.  Totals never
    exceed ``length``: the caller asks the disk for the request range only,
    which also keeps the last extent inside the export (as qemu-nbd does).
    """
    cap = 1 if req_one else limit
    out: list[Descriptors] = [[] for _ in mappers]
    open_ = [True] * len(mappers)
    remaining = len(mappers)
    done = 0
    for e in extents:
        n = min(e.length, length - done)
        if n <= 0:
            continue
        for i, mapper in enumerate(mappers):
            if not open_[i]:
                continue
            status = mapper(e)
            d = out[i]
            if d and d[-1][1] == status:
                d[-1] = (d[-1][0] + n, status)
            elif len(d) < cap:
                d.append((n, status))
            else:
                open_[i] = False
                remaining -= 1
        if remaining == 0:
            break
        done += n
        if done >= length:
            break
    return out


def read_plan(extents: Iterable[Extent], offset: int, length: int) -> list[tuple[int, int, bool]]:
    """Split a READ into runs ``(offset, length, zero)``: zero runs become OFFSET_HOLE chunks.

    Adjacent runs of the same kind merge, so neighbouring data extents go out
    as one OFFSET_DATA chunk.
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
    if pos < end:  # the disk described less than asked: read the rest as data
        if runs and not runs[-1][2]:
            start, size, _ = runs[-1]
            runs[-1] = (start, size + end - pos, False)
        else:
            runs.append((pos, end - pos, False))
    return runs
