"""The write driver alone against qemu-io: the same random operations on twin images.

qemu-io applies a seeded sequence of writes, zero writes (with and without
unmap), discards and flushes to one copy; our driver applies it to the other,
closing and reopening the image now and then.  Then: `qemu-img compare` equal,
`qemu-img check` clean, `qemu-img map` equal in depth/present/zero/data, and a
raw external data file byte-identical to qemu's.  A failure prints the seed and
the commands; ``QCOW2_DRIVER_SEEDS=a-b`` runs more seeds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

import qcow2

FEATURES = ["none", "none", "snapshot", "datafile", "dataraw", "lazy", "rawbase", "zstd"]


def _seeds() -> list[int]:
    spec = os.environ.get("QCOW2_DRIVER_SEEDS", "")
    if not spec:
        return list(range(24))
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def io(img: Path, *cmds: str) -> None:
    sh("qemu-io", *[a for c in cmds for a in ("-c", c)], str(img))


def settled_map(img: Path) -> list:
    """`qemu-img map` as runs of (depth, present, zero, data), page cache dropped first."""
    for name in os.listdir(img.parent):
        fd = os.open(img.parent / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    runs: list = []
    for e in json.loads(sh("qemu-img", "map", "--output=json", str(img))):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if runs and runs[-1][1] == key:
            runs[-1][0] += e["length"]
        else:
            runs.append([e["length"], key])
    return runs


class Case:
    """One seeded image and operation sequence."""

    def __init__(self, seed: int, d: Path) -> None:
        r = random.Random(seed)
        self.r, self.d = r, d
        cs = r.choice([512, 4096, 16384, 65536, 65536, 2 << 20])
        ext = cs >= 16384 and r.random() < 0.4
        v2 = not ext and r.random() < 0.2
        self.size = r.choice([1 << 20, 4 << 20, 2999808, 8 << 20, 1000448, 307712])
        self.feature = r.choice(FEATURES)
        if v2 and self.feature in ("datafile", "dataraw", "lazy", "zstd"):
            self.feature = "none"
        refcount_bits = 16 if v2 or self.feature == "snapshot" else r.choice([16, 16, 1, 2, 4, 8, 32, 64])
        opts = f"cluster_size={cs},refcount_bits={refcount_bits}"
        opts += ",extended_l2=on" if ext else ""
        opts += ",compat=0.10" if v2 else ""
        opts += {
            "datafile": f",data_file={d}/a.data",
            "dataraw": f",data_file={d}/a.data,data_file_raw=on",
            "lazy": ",lazy_refcounts=on",
            "zstd": ",compression_type=zstd",
        }.get(self.feature, "")
        self.cs, self.opts = cs, opts
        self.commands = [f"qemu-img create -f qcow2 -o {opts} ... {self.size}"]
        self.ops = self._ops()

    def build(self) -> Path:
        d, r, size = self.d, self.r, self.size
        backing: list[str] = []
        if self.feature == "rawbase":
            base = d / "base.raw"
            with open(base, "wb") as f:
                f.truncate(r.choice([size // 2, size, size + 12345]))
                for _ in range(5):
                    f.seek(r.randrange(0, size // 2))
                    f.write(r.randbytes(r.randrange(1, 100000)))
            backing = ["-b", str(base), "-F", "raw"]
        elif self.feature != "dataraw" and r.random() < 0.5:
            base = d / "base.qcow2"
            bsize = r.choice([size // 2, size, size * 2]) // 512 * 512
            sh("qemu-img", "create", "-f", "qcow2", str(base), str(bsize))
            ops = []
            for _ in range(5):
                o = r.randrange(0, bsize - 1000)
                ops.append(f"write -P {r.randrange(1, 255)} {o} {r.randrange(1, min(300000, bsize - o))}")
            io(base, *ops)
            self.commands += ops
            backing = ["-b", str(base), "-F", "qcow2"]
        img = d / "a.qcow2"
        sh("qemu-img", "create", "-f", "qcow2", "-o", self.opts, *backing, str(img), str(self.size))
        if self.feature == "snapshot":
            io(img, f"write -P 9 0 {size // 2}")
            sh("qemu-img", "snapshot", "-c", "s1", str(img))
        elif "data" not in self.feature and 6 * self.cs <= size and r.random() < 0.3:
            io(img, f"write -c -P 7 0 {self.cs}", f"write -c -P 8 {4 * self.cs} {2 * self.cs}")
        return img

    def _ops(self) -> list[tuple[str, int, int, int]]:
        r, size, cs = self.r, self.size, self.cs
        ops = []
        for _ in range(r.randrange(5, 40)):
            kind = r.choice(["write", "write", "write", "zero", "zero-unmap", "discard", "flush", "reopen"])
            if r.random() < 0.5:
                off, length = r.randrange(0, max(1, size // cs)) * cs, r.randrange(1, 8) * cs
            else:
                off, length = r.randrange(0, size), r.randrange(1, 200000)
            if r.random() < 0.3:
                off, length = off // 512 * 512, max(512, length // 512 * 512)
            length = min(length, size - off)
            if length > 0:
                ops.append((kind, off, length, r.randrange(1, 255)))
        return ops

    def qemu_io_commands(self) -> list[str]:
        verbs = {
            "write": "write -P {p} {o} {n}",
            "zero": "write -z {o} {n}",
            "zero-unmap": "write -z -u {o} {n}",
            "discard": "discard {o} {n}",
        }
        out = []
        for kind, o, n, p in self.ops:
            out.append("flush" if kind in ("flush", "reopen") else verbs[kind].format(p=p, o=o, n=n))
        return out

    def apply_ours(self, img: Path) -> None:
        disk = qcow2.open_disk(str(img), "qcow2", read_only=False)
        try:
            for kind, off, length, pattern in self.ops:
                if kind == "write":
                    disk.write(off, bytes([pattern]) * length)
                elif kind in ("zero", "zero-unmap"):
                    disk.write_zeroes(off, length, may_unmap=kind == "zero-unmap")
                elif kind == "discard":
                    disk.trim(off, length)
                elif kind == "flush":
                    disk.flush()
                else:
                    disk.close()
                    disk = qcow2.open_disk(str(img), "qcow2", read_only=False)
        finally:
            disk.close()


@pytest.mark.parametrize("seed", _seeds())
def test_driver_writes_like_qemu_io(tmp_path: Path, seed: int) -> None:
    # Twins built separately from the same seed: a copy would fill the file's
    # holes and change what block status reports.
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    case, twin = Case(seed, tmp_path / "ours"), Case(seed, tmp_path / "ref")
    ours, ref = case.build(), twin.build()
    io(ref, *case.qemu_io_commands())
    case.apply_ours(ours)

    problems = []
    compare = subprocess.run(["qemu-img", "compare", str(ref), str(ours)], capture_output=True, text=True)
    if compare.returncode:
        problems.append("compare: " + compare.stdout + compare.stderr)
    check = subprocess.run(["qemu-img", "check", str(ours)], capture_output=True, text=True)
    if check.returncode:
        problems.append("check: " + check.stdout[-800:] + check.stderr[-400:])
    if settled_map(ref) != settled_map(ours):
        problems.append(f"map differs:\n qemu {settled_map(ref)[:12]}\n ours {settled_map(ours)[:12]}")
    data_files = [img.parent / "a.data" for img in (ours, ref)]
    if case.feature == "dataraw" and data_files[0].read_bytes() != data_files[1].read_bytes():
        problems.append("raw data files differ")
    assert not problems, "\n".join(
        [f"seed {seed}: {case.opts} feature={case.feature} size={case.size}"]
        + case.commands
        + ["qemu-io ops:"]
        + case.qemu_io_commands()
        + problems
    )
