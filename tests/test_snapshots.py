"""``qcow2 snapshot`` (issue 9 §4) against ``qemu-img snapshot`` on copies of the same image.

The same sequence of snapshot operations, with the same qemu-io writes between
them, runs through qemu-img on one copy and through ``qcow2 snapshot`` on the
other.  Every step must succeed or fail alike (same words), leave our copy
clean for ``qemu-img check``, and in the end QEMU must see the same snapshots
(``qemu-img info``), the same guest bytes in the active state and in every
snapshot (``qemu-img convert -l``), and for the plain sequences the very
same file, byte for byte, but for the dates.  QEMU reads everything here:
the images are made by qemu-img/qemu-io, and it judges ours.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nbd_wire import wait_pid_exit

from qcow2.format.snapshots import Snapshot, next_snapshot_id

QCOW2 = (sys.executable, "-m", "qcow2")
QCOW2_NBD = (sys.executable, "-m", "nbdserver")
MiB = 1 << 20
SIZE = 32 * MiB

BASE_WRITES = [
    "write -P 1 0 1M",
    "write -c -P 5 4M 256k",  # compressed
    "write -z 8M 64k",  # zero (unallocated before)
    "write -P 3 9M 128k",
    "write -z 9M 64k",  # zero over data: an allocated zero cluster (v3)
    "write -P 4 12345678 70000",  # unaligned, two clusters
    "write -P 6 31M 1M",  # the disk's tail
]
# Between the steps: overwrites of shared clusters (copy-on-write), partial writes, discards and
# zero writes over shared data, compressed clusters overwritten and discarded, new clusters.
WRITES = [
    ["write -P 0x11 0 512k", "write -P 0x12 4M 4k", "discard 9M 128k"],
    ["write -P 0x21 100k 1M", "write -z 31M 512k", "write -P 0x22 20M 2M"],
    ["write -P 0x31 12345678 100", "discard 4M 256k", "write -z -u 0 64k"],
    ["write -P 0x41 5M 3M", "write -P 0x42 16M 128k"],
]  # no compressed writes here: QEMU compresses clusters in threads and places them as they finish
STEPS = [
    ("-c", "s1"),
    0,
    ("-c", "s2"),
    ("-c", "s1"),  # a second snapshot of that name: qemu-img allows it
    1,
    ("-d", "s1"),  # the first of the two
    ("-a", "s2"),
    2,
    ("-c", "s3"),
    ("-a", "3"),  # an id
    3,
    ("-d", "s2"),
    ("-c", "s4"),
]
KINDS = {
    "v3": ("-o", "compat=1.1"),
    "v2": ("-o", "compat=0.10"),
    "extended-l2": ("-o", "extended_l2=on"),
    "4k-clusters": ("-o", "cluster_size=4096"),
    "lazy-refcounts": ("-o", "lazy_refcounts=on"),
    "refcount-bits-64": ("-o", "refcount_bits=64"),
    "backing": ("-b", "base.qcow2", "-F", "qcow2"),
}


def sh(
    *argv: str, check: bool = True, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def message(stderr: str) -> str:
    """The last line of a tool's error, without the program name in front."""
    lines = stderr.strip().splitlines() or [""]
    return lines[-1].split(": ", 1)[-1] if lines[-1].startswith(("qemu-img: ", "qcow2: ")) else lines[-1]


def make_image(d: Path, *create: str, size: int = SIZE) -> Path:
    if "base.qcow2" in create:
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(size))
        sh("qemu-io", "-c", f"write -P 0xb0 0 {size}", str(d / "base.qcow2"))
    image = d / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", *create, str(image), str(size))
    io(image, BASE_WRITES)
    return image


def io(image: Path, writes: list[str]) -> None:
    sh("qemu-io", *[a for w in writes for a in ("-c", w)], str(image))


def pair(tmp_path: Path, *create: str, size: int = SIZE) -> tuple[Path, Path]:
    """The same image twice, each in a directory of its own (backing file included)."""
    base = tmp_path / "base"
    base.mkdir()
    make_image(base, *create, size=size)
    shutil.copytree(base, tmp_path / "ref")
    shutil.copytree(base, tmp_path / "ours")
    return tmp_path / "ref" / "a.qcow2", tmp_path / "ours" / "a.qcow2"


