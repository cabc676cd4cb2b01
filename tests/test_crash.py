"""Crash safety: ``kill -9`` of our server in the middle of a write workload.

For each image shape a seeded workload goes through libnbd's aio API with
several requests in flight (writes, zero writes with and without NO_HOLE,
trims, some with FUA, a FLUSH now and then), and the server is killed with
SIGKILL right after a seeded number of replies, usually with requests still
in flight.  The test keeps a model of what the image may hold afterwards:

* a write is *durable* once it was answered with FUA, or once a FLUSH that
  was sent after its answer has been answered itself (NBD's rule, see
  shared/reference/nbd-protocol.md §10.3);
* every 512-byte sector must then hold the content its last durable write
  gave it, or the content of a write sent after that one (answered or not:
  unflushed writes may or may not have reached the file), never anything
  older and never anything else.

The crashed image is checked twice, on two copies of the same crash:

1. our server restarted on it read-write (a dirty v3 image is repaired on
   open), the whole disk read back through it and held against the model,
   a clean shutdown, then ``qemu-img check`` clean and no dirty flag;
2. ``qemu-io`` opening the copy read-write (QEMU repairs a dirty image on
   open) must see the very same guest bytes; ``qemu-img check -r all``
   leaves it clean.

Before either, ``python -m qcow2 check`` on the crashed image must say what
``qemu-img check`` says.  v2 images have no dirty bit and are not repaired on
open: there the flushed data must survive, and check may report leaks only.

The seed of every case is in its id; ``CRASH_SEED`` moves all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest
from images import Image, KiB, MiB, Recipe, clone, read_header
from nbd_wire import wait_pid_exit
from servers import PYTHON, Result, check_report, dirty_flag, guest_bytes, our_nbd, run

SECTOR = 512
DEPTH = 8  # requests in flight at most
SEED = int(os.environ.get("CRASH_SEED", "3900"))
SEEDS_PER_SHAPE = int(os.environ.get("CRASH_SEEDS", "3"))


# --- image shapes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    size: int
    cluster: int
    v2: bool = False
    backing: bool = False

    def make(self, rc: Recipe) -> Image:
        return BUILDERS[self.name](rc, self)


def _v3_plain(rc: Recipe, s: Shape) -> Image:
    rc.create("top.qcow2", s.size)
    rc.io("top.qcow2", "write -P 0xa1 0 1M", "write -z 2M 256k", "write -P 0xa2 3M 64k")
    return rc.image("top.qcow2")


def _lazy(rc: Recipe, s: Shape) -> Image:
    rc.create("top.qcow2", s.size, lazy_refcounts=True)
    rc.io("top.qcow2", "write -P 0xa1 0 1M", "write -z 2M 256k")
    return rc.image("top.qcow2")


def _extl2_backing(rc: Recipe, s: Shape) -> Image:
    rc.create("base.qcow2", s.size)
    rc.io("base.qcow2", "write -P 0xb1 0 4M", "write -z 1M 128k", "write -P 0xb2 6M 512k")
    rc.create("top.qcow2", s.size, backing="base.qcow2", backing_fmt="qcow2", extended_l2=True)
    rc.io("top.qcow2", "write -P 0xa1 512k 8k", "write -z 700k 6k", "write -P 0xa2 2M 64k")
    return rc.image("top.qcow2")


def _c512_refgrow(rc: Recipe, s: Shape) -> Image:
    # 64-bit refcounts: one 512-byte block covers 64 clusters, the one-cluster table
    # 2 MiB of file.  The prefill ends ~30 KiB below that, so the workload's first
    # allocations create refcount blocks and move the table.
    rc.create("top.qcow2", s.size, cluster_size=512, refcount_bits=64)
    rc.io("top.qcow2", "write -P 0xa1 0 1950k")
    img = rc.image("top.qcow2")
    if read_header(img.abspath)["size"] != s.size:
        raise AssertionError("c512 premise")
    return img


def _data_file(rc: Recipe, s: Shape) -> Image:
    # relative data-file name: QEMU resolves it from the current directory, which is
    # the image's directory for every tool here (Image.cwd), so a copied directory works
    rc.create("top.qcow2", s.size, data_file="top.data")
    rc.io("top.qcow2", "write -P 0xa1 0 1M", "write -z 1536k 128k")
    return rc.image("top.qcow2")


def _v2_backing(rc: Recipe, s: Shape) -> Image:
    rc.create("base.qcow2", s.size, compat="0.10")
    rc.io("base.qcow2", "write -P 0xb1 0 6M")
    rc.create("top.qcow2", s.size, backing="base.qcow2", backing_fmt="qcow2", compat="0.10")
    rc.io("top.qcow2", "write -P 0xa1 1M 1M")
    return rc.image("top.qcow2")


BUILDERS = {
    "v3-plain": _v3_plain,
    "lazy-refcounts": _lazy,
    "extl2-backing": _extl2_backing,
    "c512-refcount-growth": _c512_refgrow,
    "data-file": _data_file,
    "v2-backing": _v2_backing,
}

SHAPES = [
    Shape("v3-plain", 8 * MiB, 64 * KiB),
    Shape("lazy-refcounts", 8 * MiB, 64 * KiB),
    Shape("extl2-backing", 8 * MiB, 64 * KiB, backing=True),
    Shape("c512-refcount-growth", 4 * MiB, 512),
    Shape("data-file", 8 * MiB, 64 * KiB),
    Shape("v2-backing", 8 * MiB, 64 * KiB, v2=True, backing=True),
]


# --- the workload -----------------------------------------------------------------------


@dataclass
class Op:
    seq: int
    kind: str  # "write", "zero", "trim", "flush"
    offset: int = 0
    length: int = 0
    fua: bool = False
    no_hole: bool = False
    data: bytes = b""
    state: str = "planned"  # planned, sent, acked, durable, failed
    error: int = 0

    @property
    def sectors(self) -> range:
        return range(self.offset // SECTOR, -(-(self.offset + self.length) // SECTOR))

    def describe(self) -> str:
        if self.kind == "flush":
            return f"#{self.seq} flush [{self.state}]"
        flags = "".join((" FUA" if self.fua else "", " NO_HOLE" if self.no_hole else ""))
        return f"#{self.seq} {self.kind} {self.offset}+{self.length}{flags} [{self.state}]"


def plan(rng: random.Random, shape: Shape, n: int) -> list[Op]:
    size, cluster = shape.size, shape.cluster
    big = max(4 * cluster, 64 * KiB) if cluster >= 4096 else 64 * KiB

    def pick() -> tuple[int, int]:
        r = rng.random()
        if r < 0.4:  # whole clusters
            clusters = size // cluster
            first = rng.randrange(clusters)
            count = rng.randint(1, max(1, min(clusters - first, big // cluster)))
            return first * cluster, count * cluster
        if r < 0.8:  # sectors
            off = rng.randrange(size // SECTOR) * SECTOR
            return off, rng.randint(1, max(1, min(size - off, big) // SECTOR)) * SECTOR
        off = rng.randrange(size - 1)  # bytes
        return off, rng.randint(1, min(size - off, 20000))

    ops = []
    if shape.name == "c512-refcount-growth":  # first of all, past the refcount table's reach
        ops.append(Op(1, "write", 3 * MiB, 64 * KiB, fua=True, data=rng.randbytes(64 * KiB)))
    while len(ops) < n:
        r = rng.random()
        seq = len(ops) + 1
        if r < 0.08 and ops:
            ops.append(Op(seq, "flush"))
            continue
        off, length = pick()
        fua = rng.random() < 0.2
        if r < 0.6 or not ops:
            ops.append(Op(seq, "write", off, length, fua, data=rng.randbytes(length)))
        elif r < 0.8:
            ops.append(Op(seq, "zero", off, length, fua, no_hole=rng.random() < 0.5))
        else:  # sector-aligned trims
            lo, hi = off - off % SECTOR, -(-(off + length) // SECTOR) * SECTOR
            ops.append(Op(seq, "trim", lo, min(hi, size) - lo, fua))
    return ops


# --- the model ----------------------------------------------------------------------------


class Model:
    """Per 512-byte sector: what each write made it, and which write is durable."""

    def __init__(self, initial: bytes, backing: bytes | None):
        self.initial = initial
        self.backing = backing
        self.history: dict[int, list[tuple[int, frozenset[bytes]]]] = {}
        self.durable: dict[int, int] = {}  # sector -> seq of its last durable write (0: initial)
        self.by_seq: dict[int, Op] = {}

    def _sector(self, buf: bytes, s: int) -> bytes:
        return buf[s * SECTOR : (s + 1) * SECTOR]

    def _current(self, s: int) -> frozenset[bytes]:
        h = self.history.get(s)
        return h[-1][1] if h else frozenset([self._sector(self.initial, s)])

    def sent(self, op: Op) -> None:
        """Record the sector contents ``op`` produces (it may land any time from now on)."""
        self.by_seq[op.seq] = op
        for s in op.sectors:
            lo, hi = max(op.offset, s * SECTOR), min(op.offset + op.length, (s + 1) * SECTOR)
            a, b = lo - s * SECTOR, hi - s * SECTOR
            before = self._current(s)
            if op.kind == "write":
                patch = op.data[lo - op.offset : hi - op.offset]
                after = frozenset(x[:a] + patch + x[b:] for x in before)
            elif op.kind == "zero":
                after = frozenset(x[:a] + bytes(b - a) + x[b:] for x in before)
            else:  # trim: unchanged, zeros, or what the backing file has there
                after = before | {bytes(SECTOR)}
                if self.backing is not None:
                    after |= {self._sector(self.backing, s)}
            self.history.setdefault(s, [(0, frozenset([self._sector(self.initial, s)]))])
            self.history[s].append((op.seq, after))

    def made_durable(self, op: Op) -> None:
        op.state = "durable"
        for s in op.sectors:
            if self.durable.get(s, 0) < op.seq:
                self.durable[s] = op.seq

    def allowed(self, s: int) -> frozenset[bytes]:
        floor = self.durable.get(s, 0)
        out: set[bytes] = set()
        for seq, contents in self.history[s]:
            if seq >= floor:
                out |= contents
        return frozenset(out)

    def violations(self, got: bytes, limit: int = 6) -> list[str]:
        bad = []
        for s in range(len(self.initial) // SECTOR):
            actual = self._sector(got, s)
            if s not in self.history:
                if actual != self._sector(self.initial, s):
                    bad.append(f"sector {s} (offset {s * SECTOR}) was never written but changed")
            elif actual not in self.allowed(s):
                bad.append(self._explain(s, actual))
            if len(bad) >= limit:
                break
        return bad

    def _explain(self, s: int, actual: bytes) -> str:
        floor = self.durable.get(s, 0)
        lines = [f"sector {s} (offset {s * SECTOR}) holds {actual[:16].hex()}..., durable write #{floor}:"]
        for seq, contents in self.history[s]:
            what = "initial content" if seq == 0 else self.by_seq[seq].describe()
            match = "  <- matches" if actual in contents else ""
            tag = "durable" if seq == floor else ("older" if seq < floor else "later")
            heads = ", ".join(sorted(c[:8].hex() for c in contents))
            lines.append(f"    {tag:7} {what}: {heads}{match}")
        if not any(actual in contents for _, contents in self.history[s]):
            lines.append("    " + self._whose(actual))
        return "\n".join(lines)

    def _whose(self, actual: bytes) -> str:
        """Where else the stray content was meant to go (foreign data shows a reused cluster)."""
        for seq in sorted(self.by_seq):
            for t in self.by_seq[seq].sectors:
                if any(actual in c for q, c in self.history[t] if q == seq):
                    return f"that is what {self.by_seq[seq].describe()} gave sector {t} (offset {t * SECTOR})"
        for t in range(len(self.initial) // SECTOR):
            if self._sector(self.initial, t) == actual:
                return f"that is the initial content of sector {t} (offset {t * SECTOR})"
        return "that content was never written anywhere"


# --- running it ---------------------------------------------------------------------------


@dataclass
class Crash:
    ops: list[Op]
    kill_after: int
    refill: bool = True  # send more requests after the last reply before the kill
    replies: int = 0
    killed_with_in_flight: int = 0
    problems: list[str] = field(default_factory=list)

    def log(self) -> str:
        shown = [op.describe() for op in self.ops if op.state != "planned"]
        return "\n".join(shown)


def drive(uri: str, pid: int, crash: Crash, model: Model) -> None:
    """Send the workload with up to DEPTH requests in flight; SIGKILL the server after
    ``kill_after`` replies (or at the end).  A request never overlaps (by sector) one
    still in flight, so each sector's writes happen in the order they were sent."""
    h = nbd.NBD()
    h.connect_uri(uri)
    killed = False
    in_flight: dict[int, Op] = {}
    acked: list[Op] = []  # answered writes, in order
    durable_upto = 0  # acked[:durable_upto] are covered by an answered FLUSH
    buffers: dict[int, nbd.Buffer] = {}

    def done(op: Op, covers: int, err) -> int:
        in_flight.pop(op.seq, None)
        buffers.pop(op.seq, None)
        if killed:
            return 1  # the connection died with the server: no answer
        nonlocal durable_upto
        crash.replies += 1
        if err.value:
            op.state, op.error = "failed", err.value
            crash.problems.append(f"{op.describe()} failed with errno {err.value}")
            return 1
        op.state = "acked"
        if op.kind == "flush":
            for w in acked[durable_upto:covers]:
                model.made_durable(w)
            durable_upto = max(durable_upto, covers)
        else:
            acked.append(op)
            if op.fua:
                model.made_durable(op)
        return 1

    def busy(op: Op) -> bool:
        mine = op.sectors
        return any(o.sectors.start < mine.stop and mine.start < o.sectors.stop for o in in_flight.values())

    def send(op: Op) -> None:
        flags = nbd.CMD_FLAG_FUA if op.fua else 0
        op.state = "sent"
        in_flight[op.seq] = op
        if op.kind == "flush":
            covers = len(acked)
            cb = lambda err, op=op, covers=covers: done(op, covers, err)  # noqa: E731
            h.aio_flush(completion=cb)
        else:
            model.sent(op)
            cb = lambda err, op=op: done(op, 0, err)  # noqa: E731
            if op.kind == "write":
                buf = buffers[op.seq] = nbd.Buffer.from_bytearray(bytearray(op.data))
                h.aio_pwrite(buf, op.offset, completion=cb, flags=flags)
            elif op.kind == "zero":
                flags |= nbd.CMD_FLAG_NO_HOLE if op.no_hole else 0
                h.aio_zero(op.length, op.offset, completion=cb, flags=flags)
            else:
                h.aio_trim(op.length, op.offset, completion=cb, flags=flags)

    pending = list(crash.ops)
    try:
        while True:
            while pending and len(in_flight) < DEPTH and not busy(pending[0]):
                send(pending.pop(0))
            if crash.replies >= crash.kill_after or not in_flight:
                break
            h.poll(-1)
            if crash.replies >= crash.kill_after and not crash.refill:
                break  # kill with what is left in flight, nothing new sent
        crash.killed_with_in_flight = len(in_flight)
        os.kill(pid, signal.SIGKILL)
        killed = True
        if not wait_pid_exit(pid):
            crash.problems.append(f"server {pid} still alive 10 s after SIGKILL")
    finally:
        killed = True
        with contextlib.suppress(nbd.Error):
            while h.aio_in_flight():
                h.poll(-1)


