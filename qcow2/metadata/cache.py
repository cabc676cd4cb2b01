"""A bounded cache of decoded metadata tables (L2 tables, refcount blocks).

Like QEMU's qcow2-cache.c: tables are kept decoded, a clean table is dropped
when the cache is full (least recently used first), and a dirty one stays
until its owner has written it in the image's write-back order.  Only the
owner (:class:`~qcow2.metadata.owner.ImageMetadata`) changes what is dirty.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TableCache(Generic[T]):
    """Tables by key (a host offset or a table index).

    A dirty entry remembers the span ``[first, end)`` changed since it was
    last written.  ``spill`` (optional) may write a dirty table so that it can
    be evicted: right for refcount blocks, whose changes may reach the file at
    any time; L2 tables get none and stay until :meth:`mark_clean`.

    Reader threads may look tables up at the same time: one mutex guards the
    maps, a miss loads outside it, and if two threads loaded the same table
    the first one inserted wins (so a table in the cache is never replaced by
    a copy read from the file).
    """

    def __init__(
        self, capacity: int, load: Callable[[int], T], spill: Callable[[int, T, int, int], None] | None = None
    ) -> None:
        self.capacity = max(1, capacity)
        self._load = load
        self._spill = spill
        self._lru: OrderedDict[int, T] = OrderedDict()  # evictable, least recently used first
        self._pinned: dict[int, T] = {}  # dirty tables that cannot be spilled
        self._dirty: dict[int, list[int]] = {}  # key -> changed span, for every dirty table
        self._mutex = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def get(self, key: int) -> T:
        """The table, loaded (clean) on a miss.

        A hit takes no mutex: each dict operation is atomic, a table moving
        between the two maps is found again under the mutex below, and a table
        evicted between the lookup and the move to the end is simply not moved.
        """
        table = self._pinned.get(key)
        if table is not None:
            return table
        table = self._lru.get(key)
        if table is not None:
            try:
                self._lru.move_to_end(key)
            except KeyError:
                pass
            return table
        with self._mutex:
            table = self._pinned.get(key) or self._lru.get(key)
            if table is not None:
                return table
        table = self._load(key)
        with self._mutex:
            present = self._pinned.get(key) or self._lru.get(key)
            if present is not None:
                return present
            self._lru[key] = table
            self._evict()
        return table

    def cached(self, key: int) -> T | None:
        with self._mutex:
            table = self._pinned.get(key)
            return table if table is not None else self._lru.get(key)

    def insert(self, key: int, table: T, dirty: tuple[int, int] | None = None) -> None:
        """A table made in memory (a new one, or one just written): replaces any cached copy."""
        with self._mutex:
            self._lru.pop(key, None)
            self._pinned.pop(key, None)
            self._dirty.pop(key, None)
            if dirty is not None:
                self._dirty[key] = list(dirty)
                if self._spill is None:
                    self._pinned[key] = table
                    return
            self._lru[key] = table
            self._evict()

    def mark_dirty(self, key: int, first: int, end: int) -> bool:
        """Widen the changed span of a cached table; True if it was clean before."""
        with self._mutex:
            span = self._dirty.get(key)
            if span is not None:
                if first < span[0]:
                    span[0] = first
                if end > span[1]:
                    span[1] = end
                return False
            self._dirty[key] = [first, end]
            if self._spill is None:
                table = self._lru.pop(key, None)
                if table is None:
                    del self._dirty[key]
                    raise KeyError(f"table {key:#x} is not cached")
                self._pinned[key] = table
            return True

    def discard(self, key: int) -> None:
        """Forget a table (its cluster is being freed): nothing of it is written any more."""
        with self._mutex:
            self._lru.pop(key, None)
            self._pinned.pop(key, None)
            self._dirty.pop(key, None)

    def dirty_entries(self) -> list[tuple[int, T, int, int]]:
        """(key, table, first, end) of every dirty table, by key."""
        with self._mutex:
            out = []
            for key, span in sorted(self._dirty.items()):
                table = self._pinned.get(key)
                out.append((key, table if table is not None else self._lru[key], span[0], span[1]))
            return out

    def mark_clean(self, keys) -> None:
        """The owner wrote these tables: they may be evicted again."""
        with self._mutex:
            for key in keys:
                if self._dirty.pop(key, None) is None:
                    continue
                table = self._pinned.pop(key, None)
                if table is not None:
                    self._lru[key] = table
            self._evict()

    def clear(self) -> None:
        with self._mutex:
            self._lru.clear()
            self._pinned.clear()
            self._dirty.clear()

    def _evict(self) -> None:
        """Drop least recently used tables beyond the capacity; a dirty one is spilled first."""
        lru, dirty = self._lru, self._dirty
        while len(lru) > self.capacity:
            key, table = lru.popitem(last=False)
            span = dirty.pop(key, None)
            if span is not None:
                try:
                    self._spill(key, table, span[0], span[1])
                except BaseException:
                    lru[key] = table  # still dirty, and still the newest copy
                    lru.move_to_end(key, last=False)
                    dirty[key] = span
                    raise
