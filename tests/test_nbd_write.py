"""Writes through the server vs. the same writes done by QEMU itself.

Each case builds an image twice (same commands, two directories).  One
random sequence of qemu-io commands (``write -P``, ``write -z [-u]``,
``discard``, ``flush``, batches of ``aio_write``) is applied by qemu-io
directly to the first copy, and by qemu-io through our NBD export to the
second.  Afterwards the guest views must be identical (``qemu-img compare``),
our copy must pass ``qemu-img check``, and ``qemu-img map`` of both must agree
on present/zero/data/depth (host offsets may differ).

On failure the message names the seed and a shell script that replays the case.
"""

from __future__ import annotations

import json
import os
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from nbd_wire import Server, run, tool

KiB = 1024
MiB = 1 << 20
SEED = int(os.environ.get("NBD_WRITE_SEED", "20240611"))


# --- image cases --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    create: tuple[str, ...]  # qemu-img create -o options for the top image
    cluster: int
    size: int = 8 * MiB
    backing: str | None = None  # "qcow2", "raw" or "chain" (base <- mid <- top)
    compressed: bool = False  # compressed clusters in the top image before the test
    snapshot: bool = False  # an internal snapshot taken before the test
    data_file: bool = False  # the top image keeps its data in an external file


CASES = [
    Case("v3-64k-compressed", ("compat=1.1",), 64 * KiB, compressed=True),
    Case("v2-64k", ("compat=0.10",), 64 * KiB),
    Case("v2-64k-backing", ("compat=0.10",), 64 * KiB, backing="qcow2"),
    Case("c512", ("cluster_size=512",), 512, size=2 * MiB),
    Case("c4k-backing", ("cluster_size=4096",), 4 * KiB, backing="qcow2"),
    Case("c2m", ("cluster_size=2M",), 2 * MiB, size=24 * MiB, compressed=True),
    Case("extl2-64k-backing", ("extended_l2=on",), 64 * KiB, backing="qcow2", compressed=True),
    Case("extl2-32k-rawbacking", ("extended_l2=on", "cluster_size=32k"), 32 * KiB, backing="raw"),
    Case("raw-backing", (), 64 * KiB, backing="raw"),
    Case("chain", ("cluster_size=16k",), 16 * KiB, backing="chain"),
    Case("snapshot", (), 64 * KiB, snapshot=True, compressed=True),
    Case("snapshot-v2-lazy-ish", ("compat=0.10",), 64 * KiB, snapshot=True),
    Case("data-file", (), 64 * KiB, data_file=True, backing="qcow2"),
    Case("data-file-raw", ("data_file_raw=on",), 64 * KiB, data_file=True),
    Case("lazy-refcounts", ("lazy_refcounts=on",), 64 * KiB, backing="qcow2", snapshot=True),
]


def qemu_io(fmt: str, target: str | Path, commands: list[str]) -> list[str]:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    return [*argv, str(target)]


