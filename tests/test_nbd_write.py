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

import errno
import json
import os
import random
import shlex
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from nbd_wire import RawClient, Server, run, tool, wait_pid_exit

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
    p = subprocess.run(
        [tool("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
        capture_output=True,
        text=True,
    )
    return "" if p.returncode == 0 else (p.stdout + p.stderr).strip()


# --- several connections, nbdcopy --------------------------------------------------------


def test_nbdcopy_raw_file_into_the_export_over_several_connections(tmp_path: Path):
    src = tmp_path / "src.raw"
    rng = random.Random(SEED)
    with open(src, "wb") as f:  # data, zero runs and holes
        f.truncate(32 * MiB)
        for _ in range(40):
            f.seek(rng.randrange(32 * MiB - MiB))
            f.write(
                rng.randbytes(rng.randrange(1, MiB)) if rng.random() < 0.7 else bytes(rng.randrange(1, MiB))
            )
    img = tmp_path / "dst.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 32M", img)  # stale data everywhere
    server = Server(img, tmp_path / "srv", ("-v",))
    try:
        run(
            "nbdcopy",
            "--connections=4",
            "--threads=4",
            "--requests=16",
            "--request-size=1048576",
            src,
            server.uri,
        )
    finally:
        server.stop()
    assert "client 4: connected" in server.log.read_text()  # nbdcopy did use several connections
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, img)
    check_clean(img)


def test_flush_on_one_connection_covers_writes_replied_on_another(tmp_path: Path):
    """CAN_MULTI_CONN: write on A (reply received), FLUSH on B, kill -9: the data is in the file.

    The driver keeps L2 updates in memory until a flush, so without B's flush
    reaching A's write the data would be lost with the process.
    """
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "64M")
    server = Server(img, tmp_path / "srv")
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(server.uri)
    b.connect_uri(server.uri)
    assert a.can_multi_conn() and b.can_multi_conn()
    a.pwrite(b"\xab" * (3 * MiB), 5 * MiB + 512)
    a.zero(MiB, 40 * MiB)
    b.flush()
    os.kill(server.pid, signal.SIGKILL)
    assert wait_pid_exit(server.pid)
    out = run(
        "qemu-io",
        "-r",
        "-f",
        "qcow2",
        "-c",
        f"read -P 0xab {5 * MiB + 512} {3 * MiB}",
        "-c",
        "read -P 0 0 1M",
        img,
    )
    assert "read 3145728/3145728" in out and "read 1048576/1048576" in out
    # Reopened read-write by our server: the lazy-refcount image is repaired, the data still there.
    server = Server(img, tmp_path / "srv2")
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        assert h.pread(3 * MiB, 5 * MiB + 512) == b"\xab" * (3 * MiB)
        h.shutdown()
    finally:
        server.stop()
    check_clean(img)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_finishes_writes_in_flight_and_leaves_the_image_clean(tmp_path: Path, sig):
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "64M")
    sock = tmp_path / "s.sock"
    p = subprocess.Popen(
        [sys.executable, "-m", "nbdserver", "-v", "-k", str(sock), str(img)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in p.stderr:
            if "serving" in line:
                break
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        h.pwrite(b"\x01" * 4096, 0)
        assert json.loads(run("qemu-img", "info", "-U", "--output=json", img))["dirty-flag"]
        bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * MiB) for i in range(32)]
        done: dict[int, int] = {}  # write index -> errno (0: success)

        def completed(i: int, err) -> int:
            done[i] = err.value
            return 1

        for i, buf in enumerate(bufs):
            h.aio_pwrite(buf, i * MiB + 4096, completion=lambda err, i=i: completed(i, err))
        while not done:
            h.poll(-1)  # the server is busy with the batch
        p.send_signal(sig)
        while h.aio_in_flight():
            try:
                h.poll(-1)
            except nbd.Error:
                break  # the server closed after its last reply; unanswered writes fail in libnbd
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    # Received writes were served; those still queued behind them got ESHUTDOWN (or no answer).
    ok = sorted(i for i, e in done.items() if e == 0)
    assert ok and set(done.values()) <= {0, errno.ESHUTDOWN, errno.ENOTCONN}, done
    check_clean(img)  # includes: no dirty flag
    cmds = [f"read -P {i + 1:#x} {i * MiB + 4096} {MiB}" for i in ok]
    out = run(*qemu_io("qcow2", img, ["read -P 1 0 4096", *cmds]))
    assert out.count("read ") == len(ok) + 1 and "Pattern verification failed" not in out


