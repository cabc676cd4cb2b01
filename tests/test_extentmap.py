"""Block status as arrays (qcow2.extentmap) against the one-extent-at-a-time walk.

The map the server sends is computed window by window from whole L2 tables
and layers merged by array operations; ``status_above`` is the independent,
per-extent mirror of QEMU's block layer (itself compared with qemu-nbd by the
export and map matrices).  Both must describe every image of the case
catalogue identically, for the whole disk and for windows at unaligned
offsets.  The last test holds tiny windows to ``qemu-img map`` on a chain.
"""

from __future__ import annotations

import random

import pytest
from images import CASES, KiB, MiB

import qcow2
from qcow2.status import ALLOCATED, DATA, ZERO, status_above


def merged(runs):
    """(start, length, data, zero, depth) runs with equal neighbours joined."""
    out = []
    for start, length, *status in runs:
        if out and out[-1][2:] == tuple(status) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, *status)
        else:
            out.append((start, length, *status))
    return out


def by_walk(disk, offset, length):
    runs, pos, end = [], offset, min(offset + length, disk.size)
    while pos < end:
        st, depth = status_above(disk.top, pos, end - pos)
        f = st.flags
        runs.append((pos, st.length, bool(f & DATA), bool(f & ZERO), depth if f & ALLOCATED else 0))
        pos += st.length
    return merged(runs)


def by_arrays(disk, offset, length):
    runs, pos, end = [], offset, min(offset + length, disk.size)
    while pos < end:
        m = disk.extent_map(pos, end - pos)
        assert m.bounds[0] == pos and pos < m.end <= end
        for e in m.extents():
            runs.append((pos, e.length, e.data, e.zero, e.depth))
            pos += e.length
        assert pos == m.end
    return merged(runs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_array_map_equals_the_extent_walk(case_image, name):
    img = case_image(name)
    disk = qcow2.open_disk(str(img.abspath), img.fmt, read_only=True)
    try:
        assert by_arrays(disk, 0, disk.size) == by_walk(disk, 0, disk.size)
        rng = random.Random(name)
        for _ in range(25):
            offset = rng.randrange(disk.size)
            length = rng.randrange(1, disk.size - offset + 1)
            assert by_arrays(disk, offset, length) == by_walk(disk, offset, length), (offset, length)
    finally:
        disk.close()


def test_windows_inside_tables_match_qemu_img_map(recipe, monkeypatch):
    """Windows of three clusters cut every L2 table and every run of a 3-layer chain whose
    middle layer has another cluster size; the map still equals ``qemu-img map``'s (QEMU's
    own answer: its depth is 0-based, and "present": false is our depth 0).  No layer is
    short here: past a short backing file qemu-img map and the allocation-depth context
    differ, and the catalogue test above covers that case against the walk."""
    monkeypatch.setattr(qcow2.image, "MAP_WINDOW_CLUSTERS", 3)
    rc = recipe
    rc.create("base.qcow2", 8 * MiB, cluster_size=4 * KiB)
    rng = random.Random(7)
    ops = [f"write -P 0x11 {rng.randrange(2048) * 4 * KiB} {4 * KiB}" for _ in range(300)]
    ops += [f"write -z {rng.randrange(1024) * 8 * KiB} {8 * KiB}" for _ in range(40)]
    rc.io("base.qcow2", *ops)
    rc.create("mid.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2", cluster_size=16 * KiB)
    rc.io("mid.qcow2", *[f"write -P 0x22 {rng.randrange(512) * 16 * KiB} {16 * KiB}" for _ in range(60)])
    rc.create("top.qcow2", 8 * MiB, backing="mid.qcow2", backing_fmt="qcow2", cluster_size=4 * KiB)
    rc.io("top.qcow2", *[f"write -P 0x33 {rng.randrange(2048) * 4 * KiB} {4 * KiB}" for _ in range(200)])
    rc.io("top.qcow2", "write -z 6M 512k")
    expected = merged(
        (e["start"], e["length"], e["data"], e["zero"], e["depth"] + 1 if e["present"] else 0)
        for e in rc.qemu_map("top.qcow2", cwd=None)
    )
    disk = qcow2.open_disk(str(rc.root / "top.qcow2"), "qcow2", read_only=True)
    try:
        assert disk.map_window == 3 * 4 * KiB
        assert by_arrays(disk, 0, disk.size) == expected
    finally:
        disk.close()
