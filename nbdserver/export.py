"""What one export offers: its flags, its metadata contexts, its extent maths.

Everything here is pure: it turns a disk's capabilities (the
:class:`qcow2.contract.Disk` contract) into transmission flags and a disk's
:class:`~qcow2.contract.Extent` stream into NBD block-status descriptors.
No sockets, no asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from qcow2.contract import Disk, Extent

from .constants import (
    CTX_ALLOCATION_DEPTH,
    CTX_BASE_ALLOCATION,
    MAX_EXTENTS,
    STATE_HOLE,
    STATE_ZERO,
    TFlag,
)
from .gate import RequestGate


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


class BlockStatusReply:
    """Descriptors per context for one BLOCK_STATUS request, built extent by extent.

    Equal neighbours merge; each context stops at ``limit`` descriptors (or at
    one with ``req_one``), and :attr:`complete` turns true as soon as every
    context is full or the request's ``length`` is covered, so REQ_ONE on a
    huge range stays cheap.  Totals never exceed ``length`` (the last extent
    is clipped to the request, as qemu-nbd does).
    """

    def __init__(
        self,
        length: int,
        mappers: Sequence[Callable[[Extent], int]],
        req_one: bool = False,
        limit: int = MAX_EXTENTS,
    ) -> None:
        self.length = length
        self.mappers = mappers
        self.cap = 1 if req_one else limit
        self.descriptors: list[Descriptors] = [[] for _ in mappers]
        self._open = [True] * len(mappers)
        self._remaining = len(mappers)
        self.done = 0  # bytes described
        self.complete = not mappers or length <= 0

    def add(self, e: Extent) -> bool:
        """Take the next extent; True once the reply is complete."""
        self.take(iter((e,)), 1)
        return self.complete

    def take(self, extents: Iterator[Extent], max_count: int, deadline: float = 0.0) -> int:
        """Take extents until the reply is complete, ``max_count`` were taken, or (checked
        every 64 extents) ``time.monotonic()`` passed ``deadline``; returns how many were taken."""
        if self.complete:
            return 0
        mappers, descriptors, is_open = self.mappers, self.descriptors, self._open
        cap, length, done = self.cap, self.length, self.done
        count = 0
        for e in extents:
            count += 1
            n = e.length
            if n > length - done:
                n = length - done
            if n <= 0:
                if e.length <= 0:
                    continue  # an empty extent says nothing
                self.complete = True
                break
            for i, mapper in enumerate(mappers):
                if not is_open[i]:
                    continue
                status = mapper(e)
                d = descriptors[i]
                if d and d[-1][1] == status:
                    d[-1] = (d[-1][0] + n, status)
                elif len(d) < cap:
                    d.append((n, status))
                else:
                    is_open[i] = False
                    self._remaining -= 1
            if self._remaining == 0:
                self.complete = True
                break
            done += n
            if done >= length:
                self.complete = True
                break
            if count >= max_count or (deadline and not count & 63 and time.monotonic() > deadline):
                break
        self.done = done
        return count


def block_status(
    extents: Iterable[Extent],
    length: int,
    mappers: Sequence[Callable[[Extent], int]],
    req_one: bool = False,
    limit: int = MAX_EXTENTS,
) -> list[Descriptors]:
    """Descriptors per context for ``length`` bytes described by ``extents`` (see BlockStatusReply)."""
    reply = BlockStatusReply(length, mappers, req_one, limit)
    reply.take(iter(extents), 1 << 62)
    return reply.descriptors