def build_commands(case: Case, d: Path) -> list[list[str]]:
    """Commands (run inside the empty directory ``d``) creating the case's ``top.qcow2``."""
    cmds: list[list[str]] = []
    size = str(case.size)
    c = case.cluster
    opts = [*case.create]
    if case.backing in ("qcow2", "chain"):
        cmds.append(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={c}", "base.qcow2", size]
        )
        cmds.append(
            qemu_io("qcow2", "base.qcow2", [f"write -P 0xb1 0 {case.size // 2}", f"write -z {c} {3 * c}"])
        )
        backing = ("base.qcow2", "qcow2")
        if case.backing == "chain":
            cmds.append(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    "mid.qcow2",
                    size,
                ]
            )
            cmds.append(
                qemu_io(
                    "qcow2",
                    "mid.qcow2",
                    [f"write -P 0xb2 {case.size // 4} {case.size // 2}", f"write -z -u {5 * c} {2 * c}"],
                )
            )
            backing = ("mid.qcow2", "qcow2")
    elif case.backing == "raw":
        cmds.append(["qemu-img", "create", "-q", "-f", "raw", "base.raw", size])
        cmds.append(qemu_io("raw", "base.raw", [f"write -P 0xb3 {c} {case.size // 3}"]))
        backing = ("base.raw", "raw")
    else:
        backing = None
    if case.data_file:
        opts.append(f"data_file={d / 'top.data'}")  # QEMU resolves a relative name from its cwd
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        create += ["-o", ",".join(opts)]
    if backing:
        create += ["-b", backing[0], "-F", backing[1]]
    cmds.append([*create, "top.qcow2", size])
    prep = [f"write -P 0xa1 {2 * c} {4 * c}", f"write -P 0xa2 {case.size - 3 * c} {3 * c}"]
    if case.compressed:
        prep.append(f"write -c -P 0xc1 {6 * c} {2 * c}")  # compressed writes need unallocated clusters
        if 8 * c <= case.size // 2 < case.size - 4 * c:
            prep.append(f"write -c -P 0xc2 {case.size // 2} {c}")
    cmds.append(qemu_io("qcow2", "top.qcow2", prep))
    if case.snapshot:
        cmds.append(["qemu-img", "snapshot", "-c", "snap1", "top.qcow2"])
        cmds.append(qemu_io("qcow2", "top.qcow2", [f"write -P 0xa3 {3 * c} {c}"]))
    return cmds


def run_in(d: Path, argv: list[str]) -> None:
    cwd = os.getcwd()
    os.chdir(d)
    try:
        run(*argv)
    finally:
        os.chdir(cwd)


# --- random operations ----------------------------------------------------------------


