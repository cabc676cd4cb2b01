"""What one export offers: its flags, its metadata contexts, its extent maths.

Everything here is pure: it turns a disk's capabilities (the
:class:`qcow2.contract.Disk` contract) into transmission flags and a disk's
:class:`~qcow2.contract.Extent` stream into NBD block-status descriptors.
No sockets, no asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from qcow2.contract import EXTENT_DATA, EXTENT_ZERO, Disk, Extent, ExtentMap

from .constants import (
    CTX_ALLOCATION_DEPTH,
    CTX_BASE_ALLOCATION,
    MAX_EXTENTS,
    STATE_HOLE,
    STATE_ZERO,
    TFlag,
)
from .gate import RequestGate


@dataclass(frozen=True)
class StatusMapper:
    """How extents read in one metadata context: one at a time, and as whole arrays."""

    one: Callable[[Extent], int]
    many: Callable[[ExtentMap], object]  # -> status per extent (numpy, uint32)


def base_allocation(e: Extent) -> int:
    return (0 if e.data else STATE_HOLE) | (STATE_ZERO if e.zero else 0)


def allocation_depth(e: Extent) -> int:
    return e.depth


def base_allocation_many(m: ExtentMap):
    f = m.flags.astype("uint32")
    return ((f & EXTENT_DATA) ^ EXTENT_DATA) * STATE_HOLE | (f & EXTENT_ZERO) // EXTENT_ZERO * STATE_ZERO


def allocation_depth_many(m: ExtentMap):
    return m.depth


# Context name -> how an extent's status reads in that context.
CONTEXTS: dict[str, StatusMapper] = {
    CTX_BASE_ALLOCATION: StatusMapper(base_allocation, base_allocation_many),
    CTX_ALLOCATION_DEPTH: StatusMapper(allocation_depth, allocation_depth_many),
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
    """A disk under a name; capabilities come from the disk's contract, not from here.

    ``multi_conn``: more than one client may connect (with ``-e 1`` a second
    connection would only wait, so CAN_MULTI_CONN must not invite one).
    """

    name: str
    disk: Disk
    description: str = ""
    multi_conn: bool = True
    gate: RequestGate = field(init=False, repr=False)
    # Kept by the event loop, read by workers: is anyone else using this export right now?
    connections: int = field(default=0, init=False)  # clients in the transmission phase
    in_workers: int = field(default=0, init=False)  # requests handed to worker threads, not answered

    def worker_done(self, _task: object = None) -> None:
        self.in_workers -= 1

    def contended(self) -> bool:
        """Another client, or another request waiting or running: long work should let it in."""
        return self.connections > 1 or self.in_workers > 1

    def __post_init__(self) -> None:
        self.gate = RequestGate(self.disk.thread_model)

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def writable(self) -> bool:
        return self.disk.can_write

    def transmission_flags(self, structured: bool) -> TFlag:
        """Flags for this export on a connection that did (not) negotiate structured replies.

        CAN_MULTI_CONN needs a disk that promises it (every connection shares
        one disk object in one process, so a flush on any covers all) and a
        server that lets a second client in.
        """
        disk = self.disk
        flags = TFlag.HAS_FLAGS
        if disk.can_cache:
            flags |= TFlag.SEND_CACHE
        if disk.can_flush:
            flags |= TFlag.SEND_FLUSH
        if disk.can_fua:
            flags |= TFlag.SEND_FUA
        if disk.can_multi_conn and self.multi_conn:
            flags |= TFlag.CAN_MULTI_CONN
        if structured:
            flags |= TFlag.SEND_DF
        if not self.writable:
            return flags | TFlag.READ_ONLY
        if disk.can_trim:
            flags |= TFlag.SEND_TRIM
        flags |= TFlag.SEND_WRITE_ZEROES  # without can_zero the disk writes zero bytes
        if disk.can_fast_zero:
            flags |= TFlag.SEND_FAST_ZERO
        return flags


Descriptors = list[tuple[int, int]]  # (length, status)


def _as_mapper(mapper: StatusMapper | Callable[[Extent], int]) -> StatusMapper:
    if isinstance(mapper, StatusMapper):
        return mapper
    import numpy as np

    return StatusMapper(mapper, lambda m: np.array([mapper(e) for e in m.extents()], np.uint32))


class BlockStatusReply:
    """Descriptors per context for one BLOCK_STATUS request, built from extent maps.

    Equal neighbours merge; each context stops at ``limit`` descriptors (or at
    one with ``req_one``), and :attr:`complete` turns true as soon as every
    context is full or the request's ``length`` is covered, so REQ_ONE on a
    huge range stays cheap.  Totals never exceed ``length`` (the last extent
    is clipped to the request, as qemu-nbd does).  The descriptors stay numpy
    arrays up to the wire.
    """

    def __init__(
        self,
        length: int,
        mappers: Sequence[StatusMapper | Callable[[Extent], int]],
        req_one: bool = False,
        limit: int = MAX_EXTENTS,
    ) -> None:
        self.length = length
        self.mappers = [_as_mapper(m) for m in mappers]
        self.cap = 1 if req_one else limit
        self._lengths: list[list] = [[] for _ in mappers]  # per context: numpy chunks
        self._status: list[list] = [[] for _ in mappers]
        self._count = [0] * len(mappers)
        self._open = [True] * len(mappers)
        self.done = 0  # bytes described
        self.complete = not mappers or length <= 0

    def take_map(self, m: ExtentMap) -> None:
        """Take the extents of one map (in order, from where the reply ended)."""
        import numpy as np

        if self.complete:
            return
        lengths = m.bounds[1:] - m.bounds[:-1]
        remaining = self.length - self.done
        covered = np.cumsum(lengths)
        if len(covered) and covered[-1] >= remaining:
            k = int(np.searchsorted(covered, remaining))
            lengths = lengths[: k + 1].copy()
            lengths[k] -= covered[k] - remaining
        keep = lengths > 0
        if not keep.all():
            lengths = lengths[keep]
        if not len(lengths):
            return
        for i, mapper in enumerate(self.mappers):
            if not self._open[i]:
                continue
            status = mapper.many(m)
            if not keep.all():
                status = status[: len(keep)][keep]
            status = status[: len(lengths)]
            starts = np.concatenate(([0], np.flatnonzero(status[1:] != status[:-1]) + 1))
            runs, values = np.add.reduceat(lengths, starts), status[starts]
            if self._count[i] and self._status[i][-1][-1] == values[0]:
                self._lengths[i][-1][-1] += runs[0]
                runs, values = runs[1:], values[1:]
            room = self.cap - self._count[i]
            if len(runs) > room:
                runs, values = runs[:room], values[:room]
                self._open[i] = False
            if len(runs):
                self._lengths[i].append(runs.astype(np.int64))
                self._status[i].append(values.astype(np.uint32))
                self._count[i] += len(runs)
        self.done += int(lengths.sum())
        if self.done >= self.length or not any(self._open):
            self.complete = True

    def take(self, extents: Iterator[Extent], max_count: int = 1 << 62) -> int:
        """Take extents one at a time (in batches of 1, 1, 2, 4, ... up to 4096, so that
        REQ_ONE pulls no more than it needs); returns how many were taken."""
        taken, batch = 0, 1
        first = True
        while not self.complete and taken < max_count:
            chunk = list(islice(extents, min(batch, max_count - taken)))
            if not chunk:
                break
            self.take_map(ExtentMap.of(chunk, 0))
            taken += len(chunk)
            if not first:
                batch = min(batch * 2, 4096)
            first = False
        return taken

    def arrays(self, i: int) -> tuple[object, object]:
        """Context ``i``'s descriptors: (lengths, statuses) as numpy arrays."""
        import numpy as np

        if not self._lengths[i]:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        return np.concatenate(self._lengths[i]), np.concatenate(self._status[i])

    @property
    def descriptors(self) -> list[Descriptors]:
        out = []
        for i in range(len(self.mappers)):
            lengths, status = self.arrays(i)
            out.append(list(zip(lengths.tolist(), status.tolist(), strict=True)))
        return out


def block_status(
    extents: Iterable[Extent],
    length: int,
    mappers: Sequence[Callable[[Extent], int]],
    req_one: bool = False,
    limit: int = MAX_EXTENTS,
) -> list[Descriptors]:
    """Descriptors per context for ``length`` bytes described by ``extents`` (see BlockStatusReply)."""
    reply = BlockStatusReply(length, mappers, req_one, limit)
    reply.take(iter(extents))
    return reply.descriptors