def read_all(uri: str, size: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        chunk = 4 * MiB
        return b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))
    finally:
        h.shutdown()


def reftable(path: Path) -> tuple[int, int]:
    """(offset, clusters) of the refcount table, from the header."""
    with open(path, "rb") as f:
        f.seek(48)
        return struct.unpack(">QI", f.read(12))


CASES = [(shape, SEED + 101 * i + k) for i, shape in enumerate(SHAPES) for k in range(SEEDS_PER_SHAPE)]


@pytest.mark.parametrize(("shape", "seed"), CASES, ids=[f"{s.name}-seed{seed}" for s, seed in CASES])
def test_kill_during_writes(shape: Shape, seed: int, tmp_path: Path, oracle_tools: None):
    rng = random.Random(seed)
    rc = Recipe(tmp_path / "img")
    image = shape.make(rc)
    initial = guest_bytes(image, tmp_path / "initial.raw")
    backing = None
    if shape.backing:
        base = Image("base.qcow2", image.cwd, "qcow2", rc)
        backing = guest_bytes(base, tmp_path / "base.raw")
    model = Model(initial, backing)
    ops = plan(rng, shape, 120)
    crash = Crash(ops, kill_after=rng.randint(1, 100), refill=rng.random() < 0.5)
    reftable_before = reftable(image.abspath)

    context = [f"shape {shape.name}, seed {seed} (CRASH_SEED={SEED})"]

    def fail(msg: str, server=None) -> None:
        parts = [*context, msg]
        if server is not None and server.stderr().strip():
            parts.append(f"--- {server.name} server stderr:\n{server.stderr()[-4000:]}")
        when = "after sending more" if crash.refill else "before sending more"
        parts.append(f"--- requests sent (kill after {crash.kill_after} replies, {when}):\n{crash.log()}")
        parts.append("--- commands that built the image:\n" + rc.script())
        pytest.fail("\n".join(parts), pytrace=False)

    with our_nbd(image, tmp_path / "srv1", writable=True) as srv:
        drive(srv.uri, srv.pid, crash, model)
        if crash.problems:
            fail("\n".join(crash.problems), srv)
    context.append(
        f"killed after {crash.replies} replies with {crash.killed_with_in_flight} requests in flight"
    )

    # -- the crashed image, before anyone repairs it -----------------------------------
    copy = clone(image, tmp_path / "copy")
    if shape.name == "c512-refcount-growth" and reftable(image.abspath) == reftable_before:
        fail(f"premise: the refcount table did not move ({reftable_before})")
    if not shape.v2 and any(op.state != "planned" and op.kind != "flush" for op in ops):
        if not dirty_flag(image):
            fail("the crashed v3 image has no dirty flag")
    ref = run(["qemu-img", "check", image.path], image.cwd)
    ours = run([PYTHON, "-m", "qcow2", "check", image.path], image.cwd)
    if (ref.rc, ref.out, ref.err) != (ours.rc, ours.out, ours.err):
        fail(
            f"check of the crashed image differs:\n--- {ref.cmdline()} rc={ref.rc}\n{ref.out}{ref.err}"
            f"\n--- {ours.cmdline()} rc={ours.rc}\n{ours.out}{ours.err}"
        )
    if shape.v2 and ref.rc not in (0, 3):
        fail(f"crashed v2 image: qemu-img check must find leaks at most (rc 0 or 3):\n{ref.out}{ref.err}")

    # -- 1. our server repairs on open; the model holds; clean afterwards ------------------
    with our_nbd(image, tmp_path / "srv2", writable=True) as srv:
        ours_view = read_all(srv.uri, shape.size)
    if srv.exit_problem:
        fail(f"restarted server: {srv.exit_problem}", srv)
    bad = model.violations(ours_view)
    if bad:
        fail("read back through our restarted server, sectors violate the model:\n" + "\n".join(bad), srv)
    r, report = check_report(image)
    if shape.v2:
        if r.rc not in (0, 3) or report.get("corruptions"):
            fail(f"v2 image after our restart: {r.cmdline()} rc={r.rc}\n{r.out}{r.err}")
    else:
        if r.rc != 0 or any(report.get(k) for k in ("corruptions", "leaks", "check-errors")):
            fail(f"after our server's repair and clean shutdown: {r.cmdline()} rc={r.rc}\n{r.out}{r.err}")
        if dirty_flag(image):
            fail("after our server's repair and clean shutdown the image is still dirty")

    # -- 2. the same crash, repaired by QEMU ---------------------------------------------------
    r = run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", copy.path], copy.cwd)
    if r.rc != 0:
        fail(f"{r.cmdline()} rc={r.rc}: {r.out}{r.err}")
    qemu_view = guest_bytes(copy, tmp_path / "qemu.raw")
    if qemu_view != ours_view:
        i = next(k for k in range(len(ours_view)) if ours_view[k] != qemu_view[k])
        bad = model.violations(qemu_view)
        fail(
            f"QEMU sees other guest bytes than our restarted server at offset {i}: "
            f"qemu {qemu_view[i : i + 16].hex()} ours {ours_view[i : i + 16].hex()}\n"
            + ("\n".join(bad) if bad else "(QEMU's view satisfies the model too)")
        )
    r, _ = check_report(copy, "-r", "all")
    r2, report = check_report(copy)
    if r.rc != 0 or r2.rc != 0 or any(report.get(k) for k in ("corruptions", "leaks", "check-errors")):
        fail(f"QEMU's copy: check -r all rc={r.rc}\n{r.out}{r.err}\nthen check rc={r2.rc}\n{r2.out}{r2.err}")