def test_concurrent_writes_reads_and_flushes_on_shared_clusters(tmp_path: Path):
    """Four connections, many requests each: neighbouring 512-byte slots of the same
    unallocated clusters written at once, reads of the slots during the allocations,
    flushes in between.  A slot reads as zeros or as its pattern, never anything else,
    and as its pattern once its write was answered."""
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, "16M")
    server = Server(img, tmp_path / "srv")
    slot, clients, slots = 512, 4, 16 * MiB // 512 // 8  # the first 2 MiB, slot i owned by client i % 4
    errors: list[BaseException] = []

    def pattern(i: int) -> bytes:
        return bytes([i % 251 + 1]) * slot

    def client(k: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(server.uri)
            mine = list(range(k, slots, clients))
            random.Random(k).shuffle(mine)
            pending: dict[int, tuple[str, int, nbd.Buffer | None]] = {}
            written: set[int] = set()
            for n, i in enumerate(mine):
                buf = nbd.Buffer.from_bytearray(bytearray(pattern(i)))
                pending[h.aio_pwrite(buf, i * slot)] = ("w", i, buf)
                j = (i + 1) % slots  # a neighbour (another client's slot), maybe being allocated now
                rbuf = nbd.Buffer(slot)
                pending[h.aio_pread(rbuf, j * slot)] = ("r", j, rbuf)
                if n % 50 == 0:
                    pending[h.aio_flush()] = ("f", 0, None)
                while h.aio_in_flight() > 32 or (n == len(mine) - 1 and h.aio_in_flight()):
                    h.poll(-1)
                for cookie in [c for c in pending if h.aio_command_completed(c)]:
                    kind, idx, b = pending.pop(cookie)
                    if kind == "w":
                        written.add(idx)
                    elif kind == "r":
                        got = bytes(b.to_bytearray())
                        assert got in (bytes(slot), pattern(idx)), f"slot {idx} read {got[:8].hex()}..."
            assert not pending and written == set(mine)
            for i in mine:  # answered writes are visible
                assert h.pread(slot, i * slot) == pattern(i)
            h.shutdown()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.stop()
    assert errors == [], errors[0]
    check_clean(img)
    expected = b"".join(pattern(i) for i in range(slots))
    out = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out)
    flat = out.read_bytes()
    assert flat[: len(expected)] == expected and flat[len(expected) :].count(0) == len(flat) - len(expected)


# --- protocol-level answers (raw socket) -------------------------------------------------

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95
SIZE = 64 * MiB
CLUSTER = 64 * KiB


@pytest.fixture(scope="module")
def rw_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rw")
    img = tmp / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", img, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {MiB}", img)
    s = Server(img, tmp / "srv")
    yield s
    s.stop()
    check_clean(img)


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def rw_client(rw_server, request):
    with RawClient(rw_server.sock) as c:
        c.structured = request.param
        c.go(structured=request.param)
        yield c


def answer(c: RawClient, cookie: int, read_length: int = 0) -> tuple[int, bytes]:
    """(error, data) of the reply to ``cookie``."""
    if c.structured:
        chunks = c.structured_reply()
        assert {ck for _, ck, _ in chunks} == {cookie}
        data = bytearray(read_length)  # OFFSET_DATA and OFFSET_HOLE chunks, placed by offset
        base = min((struct.unpack(">Q", p[:8])[0] for k, _, p in chunks if k in (1, 2)), default=0)
        for k, _, p in chunks:
            if k == 1:
                off = struct.unpack(">Q", p[:8])[0] - base
                data[off : off + len(p) - 8] = p[8:]
        data = bytes(data)
        errs = [struct.unpack(">I", p[:4])[0] for k, _, p in chunks if k & 0x8000]
        return (errs[0] if errs else 0), data
    error, got = c.simple_reply()
    assert got == cookie
    return error, (c.recv_exactly(read_length) if read_length and not error else b"")


def no_data_answers(c: RawClient, n: int) -> dict[int, int]:
    """cookie -> error of the next ``n`` replies to requests without data, in any order."""
    out = {}
    for _ in range(n):
        if c.structured:
            chunks = c.structured_reply()
            out[chunks[0][1]] = c.error_of(chunks)
        else:
            error, cookie = c.simple_reply()
            out[cookie] = error
    return out


