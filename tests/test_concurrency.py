"""Requests side by side: real clients, several connections, one disk.

(a) a whole-disk ``qemu:allocation-depth`` map of a fragmented image (512-byte
    clusters, every other one allocated) does not hold up another client's
    4 KiB reads, and its answer is still qemu-nbd's;
(b) reads from two connections really overlap: on a host file that takes
    DELAY to answer each read, two reads sent at once finish in about DELAY,
    not twice that;
(c) 8 connections write, zero, trim and read at once (each in regions of its
    own, interleaved inside shared clusters and L2 tables); afterwards the
    image holds exactly what the model of acknowledged requests says, passes
    ``qemu-img check``, and equals a twin to which qemu-io applied the same
    requests.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from images import KiB, MiB, Recipe
from inprocess import in_process_server
from servers import our_nbd, qemu_nbd, run

import qcow2
from nbdserver.export import Export
from nbdserver.server import Server
from qcow2.contract import WouldBlock, waiting_allowed
from qcow2.hostfile import HostFile

READ_DEADLINE = 0.1  # seconds a 4 KiB read may take while another client maps the whole disk


# --- (a) a long block status does not hold up reads -------------------------------------------


def _fragmented(rc: Recipe, size: int) -> bytes:
    """A qcow2 with 512-byte clusters, every other one allocated (qemu-img convert -S 512)."""
    rng = random.Random(size)
    content = bytearray(size)
    for off in range(0, size, 1024):
        content[off : off + 512] = bytes([rng.randrange(1, 256)]) * 512
    (rc.root / "src.raw").write_bytes(content)
    rc.img(
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-S",
        "512",
        "-o",
        "cluster_size=512",
        "src.raw",
        "f.qcow2",
    )
    return bytes(content)


def test_reads_are_not_held_up_by_a_whole_disk_depth_map(tmp_path: Path, recipe: Recipe) -> None:
    size = 128 * MiB
    content = _fragmented(recipe, size)
    image = recipe.image("f.qcow2")
    argv = ["nbdinfo", "--map=qemu:allocation-depth"]
    with qemu_nbd(image, tmp_path / "qemu") as ref:
        expected = run([*argv, ref.uri], tmp_path, timeout=120)
    assert expected.rc == 0 and expected.out.count("\n") == size // 512, expected.err
    rng = random.Random(1)
    with our_nbd(image, tmp_path / "ours") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pread(4096, 0)
        map_out, map_err = open(tmp_path / "map.out", "w+"), open(tmp_path / "map.err", "w+")  # noqa: SIM115
        mapper = subprocess.Popen([*argv, srv.uri], stdout=map_out, stderr=map_err, cwd=tmp_path)
        latencies = []
        while mapper.poll() is None:
            offset = rng.randrange(size // 4096) * 4096
            t0 = time.monotonic()
            data = h.pread(4096, offset)
            latencies.append(time.monotonic() - t0)
            assert data == content[offset : offset + 4096], offset
        mapper.wait()
        h.shutdown()
    out, err = (tmp_path / "map.out").read_text(), (tmp_path / "map.err").read_text()
    map_out.close(), map_err.close()
    assert mapper.returncode == 0, err
    assert out == expected.out, "the depth map differs from qemu-nbd's"
    assert len(latencies) >= 20, f"only {len(latencies)} reads while the map ran: the test shows nothing"
    slow = sorted(latencies)[-3:]
    assert max(latencies) < READ_DEADLINE, (
        f"{len(latencies)} reads during the map, slowest {[f'{x * 1000:.0f} ms' for x in slow]}"
    )


def test_reads_are_not_held_up_by_pipelined_whole_disk_depth_queries(tmp_path: Path, recipe: Recipe) -> None:
    """The issue's pattern: one client sends 8 whole-disk allocation-depth queries at once
    (each answered with a capped reply), another reads meanwhile."""
    size = 128 * MiB
    content = _fragmented(recipe, size)
    image = recipe.image("f.qcow2")
    replies: list[int] = []

    def on_extents(context: str, offset: int, entries: list[int], err: int) -> int:
        replies.append(len(entries) // 2)
        return 0

    with our_nbd(image, tmp_path / "ours") as srv:
        mapper = nbd.NBD()
        mapper.add_meta_context("qemu:allocation-depth")
        mapper.connect_uri(srv.uri)
        reader = nbd.NBD()
        reader.connect_uri(srv.uri)
        reader.pread(4096, 0)
        for _ in range(8):
            mapper.aio_block_status(size, 0, on_extents)
        latencies, stop = [], threading.Event()

        def read_meanwhile() -> None:
            rng = random.Random(2)
            while not stop.is_set():
                offset = rng.randrange(size // 4096) * 4096
                t0 = time.monotonic()
                data = reader.pread(4096, offset)
                latencies.append(time.monotonic() - t0)
                assert data == content[offset : offset + 4096], offset

        t = threading.Thread(target=read_meanwhile)
        t.start()
        try:
            while mapper.aio_in_flight() > 0:
                mapper.poll(-1)
        finally:
            stop.set()
            t.join(30)
        mapper.shutdown(), reader.shutdown()
    assert replies == [131072] * 8, "each whole-disk query gets one capped reply (qemu-nbd's 1 MiB / 8)"
    assert len(latencies) >= 20, f"only {len(latencies)} reads while the queries ran: the test shows nothing"
    slow = sorted(latencies)[-3:]
    assert max(latencies) < READ_DEADLINE, (
        f"{len(latencies)} reads during the queries, slowest {[f'{x * 1000:.0f} ms' for x in slow]}"
    )


# --- (b) reads from several connections overlap ---------------------------------------------------

DELAY = 0.3


class SlowFile(HostFile):
    """A host file on a slow device: once armed, every read takes DELAY (nothing is ever cached)."""

    armed = threading.Event()

    def _wait_for_device(self) -> None:
        if self.armed.is_set():
            if not waiting_allowed():
                raise WouldBlock(11, "slow device")
            time.sleep(DELAY)

    def pread(self, offset: int, length: int) -> bytes:
        self._wait_for_device()
        return super().pread(offset, length)

    read = pread

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._wait_for_device()
        super().readinto(offset, buf)


def test_reads_from_two_connections_overlap(tmp_path: Path, recipe: Recipe) -> None:
    recipe.create("s.qcow2", 8 * MiB)
    recipe.io("s.qcow2", "write -P 0x11 0 4M", "write -P 0x22 4M 4M")
    path = recipe.root / "s.qcow2"
    SlowFile.armed.clear()
    disk = qcow2.open_disk(str(path), read_only=True, opener=SlowFile)
    try:
        for offset in (0, 4 * MiB):  # tables and refcounts cached before the device turns slow
            disk.read_sparse(offset, 4096)
        uri = f"nbd+unix:///?socket={tmp_path / 's.sock'}"
        with in_process_server(lambda: Server({"": Export("", disk)}), tmp_path / "s.sock"):
            handles = []
            for _ in range(2):
                h = nbd.NBD()
                h.connect_uri(uri)
                handles.append(h)
            SlowFile.armed.set()
            results: dict[int, bytes] = {}
            barrier = threading.Barrier(2)

            def one(i: int) -> None:
                barrier.wait(5)
                results[i] = handles[i].pread(4096, i * 4 * MiB)

            t0 = time.monotonic()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            elapsed = time.monotonic() - t0
            SlowFile.armed.clear()
            for h in handles:
                h.shutdown()
    finally:
        SlowFile.armed.clear()
        disk.close()
    assert results == {0: b"\x11" * 4096, 1: b"\x22" * 4096}
    assert DELAY <= elapsed < 1.6 * DELAY, f"two reads of {DELAY}s each took {elapsed:.2f}s together"


# --- (c) 8 connections at once, against a model and against qemu-io -------------------------------

CONNECTIONS = 8
GRANULE = 4 * KiB


@dataclass
class Op:
    kind: str  # write, zero, zero-unmap, trim, read, flush
    offset: int = 0
    length: int = 0
    pattern: int = 0
    fua: bool = False

    def qemu_io(self) -> str | None:
        if self.kind == "write":
            return f"write -q -P {self.pattern} {self.offset} {self.length}"
        if self.kind in ("zero", "zero-unmap"):
            return f"write -q -z {'-u ' if self.kind == 'zero-unmap' else ''}{self.offset} {self.length}"
        if self.kind == "trim":
            return f"discard -q {self.offset} {self.length}"
        return None


class Layout:
    """Who owns what: 4 KiB granules interleaved in the first half, whole clusters in the second."""

    def __init__(self, size: int, cluster: int) -> None:
        self.size, self.cluster = size, cluster
        self.half = size // 2

    def granules(self, conn: int) -> list[int]:
        return [g * GRANULE for g in range(self.half // GRANULE) if g % CONNECTIONS == conn]

    def clusters(self, conn: int) -> list[int]:
        first = self.half // self.cluster
        return [c * self.cluster for c in range(first, self.size // self.cluster) if c % CONNECTIONS == conn]

    def plan(self, conn: int, rng: random.Random, count: int) -> list[Op]:
        ops = []
        granules, clusters = self.granules(conn), self.clusters(conn)
        for _ in range(count):
            r = rng.random()
            if rng.random() < 0.5:
                offset, length = rng.choice(granules), GRANULE
            else:
                base = rng.choice(clusters)
                start = rng.randrange(self.cluster // 512) * 512
                offset, length = base + start, rng.randrange(1, (self.cluster - start) // 512 + 1) * 512
                if rng.random() < 0.3:
                    offset, length = base, self.cluster
            if r < 0.4:
                ops.append(Op("write", offset, length, rng.randrange(1, 256), fua=rng.random() < 0.1))
            elif r < 0.55:
                ops.append(Op(rng.choice(["zero", "zero-unmap"]), offset, length, fua=rng.random() < 0.1))
            elif r < 0.65:
                ops.append(Op("trim", offset, length))
            elif r < 0.95:
                ops.append(Op("read", offset, length))
            else:
                ops.append(Op("flush"))
        return ops


def _apply(model: bytearray, op: Op, cluster: int) -> None:
    if op.kind == "write":
        model[op.offset : op.offset + op.length] = bytes([op.pattern]) * op.length
    elif op.kind in ("zero", "zero-unmap"):
        model[op.offset : op.offset + op.length] = bytes(op.length)
    elif op.kind == "trim" and op.offset % cluster == 0 and op.length % cluster == 0:
        model[op.offset : op.offset + op.length] = bytes(op.length)  # whole clusters read as zeros after


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backing"])
def test_eight_connections_at_once_match_the_model_and_qemu(tmp_path: Path, backing: bool) -> None:
    size, cluster = 16 * MiB, 64 * KiB
    rc = Recipe(tmp_path / "img")
    if backing:
        rc.create("base.qcow2", size)
        rc.io("base.qcow2", "write -P 0x5b 0 16M", "write -z 3M 1M")
        rc.create("top.qcow2", size, backing="base.qcow2", backing_fmt="qcow2")
    else:
        rc.create("top.qcow2", size)
    image = rc.image("top.qcow2")
    start = bytearray(size)
    if backing:
        start[:] = b"\x5b" * size
        start[3 * MiB : 4 * MiB] = bytes(MiB)
    twin = tmp_path / "twin"
    shutil.copytree(rc.root, twin)
    layout = Layout(size, cluster)
    plans = [layout.plan(c, random.Random(1000 * c + backing), 120) for c in range(CONNECTIONS)]
    models = [bytearray(start) for _ in range(CONNECTIONS)]  # each connection's view of its own regions
    failures: list[str] = []

    def client(conn: int, uri: str) -> None:
        h = nbd.NBD()
        h.connect_uri(uri)
        model = models[conn]
        try:
            for i, op in enumerate(plans[conn]):
                flags = nbd.CMD_FLAG_FUA if op.fua else 0
                if op.kind == "write":
                    h.pwrite(bytes([op.pattern]) * op.length, op.offset, flags)
                elif op.kind == "zero":
                    h.zero(op.length, op.offset, flags | nbd.CMD_FLAG_NO_HOLE)
                elif op.kind == "zero-unmap":
                    h.zero(op.length, op.offset, flags)
                elif op.kind == "trim":
                    h.trim(op.length, op.offset)
                elif op.kind == "flush":
                    h.flush()
                else:
                    got = h.pread(op.length, op.offset)
                    if got != model[op.offset : op.offset + op.length]:
                        failures.append(f"connection {conn} op {i}: read {op} differs from the model")
                        return
                _apply(model, op, cluster)
            h.flush()
        finally:
            h.shutdown()

    with our_nbd(image, tmp_path / "srv", writable=True) as srv:
        threads = [threading.Thread(target=client, args=(c, srv.uri)) for c in range(CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert srv.exit_problem is None, srv.stderr()
    assert not failures, "\n".join(failures)

    expected = bytearray(start)
    for conn in range(CONNECTIONS):
        for off in layout.granules(conn):
            expected[off : off + GRANULE] = models[conn][off : off + GRANULE]
        for off in layout.clusters(conn):
            expected[off : off + cluster] = models[conn][off : off + cluster]
    guest = tmp_path / "guest.raw"
    r = run(["qemu-img", "convert", "-O", "raw", image.path, str(guest)], image.cwd)
    assert r.rc == 0, r.err
    got = guest.read_bytes()
    if got != expected:
        first = next(i for i in range(size) if got[i] != expected[i])
        pytest.fail(
            f"guest bytes differ from the model at {first:#x}: {got[first]:#x} != {expected[first]:#x}"
        )
    check = run(["qemu-img", "check", image.path], image.cwd)
    assert check.rc == 0, check.out + check.err

    commands = [c for plan in plans for op in plan if (c := op.qemu_io())]
    cmds_file = tmp_path / "twin.cmds"
    cmds_file.write_text("\n".join(commands) + "\n")
    with open(cmds_file) as stdin:
        p = subprocess.run(["qemu-io", "top.qcow2"], stdin=stdin, cwd=twin, capture_output=True, text=True)
    assert p.returncode == 0 and "failed" not in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    same = run(["qemu-img", "compare", "top.qcow2", str(image.abspath)], twin)
    assert same.rc == 0, same.out + same.err
    assert os.path.getsize(image.abspath) > 0
