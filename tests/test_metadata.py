"""The metadata owner alone: table cache, overlap map, and the order in which changes reach the file.

No QEMU here: images come from our own ``create_image`` (byte-identical to
qemu-img's, see test_create.py), and the host file under the image records
every write, sync and hole punch, so the test sees the write-back order the
owner promises (qcow2/metadata/owner.py): data and refcounts durable, then L2
tables, then L1 entries, then a sync, then the frees.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

import qcow2
from qcow2.create import create_image
from qcow2.format import layout as L
from qcow2.format.header import parse_header
from qcow2.hostfile import HostFile
from qcow2.metadata import overlap as O
from qcow2.metadata.cache import TableCache

KiB, MiB = 1 << 10, 1 << 20


# --- the table cache ------------------------------------------------------------------------


def test_cache_never_evicts_a_dirty_table_without_a_spill() -> None:
    loads = []
    cache: TableCache[list] = TableCache(2, lambda key: loads.append(key) or [key])
    cache.get(1)
    cache.mark_dirty(1, 0, 1)
    for key in range(2, 10):
        cache.get(key)
    assert cache.cached(1) == [1] and cache.dirty_count == 1  # pinned while dirty
    assert len(cache) == 3  # two clean ones plus the pinned one
    assert [k for k, *_ in cache.dirty_entries()] == [1]
    cache.mark_clean([1])
    cache.get(10), cache.get(11)
    assert cache.cached(1) is None  # evictable again, and evicted
    assert loads.count(1) == 1


def test_cache_spills_dirty_tables_with_their_changed_span() -> None:
    spilled = []
    cache: TableCache[list] = TableCache(1, lambda key: [key], spill=lambda *a: spilled.append(a))
    cache.get(5)
    cache.mark_dirty(5, 10, 12)
    cache.mark_dirty(5, 3, 4)
    cache.get(6)
    assert spilled == [(5, [5], 3, 12)] and cache.dirty_count == 0


def test_cache_keeps_the_first_table_inserted_when_two_threads_load_at_once() -> None:
    started, go = threading.Barrier(2), threading.Event()

    def slow_load(key: int) -> list:
        started.wait(5)
        go.wait(5)
        return [key]

    cache: TableCache[list] = TableCache(8, slow_load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(7))) for _ in range(2)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(5)
    assert got[0] is got[1] is cache.cached(7)


# --- the overlap map ------------------------------------------------------------------------


def test_overlap_map_widens_the_write_to_clusters_and_names_what_qemu_names() -> None:
    m = O.MetadataMap(16)  # 64 KiB clusters
    m.set_regions(O.ACTIVE_L1, [(0x30000, 16)])
    m.set_regions(O.REFCOUNT_TABLE, [(0x10000, 0x10000)])
    m.set_regions(O.SNAPSHOT_TABLE, [(0x90000, 100)])
    m.set_regions(O.INACTIVE_L1, [(0xA0000, 8)])
    m.set_regions(O.BITMAP_DIRECTORY, [(0xB0000, 40)])
    m.set_regions(O.BITMAP_TABLE, [(0xC0000, 8)])
    m.set_clusters(O.ACTIVE_L2, [4, 7])
    m.set_clusters(O.REFCOUNT_BLOCK, [2])
    cases = {
        0: O.HEADER,
        0xFFFF: O.HEADER,
        0x10000: O.REFCOUNT_TABLE,
        0x20000: O.REFCOUNT_BLOCK,
        0x30008: O.ACTIVE_L1,  # the L1 table's cluster, past its 16 bytes: still hit
        0x40000: O.ACTIVE_L2,
        0x90000 + 0xFF00: O.SNAPSHOT_TABLE,
        0xA0000: O.INACTIVE_L1,
        0xB0000: O.BITMAP_DIRECTORY,
        0xC0000: O.BITMAP_TABLE,
    }
    for offset, what in cases.items():
        assert m.find(offset, 1) == what, hex(offset)
    for free in (0x50000, 0x60000, 0x80000, 0xD0000):
        assert m.find(free, 0x10000) is None, hex(free)
    assert m.find(0x50000, 0x30000) == O.ACTIVE_L2  # clusters 5..7
    assert m.find(0, 0x50000) == O.HEADER  # several hits: the first in QEMU's order
    assert m.find(0x40000, 1, ignore=frozenset({O.ACTIVE_L2})) is None
    m.remove_cluster(O.ACTIVE_L2, 4)
    assert m.find(0x40000, 1) is None


# --- the write-back order -------------------------------------------------------------------


class RecordingFile(HostFile):
    """A host file that logs what reaches the descriptor, in order."""

    def __init__(self, filename: str, writable: bool = False, *, log: list, **kw) -> None:
        super().__init__(filename, writable, **kw)
        self.log = log

    def write(self, offset, data) -> None:
        self.log.append(("write", Path(self.filename).name, offset, len(data)))
        super().write(offset, data)

    def flush(self) -> None:
        self.log.append(("sync", Path(self.filename).name, 0, 0))
        super().flush()

    def trim(self, offset, length) -> None:
        self.log.append(("punch", Path(self.filename).name, offset, length))
        super().trim(offset, length)


def _where(path: Path):
    """Classify a host offset of the image by what lives there (read with the format layer)."""
    raw = path.read_bytes()
    h = parse_header(raw[:65536], str(path))
    cs = h.cluster_size
    l1 = struct.unpack_from(f">{h.l1_size}Q", raw, h.l1_table_offset)
    l2 = {e & L.L1E_OFFSET_MASK for e in l1 if e & L.L1E_OFFSET_MASK}
    reftable = struct.unpack_from(f">{h.refcount_table_clusters * cs // 8}Q", raw, h.refcount_table_offset)
    blocks = {e & L.REFT_OFFSET_MASK for e in reftable if e}

    def what(offset: int) -> str:
        if offset < cs:
            return "header"
        if h.l1_table_offset <= offset < h.l1_table_offset + h.l1_size * 8:
            return "L1"
        base = offset & ~(cs - 1)
        if base in l2:
            return "L2"
        if base in blocks:
            return "refblock"
        return "data"

    return what


def _trace(log: list, what) -> list[str]:
    return [kind if kind in ("sync", "punch") else f"{kind}:{what(off)}" for kind, _, off, _ in log]


@pytest.mark.parametrize("lazy", [False, True])
def test_write_back_order(tmp_path: Path, lazy: bool) -> None:
    path = tmp_path / "a.qcow2"
    create_image(str(path), 4 * MiB, lazy_refcounts=lazy)
    log: list = []
    disk = qcow2.open_disk(str(path), read_only=False, opener=lambda n, w: RecordingFile(n, w, log=log))
    try:
        disk.write(0, b"\xaa" * 4096)  # allocates an L2 table and a data cluster
        disk.write(128 * KiB, b"\xbb" * 4096)  # a second data cluster, same table
        first = len(log)
        disk.flush()
        flush1 = log[first:]
        disk.trim(0, 64 * KiB)  # the first data cluster goes
        second = len(log)
        disk.flush()
        flush2 = log[second:]
    finally:
        disk.close()
    what = _where(path)
    before = _trace(log[:first], what)
    one, two = _trace(flush1, what), _trace(flush2, what)
    # Until the flush, mappings stay in memory: data and the new (empty) L2 table only.
    assert "write:L1" not in before and before.count("write:data") == 2, before
    # 1. data and refcounts durable, 2. L2 then L1, then a sync.
    assert one[-1] == "sync" and one.index("write:L2") < one.index("write:L1") < len(one) - 1, one
    first_map = one.index("write:L2")
    assert "sync" in one[:first_map], one
    if lazy:
        assert "write:refblock" not in one, one  # lazy refcounts stay in memory (QEMU's rule)
    else:
        assert "write:refblock" in before + one[: one.index("sync")], one  # counted before mapped
    # 3. after the trim's new L2 entry is durable: the cluster is punched and its refcount lowered.
    assert "punch" in two, two
    synced_map = max(i for i, step in enumerate(two) if step == "sync" and "write:L2" in two[:i])
    assert two.index("write:L2") < synced_map < two.index("punch"), two
    if not lazy:
        assert max(i for i, s in enumerate(two) if s == "write:refblock") > synced_map, two
    # A refcount block change never waits for a sync of its own, and no L2 write comes after the frees.
    assert "write:L2" not in two[two.index("punch") :], two