# --- iotest 039's subject: lazy refcounts and the dirty bit ------------------------------------

ERR_REFCOUNT = re.compile(r"^ERROR cluster (\d+) refcount=0 reference=1$", re.M)


@pytest.mark.parametrize("seed", [SEED + 39, SEED + 390])
def test_lazy_refcounts_dirty_after_kill_like_qemu(seed: int, tmp_path: Path, oracle_tools: None):
    """A lazy-refcount image whose server was killed after a FLUSH, mid-way through
    more writes: dirty bit set, refcounts of the flushed allocations missing (what
    QEMU's check reports for its own crash: "refcount=0 reference=1" corruptions);
    our check and our repairs say and do what qemu-img's do; a read-only open
    leaves the image alone; a read-write open of our server repairs it."""
    rng = random.Random(seed)
    shape = Shape("lazy-refcounts", 8 * MiB, 64 * KiB)
    rc = Recipe(tmp_path / "img")
    rc.create("top.qcow2", shape.size, lazy_refcounts=True)
    image = rc.image("top.qcow2")
    model = Model(bytes(shape.size), None)
    first = [
        Op(i + 1, "write", off, 3 * KiB + i * 70 * KiB, data=rng.randbytes(3 * KiB + i * 70 * KiB))
        for i, off in enumerate(rng.sample(range(0, shape.size - MiB, 512 * KiB), 6))
    ]
    rest = plan(rng, shape, 40)
    for k, op in enumerate(rest):
        op.seq = len(first) + 2 + k
    ops = [*first, Op(len(first) + 1, "flush"), *rest]
    crash = Crash(ops, kill_after=len(first) + 1 + rng.randint(1, 20))
    context = [f"seed {seed} (CRASH_SEED={SEED})"]

    def fail(msg: str) -> None:
        parts = [*context, msg, f"--- requests sent:\n{crash.log()}", "--- image:\n" + rc.script()]
        pytest.fail("\n".join(parts), pytrace=False)

    with our_nbd(image, tmp_path / "srv1", writable=True) as srv:
        drive(srv.uri, srv.pid, crash, model)
    if crash.problems:
        fail("\n".join(crash.problems))
    context.append(f"killed after {crash.replies} replies, {crash.killed_with_in_flight} in flight")

    if not read_header(image.abspath)["incompatible_features"] & 1 or not dirty_flag(image):
        fail("the killed lazy-refcount image is not marked dirty")
    ref = run(["qemu-img", "check", image.path], image.cwd)
    if ref.rc != 2:
        fail(f"qemu-img check of the dirty image: rc={ref.rc} (2 expected)\n{ref.out}{ref.err}")
    # the data clusters of the flushed writes are in the L2 tables but not refcounted
    mapped = run(["qemu-img", "map", "-U", "--output=json", image.path], image.cwd)
    hosts = set()
    for e in json.loads(mapped.out):
        for w in first:
            last = w.offset + w.length - 1  # the write's last byte
            if e.get("data") and "offset" in e and e["start"] <= last < e["start"] + e["length"]:
                hosts.add((e["offset"] + last - e["start"]) >> 16)
    missing = hosts - {int(c) for c in ERR_REFCOUNT.findall(ref.err)}
    if missing:
        fail(f"qemu-img check misses flushed data clusters {sorted(missing)}:\n{ref.err}{ref.out}")

    def differ(what: str, r: Result, o: Result) -> None:
        theirs = f"--- {r.cmdline()} rc={r.rc}\n{r.out}{r.err}"
        fail(f"{what} differs:\n{theirs}\n--- ours rc={o.rc}\n{o.out}{o.err}")

    for extra in ((), ("--output=json",)):
        r = run(["qemu-img", "check", *extra, image.path], image.cwd)
        o = run([PYTHON, "-m", "qcow2", "check", *extra, image.path], image.cwd)
        if (r.rc, r.out, r.err) != (o.rc, o.out, o.err):
            differ("check", r, o)

    # repairs on copies: ours and qemu-img's, same words, same outcome
    for mode in ("leaks", "all"):
        q = clone(image, tmp_path / f"qemu-{mode}")
        o = clone(image, tmp_path / f"ours-{mode}")
        r1 = run(["qemu-img", "check", "-r", mode, q.path], q.cwd)
        r2 = run([PYTHON, "-m", "qcow2", "check", "-r", mode, o.path], o.cwd)
        if (r1.rc, r1.out) != (r2.rc, r2.out):
            differ(f"check -r {mode}", r1, r2)
        if mode == "all":
            same = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", q.path, str(o.abspath)], q.cwd)
            after, _ = check_report(o)
            if same.rc != 0 or after.rc != 0 or dirty_flag(o):
                fail(f"after our check -r all: compare rc={same.rc} {same.out}; check {after.rc} {after.out}")

    # read-only: served as it is, nothing repaired
    before = image.abspath.read_bytes()
    with our_nbd(image, tmp_path / "srv-ro") as srv:
        ro_view = read_all(srv.uri, shape.size)
    if image.abspath.read_bytes() != before:
        fail("a read-only export changed the dirty image")
    bad = model.violations(ro_view)
    if bad:
        fail("read-only export of the dirty image:\n" + "\n".join(bad))

    # read-write: repaired on open, the data still there, clean afterwards
    with our_nbd(image, tmp_path / "srv2", writable=True) as srv:
        rw_view = read_all(srv.uri, shape.size)
    if rw_view != ro_view:
        fail("the repaired image reads differently from the dirty one")
    r, report = check_report(image)
    if r.rc != 0 or dirty_flag(image) or any(report.get(k) for k in ("corruptions", "leaks", "check-errors")):
        fail(f"after our repair: {r.cmdline()} rc={r.rc}\n{r.out}{r.err}")
