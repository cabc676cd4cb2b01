"""Block-status replies: a disk's extent maps turned into NBD descriptors, as arrays.

Pure, like :mod:`nbdserver.export`: per metadata context, equal neighbours
merge, a context stops at its descriptor cap, and the last extent is clipped
to the request.  The descriptors stay numpy arrays up to the wire.  Kept
apart so that numpy is loaded with the first map, not at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice

import numpy as np

from qcow2.contract import EXTENT_DATA, EXTENT_ZERO, DirtyMap, Extent, ExtentMap

from .constants import CTX_ALLOCATION_DEPTH, CTX_BASE_ALLOCATION, MAX_EXTENTS, STATE_HOLE, STATE_ZERO

Map = ExtentMap | DirtyMap  # a disk's extents, or a bitmap's runs
StatusOf = Callable[[Map], np.ndarray]  # a map -> the status of each of its runs


def base_allocation(m: ExtentMap) -> np.ndarray:
    hole = np.where(m.flags & EXTENT_DATA, 0, STATE_HOLE)
    return (hole | np.where(m.flags & EXTENT_ZERO, STATE_ZERO, 0)).astype(np.uint32)


def allocation_depth(m: ExtentMap) -> np.ndarray:
    return m.depth


def dirty_status(m: DirtyMap) -> np.ndarray:
    """qemu:dirty-bitmap:NAME, from a bitmap's own maps: NBD_STATE_DIRTY (1) where dirty."""
    return m.dirty


# Allocation context name -> how the extents of a disk's map read in that context.
STATUS_OF: dict[str, StatusOf] = {
    CTX_BASE_ALLOCATION: base_allocation,
    CTX_ALLOCATION_DEPTH: allocation_depth,
}


Descriptors = list[tuple[int, int]]  # (length, status)


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
        self, length: int, mappers: Sequence[StatusOf], req_one: bool = False, limit: int = MAX_EXTENTS
    ) -> None:
        self.length = length
        self.mappers = mappers
        self.cap = 1 if req_one else limit
        self._lengths: list[list] = [[] for _ in mappers]  # per context: numpy chunks
        self._status: list[list] = [[] for _ in mappers]
        self._count = [0] * len(mappers)
        self._open = [True] * len(mappers)
        self.done = 0  # bytes described
        self.complete = not mappers or length <= 0

    def take_map(self, m: Map) -> None:
        """Take the runs of one map (in order, from where the reply ended)."""
        if self.complete:
            return
        lengths = m.bounds[1:] - m.bounds[:-1]
        covered = np.cumsum(lengths)
        remaining = self.length - self.done
        if len(covered) and covered[-1] >= remaining:  # clip the last extent to the request
            k = int(np.searchsorted(covered, remaining))
            lengths = lengths[: k + 1].copy()
            lengths[k] -= covered[k] - remaining
        keep = None if (lengths > 0).all() else lengths > 0
        if keep is not None:
            lengths = lengths[keep]
        if not len(lengths):
            return
        for i, status_of in enumerate(self.mappers):
            if not self._open[i]:
                continue
            status = status_of(m)[: len(lengths) if keep is None else len(keep)]
            if keep is not None:
                status = status[keep]
            starts = np.concatenate(([0], np.flatnonzero(status[1:] != status[:-1]) + 1))
            runs, values = np.add.reduceat(lengths, starts), status[starts]
            if self._count[i] and self._status[i][-1][-1] == values[0]:  # joins the last one
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

    def arrays(self, i: int) -> tuple[object, object]:
        """Context ``i``'s descriptors: (lengths, statuses) as numpy arrays."""
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
    """Descriptors per context for ``length`` bytes described by ``extents``, with a status
    function per extent (see BlockStatusReply).  Extents are taken in batches of 1, 1, 2, 4,
    ... up to 4096, so that REQ_ONE pulls no more of them than it needs."""

    def per_extent(mapper: Callable[[Extent], int]) -> StatusOf:
        return lambda m: np.array([mapper(e) for e in m.extents()], np.uint32)

    reply = BlockStatusReply(length, [per_extent(f) for f in mappers], req_one, limit)
    extents, taken = iter(extents), 0
    while not reply.complete:
        batch = list(islice(extents, min(max(taken, 1), 4096)))
        if not batch:
            break
        reply.take_map(ExtentMap.of(batch, 0))
        taken += len(batch)
    return reply.descriptors
