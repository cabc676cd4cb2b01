"""What is measured: the figures, and one client run of each.

A figure is measured by a real client (nbdcopy, fio's nbd engine, nbdinfo)
against one server; some figures are read off the server instead (start-up
time, memory, CPU time per request).  Every write figure includes the final
flush: ``nbdcopy --flush`` and fio ``--end_fsync=1``, whose runtime (and so
its IOPS) counts the flush.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .servers import Server

ALL = ("qemu", "tuned", "nbdkit", "ours", "before")
QCOW2 = ("qemu", "tuned", "ours", "before")  # allocation depth: qcow2 servers only
WRITERS = ("qemu", "nbdkit", "ours", "before")  # tuned is a read-side configuration
HANDSHAKES = 10  # per sample


@dataclass(frozen=True)
class Figure:
    name: str
    key: str  # for --only
    group: str  # read, map, chain, write: which servers it runs on
    unit: str  # s, ms, us, IOPS, MiB
    servers: tuple[str, ...]
    note: str
    higher_is_better: bool = False
    derived: bool = False  # read off the servers of its group, runs no client of its own

    def wins(self, ours: float, other: float) -> float:
        """How many times better ours is (above 1: ours wins)."""
        return ours / other if self.higher_is_better else other / ours


def figures(a) -> list[Figure]:
    fio_s = f"{a.fio_runtime} s"
    chain = "/".join(f"{c // 1000}k" for c in a.chain_clusters)
    alloc = f"fio 4k, {a.alloc_writes} writes into a new 64 GiB image, end_fsync"
    up, down, off = True, False, "derived"
    rows = [
        # name, key, group, unit, servers, higher is better, note
        ("seq read", "seq", "read", "s", ALL, down, f"nbdcopy URI null:, {human(a.read_size)} random data"),
        ("seq read 1 conn", "seq1", "read", "s", ALL, down, "nbdcopy --connections=1 URI null:"),
        ("randread qd1", "qd1", "read", "IOPS", ALL, up, f"fio nbd 4k, {fio_s}"),
        ("randread qd32", "qd32", "read", "IOPS", ALL, up, f"fio nbd 4k, {fio_s}"),
        ("randread 32 clients", "clients", "read", "IOPS", ALL, up, "fio 32 jobs x 4k QD1, aggregate"),
        ("handshake", "hs", "read", "ms", ALL, down, "nbdinfo --no-content, per connection"),
        ("start to listening", off, "read", "ms", ALL, down, "launch until --fork returns"),
        ("RSS idle", off, "read", "MiB", ALL, down, "VmRSS after start"),
        ("CPU per read qd1", off, "read", "us", ALL, down, "server CPU time per request, randread qd1"),
        (
            "map",
            "map",
            "map",
            "s",
            ALL,
            down,
            f"nbdinfo --map, {human(a.map_size)}, {a.map_clusters} clusters",
        ),
        ("map depth", "depth", "map", "s", QCOW2, down, "nbdinfo --map=qemu:allocation-depth"),
        ("peak RSS after maps", off, "map", "MiB", ALL, down, "VmHWM after both maps"),
        (
            "chain map",
            "chain",
            "chain",
            "s",
            ALL,
            down,
            f"3 layers of {human(a.chain_size)}, {chain} clusters",
        ),
        ("chain map depth", "chaindepth", "chain", "s", QCOW2, down, "nbdinfo --map=qemu:allocation-depth"),
        (
            "seq write",
            "wseq",
            "write",
            "s",
            WRITERS,
            down,
            f"nbdcopy --flush, {human(a.write_size)}, new image",
        ),
        ("randwrite alloc qd1", "alloc1", "write", "IOPS", WRITERS, up, alloc),
        ("randwrite alloc qd32", "alloc32", "write", "IOPS", WRITERS, up, alloc),
        (
            "CPU per alloc write qd1",
            off,
            "write",
            "us",
            WRITERS,
            down,
            "server CPU per request, flush included",
        ),
        ("randwrite inplace qd1", "inplace1", "write", "IOPS", WRITERS, up, f"fio 4k, {fio_s}, end_fsync"),
        ("randwrite inplace qd32", "inplace32", "write", "IOPS", WRITERS, up, f"fio 4k, {fio_s}, end_fsync"),
    ]
    return [Figure(n, k, g, u, sv, note, hi, k == off) for n, k, g, u, sv, hi, note in rows]


def human(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}iB"
    return f"{n} B"


def timed(cmd: list[str], timeout: float, out=subprocess.DEVNULL) -> float:
    t = time.perf_counter()
    subprocess.run(
        cmd, check=True, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=timeout
    )
    return time.perf_counter() - t


def fio(server: Server, rw: str, depth: int, a, scratch: Path, *extra: str) -> dict:
    """One fio job (or a group of jobs reported as one)."""
    out = scratch / "fio.json"
    cmd = [
        "fio", f"--name={rw}", "--ioengine=nbd", f"--uri={server.uri}", f"--rw={rw}", "--bs=4k",
        f"--iodepth={depth}", *extra, "--output-format=json", f"--output={out}",
    ]  # fmt: skip
    if rw != "randread":
        cmd.append("--end_fsync=1")  # the flush is part of every write figure
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=a.fio_runtime + a.timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']}")
    return job


@dataclass
class Sample:
    value: float
    output: str | None = None  # a map's text, compared between servers
    cpu_per_op: float | None = None  # server CPU seconds per request


def measure(fig: Figure, server: Server, a, scratch: Path, source: Path) -> Sample:
    """One run of ``fig`` against ``server``."""
    name = fig.name
    if name == "seq read":
        return Sample(timed(["nbdcopy", server.uri, "null:"], a.timeout))
    if name == "seq read 1 conn":
        return Sample(timed(["nbdcopy", "--connections=1", server.uri, "null:"], a.timeout))
    if name == "seq write":
        return Sample(timed(["nbdcopy", "--flush", str(source), server.uri], a.timeout))
    if name == "handshake":
        t = time.perf_counter()
        for _ in range(HANDSHAKES):
            subprocess.run(["nbdinfo", "--no-content", server.uri], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=a.timeout)  # fmt: skip
        return Sample((time.perf_counter() - t) / HANDSHAKES * 1000)
    if name.startswith(("randread", "randwrite")):
        rw = name.split()[0]
        if name == "randread 32 clients":
            depth, extra = (
                1,
                ["--numjobs=32", "--group_reporting", f"--runtime={a.fio_runtime}", "--time_based"],
            )
        else:
            depth = int(name.rsplit(" qd", 1)[1])
            if "alloc" in name:  # a fixed number of writes, nearly all into clusters not yet allocated
                extra = [f"--number_ios={a.alloc_writes}"]
            else:
                extra = [f"--runtime={a.fio_runtime}", "--time_based"]
        cpu0 = server.cpu()
        job = fio(server, rw, depth, a, scratch, *extra)
        cpu = server.cpu() - cpu0
        side = job["read" if rw == "randread" else "write"]
        if "alloc" in name and side["total_ios"] != a.alloc_writes:
            raise RuntimeError(f"fio wrote {side['total_ios']} times, not {a.alloc_writes}")
        return Sample(side["iops"], cpu_per_op=cpu / side["total_ios"] if side["total_ios"] else None)
    which = "--map=qemu:allocation-depth" if name.endswith("depth") else "--map"
    out = scratch / "map.txt"
    with open(out, "w") as f:
        value = timed(["nbdinfo", which, server.uri], a.timeout, out=f)
    return Sample(value, out.read_text())