def read(c: RawClient, offset: int, length: int, cookie: int = 99) -> bytes:
    c.request(READ, offset, length, cookie=cookie)
    error, data = answer(c, cookie, length)
    assert error == 0
    return data


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "payload", "error"),
    [
        (WRITE, SIZE - 512, 1024, 0, 1024, ENOSPC),
        (WRITE, SIZE, 1, 0, 1, ENOSPC),
        (WRITE, 2**64 - 512, 1024, 0, 1024, ENOSPC),
        (WRITE_ZEROES, SIZE - 512, 1024, 0, 0, ENOSPC),
        (WRITE_ZEROES, SIZE + 1, 0, NO_HOLE, 0, ENOSPC),
        (TRIM, SIZE - 512, 1024, 0, 0, EINVAL),
        (TRIM, SIZE + 4096, 4096, FUA, 0, EINVAL),
        (WRITE, 0, 512, DF, 512, EINVAL),  # payload consumed all the same
        (WRITE, 0, 512, 1 << 9, 512, EINVAL),
        (WRITE, 0, 32 * MiB + 1, 0, 32 * MiB + 1, EINVAL),
        (WRITE_ZEROES, 0, 4096, REQ_ONE, 0, EINVAL),
        (TRIM, 0, 4096, NO_HOLE, 0, EINVAL),
        (WRITE, 0, 0, 0, 0, 0),
        (WRITE, 0, 0, FUA, 0, 0),
        (WRITE_ZEROES, 0, 0, FUA | NO_HOLE, 0, 0),
        (TRIM, 0, 0, FUA, 0, 0),
    ],
)
def test_write_errors_and_the_connection_goes_on(rw_client, cmd, offset, length, flags, payload, error):
    rw_client.request(cmd, offset, length, flags, cookie=7)
    block = b"\xee" * MiB
    for done in range(0, payload, MiB):
        rw_client.sock.sendall(block[: min(MiB, payload - done)])
    assert answer(rw_client, 7)[0] == error
    assert read(rw_client, 4096, 512) == b"\x5a" * 512  # nothing was written, the stream is in sync


@pytest.mark.parametrize("flags", [0, FUA])
def test_writes_zeroes_trims_read_back(rw_client, flags):
    c, base = rw_client, 8 * MiB + (flags + c_id(rw_client)) * MiB
    data = random.Random(base).randbytes(3 * CLUSTER + 1234)
    c.request(WRITE, base + 100, len(data), flags, cookie=1, payload=data)
    assert answer(c, 1)[0] == 0
    assert read(c, base + 100, len(data)) == data
    c.request(WRITE_ZEROES, base + 1000, 5000, flags | NO_HOLE, cookie=2)  # unaligned: written as data
    c.request(WRITE_ZEROES, base + CLUSTER, CLUSTER, flags, cookie=3)  # a whole cluster: may unmap
    c.request(TRIM, base + 2 * CLUSTER, CLUSTER, flags, cookie=4)
    c.request(FLUSH, 0, 0, flags, cookie=5)
    assert no_data_answers(c, 4) == {2: 0, 3: 0, 4: 0, 5: 0}
    expect = bytearray(data)
    expect[900 : 900 + 5000] = bytes(5000)
    expect[CLUSTER - 100 : 2 * CLUSTER - 100] = bytes(CLUSTER)
    got = read(c, base + 100, len(data))
    trimmed = slice(2 * CLUSTER - 100, 3 * CLUSTER - 100)  # TRIM: contents undefined afterwards
    assert got[: trimmed.start] == expect[: trimmed.start] and got[trimmed.stop :] == expect[trimmed.stop :]


def c_id(c: RawClient) -> int:
    return 0 if c.structured else 2


def test_fast_zero(rw_server):
    with RawClient(rw_server.sock) as c:
        c.structured = True
        c.go()
        before = read(c, 0, 2 * CLUSTER)
        c.request(WRITE_ZEROES, 4096, 4096, FAST_ZERO, cookie=1)  # part of a data cluster: needs a write
        assert answer(c, 1)[0] == ENOTSUP
        c.request(WRITE_ZEROES, 4096, 4096, FAST_ZERO | NO_HOLE, cookie=2)
        assert answer(c, 2)[0] == ENOTSUP
        assert read(c, 0, 2 * CLUSTER) == before  # unchanged
        c.request(WRITE_ZEROES, CLUSTER, CLUSTER, FAST_ZERO, cookie=3)  # a whole cluster: a zero flag
        assert answer(c, 3)[0] == 0
        assert read(c, 0, 2 * CLUSTER) == before[:CLUSTER] + bytes(CLUSTER)
        c.request(WRITE_ZEROES, 4096, 4096, 0, cookie=4)  # without FAST_ZERO the same range works
        assert answer(c, 4)[0] == 0
        assert read(c, 0, CLUSTER) == before[:4096] + bytes(4096) + before[8192:CLUSTER]