def random_ops(rng: random.Random, size: int, cluster: int, n: int = 70) -> list[str]:
    """qemu-io commands: writes, zero writes (with and without unmap), discards, flushes, aio batches."""

    def pick_range(max_len: int) -> tuple[int, int]:
        kind = rng.random()
        if kind < 0.3:  # cluster aligned, whole clusters
            clusters = size // cluster
            first = rng.randrange(clusters)
            count = rng.randint(1, max(1, min(clusters - first, max_len // cluster)))
            return first * cluster, count * cluster
        if kind < 0.6:  # sector aligned
            off = rng.randrange(size // 512) * 512
            length = rng.randint(1, max(1, min(size - off, max_len) // 512)) * 512
            return off, length
        off = rng.randrange(size - 1)  # any byte
        length = rng.randint(1, min(size - off, max_len))
        return off, length

    ops: list[str] = []
    big = max(4 * cluster, 256 * KiB)
    while len(ops) < n:
        r = rng.random()
        pattern = rng.randrange(1, 256)
        if r < 0.32:
            off, length = pick_range(big)
            ops.append(f"write -P {pattern:#x} {off} {length}")
        elif r < 0.47:
            off, length = pick_range(big * 2)
            ops.append(f"write -z {off} {length}")
        elif r < 0.62:
            off, length = pick_range(big * 2)
            ops.append(f"write -z -u {off} {length}")
        elif r < 0.74:
            off, length = pick_range(big * 2)
            ops.append(f"discard {off} {length}")
        elif r < 0.80:
            ops.append("flush")
        else:
            # Many requests in flight: disjoint ranges, several inside the same cluster.
            base = rng.randrange(size // cluster) * cluster
            area = min(max(4 * cluster, 64 * KiB), size - base)
            starts = range(0, area, 512)
            slots = sorted(rng.sample(starts, k=min(8, len(starts))))
            spans = []
            for i, start in enumerate(slots):
                limit = slots[i + 1] if i + 1 < len(slots) else area
                length = rng.randint(1, (limit - start) // 512) * 512
                spans.append((base + start, length))
            for off, length in spans:
                ops.append(f"aio_write -P {rng.randrange(1, 256):#x} {off} {length}")
            ops.append("aio_flush")
    return ops


# --- comparison helpers ----------------------------------------------------------------


def settle(*paths: Path) -> None:
    """fsync and drop cached pages, so SEEK_HOLE answers do not depend on page-cache state."""
    for p in paths:
        if not p.exists():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".qcow2", ".raw", ".data"))


def guest_map(image: Path) -> list[tuple[int, int, int, bool, bool, bool, bool]]:
    entries = json.loads(run("qemu-img", "map", "--output=json", image))
    merged: list[list] = []
    for e in entries:
        key = (e["depth"], e["present"], e["zero"], e["data"], "offset" in e)  # mapped to the host or not
        if merged and merged[-1][2:] == list(key) and merged[-1][0] + merged[-1][1] == e["start"]:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["start"], e["length"], *key])
    return [tuple(m) for m in merged]


def check_clean(image: Path) -> None:
    report = json.loads(run("qemu-img", "check", "--output=json", image))
    bad = {k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert not any(bad.values()), f"qemu-img check on {image}: {report}"
    info = json.loads(run("qemu-img", "info", "--output=json", image))
    assert not info.get("dirty-flag", False), f"{image} left dirty"


def script(case: Case, seed: int, cmds: list[list[str]], ops: list[str], where: Path) -> Path:
    """A shell script that replays the case by hand (server started the way the test does)."""
    lines = ["#!/bin/sh", f"# case {case.name}, seed {seed}", "set -e", "rm -rf local ours; mkdir local ours"]
    for d in ("local", "ours"):
        lines.append(f"cd {d}")
        lines += [shlex.join(c) for c in cmds]
        lines.append("cd ..")
    lines.append("cd local && " + shlex.join(qemu_io("qcow2", "top.qcow2", ops)) + " >/dev/null && cd ..")
    lines.append("python3 -m nbdserver --fork --pid-file $PWD/ours/p -k $PWD/ours/s $PWD/ours/top.qcow2")
    lines.append(shlex.join(qemu_io("raw", "nbd+unix:///?socket=ours/s", ops)) + " >/dev/null")
    lines.append("kill $(cat ours/p); while [ -e ours/p ]; do sleep 0.1; done")
    lines.append("qemu-img compare local/top.qcow2 ours/top.qcow2; qemu-img check ours/top.qcow2")
    lines.append(
        "diff <(qemu-img map --output=json local/top.qcow2) <(qemu-img map --output=json ours/top.qcow2)"
    )
    path = where / "replay.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_random_writes_match_qemu(case: Case, tmp_path: Path):
    for t in ("qemu-img", "qemu-io"):
        tool(t)
    seed = SEED + sum(map(ord, case.name))
    rng = random.Random(seed)
    local, ours = tmp_path / "local", tmp_path / "ours"
    cmds = build_commands(case, local)
    for d in (local, ours):
        d.mkdir()
        for argv in build_commands(case, d):
            run_in(d, argv)
    ops = random_ops(rng, case.size, case.cluster)
    replay = script(case, seed, cmds, ops, tmp_path)
    where = f"case {case.name}, seed {seed} (NBD_WRITE_SEED={SEED}); replay: bash {replay}"

    run_in(local, qemu_io("qcow2", "top.qcow2", ops))
    server = Server(ours / "top.qcow2", tmp_path / "srv", ("-f", "qcow2"))
    try:
        run(*qemu_io("raw", server.uri, ops))
    finally:
        server.stop()
    assert not server.pidfile.exists(), f"server did not shut down cleanly; {where}"

    a, b = local / "top.qcow2", ours / "top.qcow2"
    p = _compare(a, b)
    assert p == "", f"guest views differ: {p}; {where}"
    check_clean(b)
    settle(*image_files(local), *image_files(ours))
    ma, mb = guest_map(a), guest_map(b)
    assert ma == mb, f"qemu-img map differs; {where}\nqemu: {ma}\nours: {mb}"


def _compare(a: Path, b: Path) -> str:
    import subprocess

    p = subprocess.run(
        [tool("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
        capture_output=True,
        text=True,
    )
    return "" if p.returncode == 0 else (p.stdout + p.stderr).strip()