def ours(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return sh(*QCOW2, "snapshot", *args, check=False, env=env)


def check_problems(image: Path) -> str | None:
    r = sh("qemu-img", "check", "--output=json", str(image), check=False)
    report = json.loads(r.stdout) if r.stdout.strip() else {}
    bad = {k: report.get(k) for k in ("corruptions", "leaks", "check-errors") if report.get(k)}
    return (
        None
        if r.returncode == 0 and not bad
        else f"qemu-img check: rc={r.returncode} {bad}\n{r.stdout}{r.stderr}"
    )


def both(ref: Path, mine: Path, *args: str, local: bool = False) -> None:
    """One qemu-img snapshot step on ``ref`` and the same ``qcow2 snapshot`` step on ``mine``
    (``local``: each run in its image's directory, which QEMU's data file names are relative to)."""
    if local:
        r = sh("qemu-img", "snapshot", *args, ref.name, check=False, cwd=ref.parent)
        o = sh(*QCOW2, "snapshot", *args, mine.name, check=False, cwd=mine.parent)
    else:
        r = sh("qemu-img", "snapshot", *args, str(ref), check=False)
        o = ours(*args, str(mine))
    said = [
        message(p.stderr).replace(str(i), "IMAGE").replace(f"'{i.name}'", "'IMAGE'")
        for p, i in ((o, mine), (r, ref))
    ]
    assert (o.returncode, said[0]) == (r.returncode, said[1]), (args, r.stderr, o.stderr)
    if not local and mine.suffix == ".qcow2":  # the data-file and raw images: qemu-img check refuses
        assert check_problems(mine) is None, (args, check_problems(mine))


def info(image: Path) -> dict:
    return json.loads(sh("qemu-img", "info", "-U", "--output=json", str(image)).stdout)


def snapshots(image: Path) -> list[dict]:
    """qemu-img's list, but for the dates (taken at different instants)."""
    return [
        {k: v for k, v in s.items() if k not in ("date-sec", "date-nsec")}
        for s in info(image).get("snapshots", [])
    ]


def digest(image: Path, scratch: Path, snapshot_id: str | None = None) -> str:
    """The guest bytes QEMU reads: of the active state, or of a snapshot (``convert -l``)."""
    load = ["-l", f"snapshot.id={snapshot_id}"] if snapshot_id else []
    sh("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", *load, str(image), str(scratch))
    try:
        return hashlib.sha256(scratch.read_bytes()).hexdigest()
    finally:
        scratch.unlink()


def without_dates(image: Path) -> bytes:
    """The file with every snapshot's date zeroed (read with QEMU's table layout, not ours)."""
    data = bytearray(image.read_bytes())
    count, pos = struct.unpack_from(">IQ", data, 60)
    for _ in range(count):
        pos = (pos + 7) & ~7
        id_len, name_len = struct.unpack_from(">HH", data, pos + 12)
        extra = struct.unpack_from(">I", data, pos + 36)[0]
        data[pos + 16 : pos + 24] = bytes(8)
        pos += 40 + extra + id_len + name_len
    return bytes(data)


def assert_same_state(ref: Path, mine: Path, scratch: Path) -> None:
    assert snapshots(mine) == snapshots(ref)
    assert info(mine)["virtual-size"] == info(ref)["virtual-size"]
    assert sh("qemu-img", "compare", "-U", str(ref), str(mine), check=False).returncode == 0
    for sn in snapshots(ref):
        assert digest(mine, scratch, sn["id"]) == digest(ref, scratch, sn["id"]), f"snapshot {sn}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_snapshot_steps_as_qemu_img(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    ref, mine = pair(tmp_path, *KINDS[kind])
    for step in STEPS:
        if isinstance(step, int):
            io(ref, WRITES[step])
            io(mine, WRITES[step])
        else:
            both(ref, mine, *step)
    assert [(s["id"], s["name"]) for s in snapshots(mine)] == [("3", "s1"), ("4", "s3"), ("5", "s4")]
    assert_same_state(ref, mine, tmp_path / "scratch.raw")
    assert without_dates(mine) == without_dates(ref), "not the file qemu-img leaves"
    ours_check = sh(*QCOW2, "check", str(mine), check=False)
    assert ours_check.returncode == 0 and "No errors were found" in ours_check.stdout, ours_check.stdout


@pytest.mark.parametrize("kind", ["v3", "extended-l2", "backing"])
def test_apply_restores_the_size_of_the_snapshot(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    """Snapshots taken before a growth and before a shrink: applying one restores its disk size."""
    ref, mine = pair(tmp_path, *KINDS[kind])
    both(ref, mine, "-c", "small")
    for image in (ref, mine):
        sh("qemu-img", "resize", "-q", str(image), str(3 * SIZE))
        io(image, ["write -P 0x51 80M 1M", "write -P 0x52 0 64k"])
    both(ref, mine, "-c", "big")
    for image in (ref, mine):
        sh("qemu-img", "resize", "-q", "--shrink", str(image), str(SIZE // 2))
    both(ref, mine, "-c", "half")
    scratch = tmp_path / "scratch.raw"
    for name, size in (("small", SIZE), ("big", 3 * SIZE), ("half", SIZE // 2), ("big", 3 * SIZE)):
        both(ref, mine, "-a", name)
        assert info(mine)["virtual-size"] == size
        assert_same_state(ref, mine, scratch)
        io(ref, ["write -P 0x61 1M 64k"])
        io(mine, ["write -P 0x61 1M 64k"])
    both(ref, mine, "-d", "big")
    both(ref, mine, "-d", "small")
    assert_same_state(ref, mine, scratch)


def poke_entries(image: Path, fields: list[dict]) -> None:
    """Give snapshot entries what only a VM's savevm writes: VM state size, VM clock, icount."""
    with open(image, "r+b") as f:
        head = f.read(72)
        count, pos = struct.unpack_from(">IQ", head, 60)
        for i in range(count):
            pos = (pos + 7) & ~7
            f.seek(pos)
            fixed = f.read(40)
            id_len, name_len = struct.unpack_from(">HH", fixed, 12)
            extra = struct.unpack_from(">I", fixed, 36)[0]
            assert extra >= 24
            if i < len(fields):
                state, clock, icount = fields[i]["state"], fields[i]["clock"], fields[i]["icount"]
                f.seek(pos + 24)
                f.write(struct.pack(">QI", clock, state if state <= 0xFFFFFFFF else 0))
                f.seek(pos + 40)
                f.write(struct.pack(">Q", state))
                f.seek(pos + 56)
                f.write(struct.pack(">Q", icount))
            pos += 40 + extra + id_len + name_len


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_list_is_qemu_imgs(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    """-l prints qemu-img's table byte for byte (sizes, clocks, icounts, long and non-ASCII names,
    local time), and rewriting the table keeps what a VM recorded."""
    ref, mine = pair(tmp_path, *KINDS[kind])
    env = dict(os.environ, TZ="Asia/Kathmandu")  # +05:45: local time, not UTC
    assert ours("-l", str(mine), env=env).stdout == "" == sh("qemu-img", "snapshot", "-l", str(ref)).stdout
    for name in ("plain", "x" * 300, "ünïcödé-名前", "plain", ""):
        sh("qemu-img", "snapshot", "-c", name, str(ref))
    recorded = [
        {"state": 123456789, "clock": 3723_456_789_012, "icount": (1 << 64) - 1},
        {"state": 5 << 32, "clock": 100 * 3600 * 10**9, "icount": 42},
        {"state": 999, "clock": 1, "icount": 1 << 63},
        {"state": 1000, "clock": 0, "icount": 0},
    ]
    poke_entries(ref, recorded)
    shutil.copy(ref, mine)
    listing = sh("qemu-img", "snapshot", "-l", str(ref), env=env).stdout
    assert ours("-l", str(mine), env=env).stdout == listing
    assert "118 MiB" in listing and "01:02:03.456" in listing  # the test covers what it means to
    both(ref, mine, "-c", "after")  # the table rewritten: what the VM recorded stays
    both(ref, mine, "-d", "plain")
    assert snapshots(mine) == snapshots(ref)
    assert without_dates(mine) == without_dates(ref)
    assert (
        ours("-l", str(mine), env=env).stdout.splitlines()[2:]
        == sh("qemu-img", "snapshot", "-l", str(mine), env=env).stdout.splitlines()[2:]
    )


def test_refusals_say_what_qemu_img_says(tmp_path: Path, oracle_tools: None) -> None:
    ref, mine = pair(tmp_path)
    both(ref, mine, "-c", "s1")
    for args in (("-d", "nope"), ("-a", "nope"), ("-d", "1"), ("-U", "-c", "x")):
        before = mine.read_bytes()
        both(ref, mine, *args)
        assert mine.read_bytes() == before, f"{args}: a refused image is never written"
    # Images with bitmaps cannot go back to a snapshot (QEMU's block layer refuses).
    for image in (ref, mine):
        sh("qemu-img", "bitmap", "--add", str(image), "b0")
    before = mine.read_bytes()
    both(ref, mine, "-a", "s1")
    assert mine.read_bytes() == before
    both(ref, mine, "-c", "s2")  # creating and deleting are fine
    both(ref, mine, "-d", "s1")
    assert snapshots(mine) == snapshots(ref)
    # External data files: no internal snapshots.
    for d in (ref.parent, mine.parent):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "df.qcow2", "1M", cwd=d)
    for args in (("-c", "s"), ("-a", "s"), ("-d", "s")):
        both(ref.parent / "df.qcow2", mine.parent / "df.qcow2", *args, local=True)
    # Raw images.
    for d in (ref.parent, mine.parent):
        sh("qemu-img", "create", "-q", "-f", "raw", str(d / "r.raw"), "1M")
    for args in (("-c", "s"), ("-a", "s"), ("-d", "s"), ("-l",)):
        both(ref.parent / "r.raw", mine.parent / "r.raw", *args)


def test_refcount_overflow_fails_as_qemu_img(tmp_path: Path, oracle_tools: None) -> None:
    """1-bit refcounts: no cluster can be shared; the same error and the same leak behind."""
    ref, mine = pair(tmp_path, "-o", "refcount_bits=1")
    r = sh("qemu-img", "snapshot", "-c", "s", str(ref), check=False)
    o = ours("-c", "s", str(mine))
    assert (
        (o.returncode, message(o.stderr))
        == (r.returncode, message(r.stderr))
        == (
            1,
            "Could not create snapshot 's': -22 (Invalid argument)",
        )
    )
    leaks = [
        json.loads(sh("qemu-img", "check", "--output=json", str(p), check=False).stdout) for p in (ref, mine)
    ]
    assert leaks[1].get("leaks") == leaks[0].get("leaks") and not leaks[1].get("corruptions")
    assert snapshots(mine) == [] == snapshots(ref)


def socket_of(image: Path, tag: str = "") -> Path:
    return image.parent / f"{image.stem}{tag}.sock"


def serve(argv: list[str], image: Path, tag: str = "") -> int:
    """A forking NBD server (qemu-nbd or ours) on ``image``, listening on :func:`socket_of`; its pid."""
    pidfile = image.parent / f"{image.stem}{tag}.pid"
    sh(*argv, "-k", str(socket_of(image, tag)), "--fork", "--pid-file", str(pidfile), str(image))
    return int(pidfile.read_text())


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    assert wait_pid_exit(pid, 30), f"process {pid} did not exit"


def test_images_in_use_are_refused_as_qemu_img_refuses_them(tmp_path: Path, oracle_tools: None) -> None:
    ref, mine = pair(tmp_path)
    both(ref, mine, "-c", "s1")
    pids = [serve(["qemu-nbd", "-r", "-t", "-f", "qcow2"], image) for image in (ref, mine)]
    try:  # a reader: -l shares, the others need the write lock
        before = mine.read_bytes()
        for args in (("-c", "x"), ("-d", "s1"), ("-a", "s1")):
            r = sh("qemu-img", "snapshot", *args, str(ref), check=False)
            o = ours(*args, str(mine))
            assert r.returncode == o.returncode == 1 and 'Failed to get "write" lock' in r.stderr
            assert 'Failed to get "write" lock' in o.stderr, o.stderr
        assert mine.read_bytes() == before
        listed = ours("-l", str(mine))
        assert listed.returncode == 0 and [line.split()[:2] for line in listed.stdout.splitlines()[2:]] == [
            ["1", "s1"]
        ]
    finally:
        for pid in pids:
            stop(pid)
    pids = [serve(["qemu-nbd", "-t", "-f", "qcow2"], image) for image in (ref, mine)]
    try:  # a writer: even -l needs -U
        r = sh("qemu-img", "snapshot", "-l", str(ref), check=False)
        o = ours("-l", str(mine))
        assert r.returncode == o.returncode == 1 and 'Failed to get shared "write" lock' in o.stderr, o.stderr
        shared = [line.split()[:2] for line in ours("-U", "-l", str(mine)).stdout.splitlines()[2:]]
        assert shared == [["1", "s1"]]
    finally:
        for pid in pids:
            stop(pid)


def test_writes_through_our_server_leave_every_snapshot_alone(tmp_path: Path, oracle_tools: None) -> None:
    """Copy-on-write of shared clusters and tables through the server: each snapshot reads as
    before, the active state as after the same writes done by qemu-io, and the image checks clean."""
    ref, mine = pair(tmp_path, "-o", "cluster_size=16k")
    both(ref, mine, "-c", "first")
    io(ref, WRITES[0])
    io(mine, WRITES[0])
    both(ref, mine, "-c", "second")
    scratch = tmp_path / "scratch.raw"
    before = {sn["id"]: digest(mine, scratch, sn["id"]) for sn in snapshots(mine)}
    writes = [w for group in WRITES for w in group] + ["write -P 0x77 7M 8M", "write -z 30M 2M"]
    pid = serve([sys.executable, "-m", "nbdserver", "-f", "qcow2"], mine)
    try:
        sh(
            "qemu-io",
            "-f",
            "raw",
            *[a for w in writes for a in ("-c", w)],
            f"nbd+unix:///?socket={socket_of(mine)}",
        )
    finally:
        stop(pid)
    io(ref, writes)
    assert check_problems(mine) is None, check_problems(mine)
    assert {sn["id"]: digest(mine, scratch, sn["id"]) for sn in snapshots(mine)} == before
    assert sh("qemu-img", "compare", str(ref), str(mine), check=False).returncode == 0
    for name in ("first", "second"):
        both(ref, mine, "-d", name)
    assert sh("qemu-img", "compare", str(ref), str(mine), check=False).returncode == 0


def test_new_ids_follow_strtoul(oracle_tools: None) -> None:
    """QEMU numbers a new snapshot one past the largest id read by strtoul (libc's, here)."""
    strtoul = ctypes.CDLL(None).strtoul
    strtoul.restype, strtoul.argtypes = ctypes.c_ulong, (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
    for ids in ([], [b"1"], [b"7", b"3"], [b"abc"], [b"12abc", b" 9"], [b"-1"], [b"99999999999999999999999"],
                [b"+5", b"\t4"], [b"18446744073709551614"], [b"0" * 30 + b"12"], [b"9" * 5000]):  # fmt: skip
        snaps = [Snapshot(0, 0, raw_id=i) for i in ids]
        expected = (max([strtoul(i, None, 10) for i in ids], default=0) + 1) % (1 << 64)
        assert next_snapshot_id(snaps) == str(expected).encode(), ids


@pytest.mark.parametrize("kind", ["lazy-refcounts", "v3"])
def test_a_snapshot_between_writes_of_one_open(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    """Through the driver in one read-write open: writes (refcounts held back under the dirty bit
    with lazy refcounts), a snapshot, more writes, a delete.  The snapshot holds what the first
    writes left, as qemu-img's taken between the same qemu-io writes, and the image checks clean."""
    from qcow2 import SnapshotRef, open_disk

    ref, mine = pair(tmp_path, *KINDS[kind])
    io(ref, ["write -P 0x11 0 200k", "write -z 9M 1M"])
    sh("qemu-img", "snapshot", "-c", "mid", str(ref))
    io(ref, ["write -P 0x22 100k 200k", "write -P 0x23 20M 64k"])
    sh("qemu-img", "snapshot", "-c", "end", str(ref))
    sh("qemu-img", "snapshot", "-d", "mid", str(ref))
    disk = open_disk(str(mine), read_only=False)
    try:
        disk.write(0, b"\x11" * 200 * 1024)
        disk.write_zeroes(9 * MiB, MiB)
        disk.writer.create_snapshot(b"mid", 0, 0)
        disk.write(100 * 1024, b"\x22" * 200 * 1024)
        disk.write(20 * MiB, b"\x23" * 64 * 1024)
        disk.writer.create_snapshot(b"end", 0, 0)
        disk.writer.delete_snapshot(SnapshotRef(name="mid"))
    finally:
        disk.close()
    assert check_problems(mine) is None, check_problems(mine)
    assert_same_state(ref, mine, tmp_path / "scratch.raw")


def test_qemu_reads_and_applies_our_snapshots(tmp_path: Path, oracle_tools: None) -> None:
    """Snapshots we take: qemu-img applies them and qemu-io reads the pattern back; qemu-nbd -l
    serves them as our server does."""
    _, mine = pair(tmp_path)
    io(mine, ["write -P 0x31 2M 1M"])
    assert ours("-c", "first", str(mine)).returncode == 0
    io(mine, ["write -P 0x32 2M 512k", "discard 0 1M"])
    assert ours("-c", "second", str(mine)).returncode == 0
    io(mine, ["write -P 0x33 2M 2M"])
    maps = {}
    for kind, argv in (("qemu", ["qemu-nbd", "-r", "-A", "-t"]), ("ours", [*QCOW2_NBD])):
        pid = serve([*argv, "-l", "first"], mine, kind)
        try:
            uri = f"nbd+unix:///?socket={socket_of(mine, kind)}"
            maps[kind] = [
                sh("nbdinfo", f"--map={m}", uri).stdout for m in ("base:allocation", "qemu:allocation-depth")
            ]
            sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x31 2M 1M", "-c", "read -P 1 0 1M", uri)
        finally:
            stop(pid)
    assert maps["ours"] == maps["qemu"]
    for name, reads in (("second", ["read -P 0x32 2M 512k", "read -P 0x31 2560k 512k", "read -P 0 0 1M"]),
                        ("first", ["read -P 0x31 2M 1M", "read -P 1 0 1M"])):  # fmt: skip
        sh("qemu-img", "snapshot", "-a", name, str(mine))
        read = sh("qemu-io", *[a for r in reads for a in ("-c", r)], str(mine))
        assert "Pattern verification failed" not in read.stdout, (name, read.stdout)
        assert check_problems(mine) is None, check_problems(mine)


def test_a_file_we_may_not_write_is_refused_as_qemu_img_refuses_it(
    tmp_path: Path, oracle_tools: None
) -> None:
    """Without write permission -c, -d and -a fail (Permission denied) and change nothing; -l works."""
    ref, mine = pair(tmp_path)
    both(ref, mine, "-c", "s1")
    where = Path(tempfile.mkdtemp(prefix="snapshot-ro-", dir="/tmp"))
    try:
        where.chmod(0o755)
        image = where / "a.qcow2"
        shutil.copy(mine, image)
        image.chmod(0o444)
        as_other = (
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        )
        before = image.read_bytes()
        for args in (("-c", "x"), ("-d", "s1"), ("-a", "s1")):
            r = sh(*as_other, "qemu-img", "snapshot", *args, str(image), check=False)
            o = sh(*as_other, *QCOW2, "snapshot", *args, str(image), check=False)
            assert r.returncode == o.returncode == 1, (r.stderr, o.stderr)
            assert "Permission denied" in r.stderr and "Permission denied" in o.stderr, o.stderr
        assert image.read_bytes() == before
        listed = sh(*as_other, *QCOW2, "snapshot", "-l", str(image))
        assert [line.split()[:2] for line in listed.stdout.splitlines()[2:]] == [["1", "s1"]]
    finally:
        shutil.rmtree(where)


def test_an_impossible_disk_size_is_refused_cleanly(tmp_path: Path, oracle_tools: None) -> None:
    """A snapshot entry claiming a disk of 2**62 bytes: -a and -l refuse it in one line, unchanged."""
    _, mine = pair(tmp_path)
    assert ours("-c", "s", str(mine)).returncode == 0
    with open(mine, "r+b") as f:
        f.seek(struct.unpack_from(">Q", f.read(72), 64)[0] + 48)  # the first entry's disk_size
        f.write(struct.pack(">Q", 1 << 62))
    before = mine.read_bytes()
    applied = ours("-a", "s", str(mine))
    assert (
        applied.returncode == 1
        and "Could not apply snapshot 's': Failed to load snapshot: File too large" in (applied.stderr)
    )
    served = sh(*QCOW2_NBD, "-l", "s", "-k", str(tmp_path / "x.sock"), str(mine), check=False)
    assert served.returncode == 1 and "Snapshot disk size 4611686018427387904 is too large" in served.stderr
    assert "Traceback" not in applied.stderr + served.stderr and mine.read_bytes() == before