@pytest.mark.parametrize("read_only", [False, True])
def test_advertised_flags(tmp_path: Path, read_only):
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    s = Server(img, tmp_path / "srv", ("-r",) if read_only else ())
    try:
        info = json.loads(run("nbdinfo", "--json", s.uri))["exports"][0]
        keys = ("can_write", "can_trim", "can_zero", "can_fast_zero")
        if read_only:
            assert info["is_read_only"] and not any(info.get(k) for k in keys if k != "can_write")
        else:
            assert not info["is_read_only"] and all(info[k] for k in keys[1:])
        assert info["can_multi_conn"] and info["can_fua"] and info["can_flush"]
        with RawClient(s.sock) as c:
            tflags = c.go()
        writable = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800
        assert tflags == (0x1 | 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x400 if read_only else writable)
        if read_only:
            with RawClient(s.sock) as c:
                c.structured = True
                c.go()
                for ck, cmd in enumerate((WRITE, WRITE_ZEROES, TRIM)):
                    c.request(cmd, 0, 512, cookie=ck, payload=bytes(512) if cmd == WRITE else b"")
                    assert answer(c, ck)[0] == EPERM
    finally:
        s.stop()


@pytest.mark.parametrize("shared", ["1", "2"])
def test_multi_conn_only_when_a_second_client_may_connect(tmp_path: Path, shared: str):
    """qemu-nbd -e 1 does not advertise CAN_MULTI_CONN (nbdcopy would open connections that
    can only wait); neither do we.  With -e 2 both do."""
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    flags = {}
    s = Server(img, tmp_path / "ours", ("-e", shared))
    try:
        flags["ours"] = json.loads(run("nbdinfo", "--json", s.uri))["exports"][0]["can_multi_conn"]
    finally:
        s.stop()
    sock, pid = tmp_path / "q.sock", tmp_path / "q.pid"
    run("qemu-nbd", "-e", shared, "-t", "-f", "qcow2", "-k", sock, "--fork", "--pid-file", pid, img)
    try:
        flags["qemu"] = json.loads(run("nbdinfo", "--json", f"nbd+unix:///?socket={sock}"))["exports"][0][
            "can_multi_conn"
        ]
    finally:
        os.kill(int(pid.read_text()), signal.SIGTERM)
        wait_pid_exit(int(pid.read_text()))
    assert flags["ours"] == flags["qemu"] == (shared != "1"), flags


def test_inline_reads_wait_while_a_worker_is_inside_a_write(tmp_path: Path):
    """A qcow2 disk lets reads overlap, not reads and writes: a small read tried on the
    event loop is turned away (to a worker) while a write holds the disk, and runs
    beside another read."""
    import qcow2
    from nbdserver import commands
    from nbdserver.export import Export
    from nbdserver.handshake import Negotiated
    from nbdserver.requests import Request
    from nbdserver.server import Server as NbdServer
    from qcow2.contract import Access, ThreadModel

    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    disk = qcow2.open_disk(str(img), fmt="qcow2", read_only=False)
    assert disk.thread_model == ThreadModel.PARALLEL_READS
    export = Export("", disk)
    state = Negotiated(export, True, [], export.transmission_flags(True))
    small_read = Request(0, READ, 1, 0, 4096)
    assert NbdServer.can_run_inline(small_read)
    inside, release = threading.Event(), threading.Event()

    def hold(access: Access) -> None:
        with export.gate.entered(access):
            inside.set()
            assert release.wait(10)
            if access == Access.WRITE:
                disk.write(0, b"x" * 512)

    try:
        for access, inline in ((Access.WRITE, False), (Access.READ, True)):
            inside.clear(), release.clear()
            worker = threading.Thread(target=hold, args=(access,))
            worker.start()
            assert inside.wait(10)
            reply = commands.run(export, small_read, state, wait=False)
            assert (reply is not None) == inline, access
            release.set()
            worker.join(10)
            assert commands.run(export, small_read, state, wait=False) is not None  # the disk is free
        assert bytes(disk.read(0, 512)) == b"x" * 512
    finally:
        disk.close()
