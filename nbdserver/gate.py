"""The gate in front of one disk: admits calls as the disk's thread model allows.

A disk declares how its calls may overlap (:class:`qcow2.contract.ThreadModel`);
the server enforces it here, like nbdkit does for its plugins.  Calls come
in three groups (:class:`qcow2.contract.Access`): reads, flushes and
writes.  Under PARALLEL_READS any number of reads share the disk, a flush
may join them, and a write (or a second flush) waits until it is alone.

Entries are served in arrival order: once a call waits, later ones queue
behind it even if they could run, so a stream of reads cannot starve a
write.  The event loop never waits here: it only *tries* (``wait=False``)
and hands the request to a worker thread when the gate is busy; workers
wait.  Long work (a whole-disk block status) goes through the gate in
slices, so others get their turn in between.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from qcow2.contract import Access, ThreadModel

# Plain ints on the per-request path: an enum member costs an attribute lookup each time.
_READ, _FLUSH, _WRITE = int(Access.READ), int(Access.FLUSH), int(Access.WRITE)


class RequestGate:
    def __init__(self, model: ThreadModel) -> None:
        self.model = model
        self._parallel = model == ThreadModel.PARALLEL
        self._shared_reads = model == ThreadModel.PARALLEL_READS
        self._lock = threading.Lock()  # the fast path takes only this (C-level, no Python frames)
        self._cond = threading.Condition(self._lock)  # waiters sleep here
        self._readers = 0
        self._flushing = False
        self._writing = False
        self._queue: deque[tuple[object, Access]] = deque()

    def _admissible(self, access: Access) -> bool:
        if self._writing:
            return False
        if not self._shared_reads:
            return not (self._readers or self._flushing)
        if access == _READ:
            return True
        if access == _FLUSH:
            return not self._flushing
        return not (self._readers or self._flushing)

    def _admit(self, access: Access) -> None:
        if access == _READ:
            self._readers += 1
        elif access == _FLUSH:
            self._flushing = True
        else:
            self._writing = True

    def enter(self, access: Access, wait: bool = True) -> bool:
        """Admit a call; without ``wait``, False instead of waiting."""
        if self._parallel:
            return True
        with self._lock:
            if not self._queue:
                if access == _READ and self._shared_reads and not self._writing:
                    self._readers += 1  # the common cases, decided without another call
                    return True
                if access == _WRITE and not (self._writing or self._readers or self._flushing):
                    self._writing = True
                    return True
                if self._admissible(access):
                    self._admit(access)
                    return True
            if not wait:
                return False
            ticket = object()
            self._queue.append((ticket, access))
            self._cond.notify_all()  # for wait_for_waiters
            while self._queue[0][0] is not ticket or not self._admissible(access):
                self._cond.wait()
            self._queue.popleft()
            self._admit(access)
            if self._queue:
                self._cond.notify_all()  # the next in line may be able to join
            return True

    def leave(self, access: Access) -> None:
        if self._parallel:
            return
        with self._lock:
            if access == _READ:
                self._readers -= 1
            elif access == _FLUSH:
                self._flushing = False
            else:
                self._writing = False
            if self._queue:
                self._cond.notify_all()

    @contextmanager
    def entered(self, access: Access) -> Iterator[None]:
        """Hold the gate for one call (waiting for it: not on the event loop)."""
        self.enter(access)
        try:
            yield
        finally:
            self.leave(access)

    def wait_for_waiters(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` calls wait at the gate (tests, diagnostics)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= count, timeout)

    def busy(self) -> bool:
        """Anything admitted or waiting (for tests and diagnostics)."""
        with self._lock:
            return bool(self._readers or self._flushing or self._writing or self._queue)
