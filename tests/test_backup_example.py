"""examples/incremental_backup.py end to end (issue 9 §8), QEMU's tools as the oracle.

A VM-like disk (an overlay on a template, data in both) is served read-write
by qcow2-nbd with ``-B``; a full backup, then writes through NBD (qemu-io),
then incrementals, the bitmap rotated with ``qcow2 bitmap`` while the server
is stopped.  Each backup must look at exactly the dirty extents qemu-nbd
``-B`` reports on the same file and read exactly those of them that do not
read as zero; each restore, full and incrementals applied in order, must
equal the disk as it was at that backup (``qemu-img compare``), and every
file written must pass ``qemu-img check``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from test_bitmaps import bitmaps_of, sh, start, stop

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "incremental_backup.py"
ROUNDS = [  # the guest's writes after each backup: data, zeros, trims, unaligned
    ["write -P 0x55 1M 7k", "write -z 10M 64k", "discard 2M 1M", "write -P 0x66 50M 300k", "write 63M 1M"],
    ["write -P 0x77 0 64k", "write -P 0x78 20M 100k", "write -z 40M 64k", "write 33M 3M", "discard 8M 4M"],
]


def example(*args: str | Path) -> dict:
    done = sh(sys.executable, str(EXAMPLE), *map(str, args), check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def oracle(image: Path, bitmap: str | None = None) -> tuple[int, int]:
    """(bytes in scope, bytes of them that do not read as zero) as qemu-nbd reports them:
    the dirty extents of ``bitmap``, or the whole disk."""
    uri, pid = start("qemu", image, "-r", *(("-B", bitmap) if bitmap else ()))
    try:
        allocation = json.loads(sh("nbdinfo", "--json", "--map", uri).stdout)
        size = sum(e["length"] for e in allocation)
        scope = [(0, size)]
        if bitmap:
            dirty = json.loads(sh("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri).stdout)
            scope = [(e["offset"], e["offset"] + e["length"]) for e in dirty if e["type"] & 1]
    finally:
        stop(pid)
    data = [(e["offset"], e["offset"] + e["length"]) for e in allocation if not e["type"] & 2]
    overlap = sum(max(0, min(b, d) - max(a, c)) for a, b in scope for c, d in data)
    return sum(b - a for a, b in scope), overlap


def clean(image: Path) -> None:
    check = sh("qemu-img", "check", str(image), check=False)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr


def same_guest(a: Path, b: Path) -> None:
    compare = sh("qemu-img", "compare", str(a), str(b), check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_full_and_incremental_backups_restore_the_disk(tmp_path: Path, oracle_tools: None) -> None:
    template, disk = tmp_path / "template.qcow2", tmp_path / "vm.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(template), "64M")
    sh("qemu-io", "-c", "write -P 0x11 0 6M", "-c", "write -P 0x12 30M 8M", "-c", "write -c -P 0x13 40M 1M",
       str(template))  # fmt: skip
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", template.name, "-F", "qcow2", str(disk))
    sh("qemu-io", "-c", "write -P 0x21 4M 4M", "-c", "write -z 32M 1M", "-c", "write 60M 64k", str(disk))
    backups = tmp_path / "backups"
    backups.mkdir()
    snapshots: list[Path] = []

    def snapshot() -> None:  # the disk as a backup sees it (the server stopped)
        snapshots.append(tmp_path / f"snap{len(snapshots)}.qcow2")
        shutil.copy(disk, snapshots[-1])

    example("rotate", disk, "b1")
    snapshot()
    whole, data = oracle(disk)
    uri, pid = start("ours", disk, "-B", "b1")
    try:
        full = example("full", uri, backups / "0-full.qcow2")
        assert (full["scope"], full["read"], full["zero"]) == (whole, data, whole - data)
    finally:
        stop(pid)
    previous = backups / "0-full.qcow2"
    for n, writes in enumerate(ROUNDS, 1):
        uri, pid = start("ours", disk, "-B", f"b{n}")  # the guest runs, writing through NBD
        try:
            sh("qemu-io", "-f", "raw", *[a for w in writes for a in ("-c", w)], uri)
        finally:
            stop(pid)
        # a short stop: the next bitmap starts, the one before the current goes
        example("rotate", disk, f"b{n + 1}", *([f"b{n - 1}"] if n > 1 else []))
        snapshot()
        dirty, dirty_data = oracle(disk, f"b{n}")
        assert dirty_data and dirty > dirty_data  # data and zeros in every round
        uri, pid = start("ours", disk, "-B", f"b{n}")
        try:
            backup = backups / f"{n}-inc.qcow2"
            inc = example("incremental", uri, f"b{n}", previous, backup)
            assert (inc["scope"], inc["read"], inc["zero"]) == (dirty, dirty_data, dirty - dirty_data)
        finally:
            stop(pid)
        previous = backup
    assert [b["name"] for b in bitmaps_of(disk)] == [f"b{len(ROUNDS)}", f"b{len(ROUNDS) + 1}"]
    files = sorted(backups.iterdir())
    for count, snap in enumerate(snapshots, 1):  # a restore to each backup's point in time
        restored = tmp_path / f"restored{count}.qcow2"
        example("restore", restored, *files[:count])
        same_guest(snap, restored)
        clean(restored)
    same_guest(disk, tmp_path / f"restored{len(snapshots)}.qcow2")
    for backup in files:
        clean(backup)
