"""Persistent dirty bitmaps kept and recorded (issue 9 §1), against qemu-nbd on the same files.

The same writes go through qemu-nbd and through us into copies of one image;
afterwards qemu-img info lists the same bitmaps with the same flags, qemu-nbd
``-B`` (the oracle reader) maps the same dirty extents out of both files, and
qemu-img check finds nothing wrong with ours.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from nbd_wire import wait_pid_exit

WRITES = [
    "write -P 2 4M 64k",
    "write -P 3 0 512",
    "write -z 20M 1M",
    "discard 40M 128k",
    "write -P 4 63M 70k",
    "write -P 5 9000k 3k",
]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)


def start(kind: str, image: Path, *opts: str) -> tuple[str, int]:
    sock, pidfile = image.with_suffix(".sock"), image.with_suffix(".pid")
    if kind == "qemu":
        argv = ["qemu-nbd", "-t", "--discard=unmap", *opts]
    else:
        argv = [sys.executable, "-m", "nbdserver", *opts]
    started = sh(
        *argv, "-f", "qcow2", "-k", str(sock), "--fork", "--pid-file", str(pidfile), str(image), check=False
    )
    assert pidfile.exists(), started.stderr
    return f"nbd+unix:///?socket={sock}", int(pidfile.read_text())


def stop(pid: int, signal: int = 15) -> None:
    os.kill(pid, signal)
    assert wait_pid_exit(pid, 30), f"server {pid} did not stop"


def bitmaps_of(image: Path) -> list[dict]:
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", str(image)).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


def dirty_map(image: Path, name: str) -> str:
    """The bitmap's extents as qemu-nbd -B serves them (QEMU reads the file: the oracle)."""
    uri, pid = start("qemu", image, "-r", "-B", name)
    try:
        return sh("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri).stdout
    finally:
        stop(pid)


def write_through(kind: str, image: Path, writes: list[str]) -> None:
    uri, pid = start(kind, image)
    try:
        args = [a for w in writes for a in ("-c", w)]
        sh("qemu-io", "-f", "raw", *args, uri)
    finally:
        stop(pid)


def make_image(path: Path, *create_opts: str, size: str = "64M") -> None:
    sh("qemu-img", "create", "-q", "-f", "qcow2", *create_opts, str(path), size)
    sh("qemu-img", "bitmap", "--add", str(path), "b0")
    sh("qemu-img", "bitmap", "--add", "-g", "512k", str(path), "coarse")
    sh("qemu-img", "bitmap", "--add", "-g", "512", str(path), "fine")
    sh("qemu-img", "bitmap", "--add", "--disable", str(path), "off")
    # Bits already set before we serve it: a local write QEMU records itself.
    sh("qemu-io", "-c", "write -P 1 32M 100k", str(path))


KINDS = {
    "plain": (),
    "small-clusters": ("-o", "cluster_size=4096"),
    "extended-l2": ("-o", "extended_l2=on"),
    "lazy-refcounts": ("-o", "lazy_refcounts=on"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_writes_are_recorded_as_qemu_nbd_records_them(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    base = tmp_path / "base.qcow2"
    make_image(base, *KINDS[kind])
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(base, ref)
    shutil.copy(base, ours)
    write_through("qemu", ref, WRITES)
    write_through("ours", ours, WRITES)

    assert bitmaps_of(ours) == bitmaps_of(ref)
    assert [b["name"] for b in bitmaps_of(ours)] == ["b0", "coarse", "fine", "off"]
    check = sh("qemu-img", "check", str(ours), check=False)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout + check.stderr
    assert (
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(ref), str(ours), check=False).returncode
        == 0
    )
    for name in ("b0", "coarse", "fine", "off"):
        assert dirty_map(ours, name) == dirty_map(ref, name), name
    assert dirty_map(ours, "b0") != dirty_map(base, "b0")  # the writes are in it
    assert dirty_map(ours, "off") == dirty_map(base, "off")  # a disabled bitmap records nothing


def test_bitmaps_are_in_use_while_served_and_after_a_crash(tmp_path: Path, oracle_tools: None) -> None:
    """As QEMU: in use on disk from the read-write open on, so a crash leaves them inconsistent."""
    image = tmp_path / "a.qcow2"
    make_image(image)
    uri, pid = start("ours", image)
    try:
        sh("qemu-io", "-f", "raw", "-c", "write -P 7 1M 4k", uri)
        assert all("in-use" in b["flags"] for b in bitmaps_of(image))
    finally:
        stop(pid, 9)
    assert all("in-use" in b["flags"] for b in bitmaps_of(image))


def test_an_inconsistent_bitmap_is_left_as_qemu_nbd_leaves_it(tmp_path: Path, oracle_tools: None) -> None:
    base = tmp_path / "base.qcow2"
    make_image(base)
    uri, pid = start("qemu", base)  # killed while open: every bitmap stays in use
    stop(pid, 9)
    sh("qemu-img", "bitmap", "--add", str(base), "later")  # one consistent bitmap beside them
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(base, ref)
    shutil.copy(base, ours)
    write_through("qemu", ref, WRITES)
    write_through("ours", ours, WRITES)
    flags = {b["name"]: b["flags"] for b in bitmaps_of(ours)}
    assert flags == {b["name"]: b["flags"] for b in bitmaps_of(ref)}
    assert "in-use" in flags["b0"] and "in-use" not in flags["later"]
    assert dirty_map(ours, "later") == dirty_map(ref, "later")
    check = sh("qemu-img", "check", str(ours), check=False)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout


def test_a_read_only_export_leaves_the_file_alone(tmp_path: Path, oracle_tools: None) -> None:
    image = tmp_path / "a.qcow2"
    make_image(image)
    before = image.read_bytes()
    uri, pid = start("ours", image, "-r")
    try:
        sh("nbdinfo", "--map", uri)
    finally:
        stop(pid)
    assert image.read_bytes() == before


def _directory_entry_offset(image: Path) -> int:
    """Where the first bitmap directory entry lives (walking the header extensions)."""
    raw = image.read_bytes()[:65536]
    pos = struct.unpack(">I", raw[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", raw[pos : pos + 8])
        assert kind, "no bitmaps extension"
        if kind == 0x23852875:
            return struct.unpack(">Q", raw[pos + 24 : pos + 32])[0]
        pos += 8 + ((length + 7) & ~7)


@pytest.mark.parametrize(
    "field,value",
    [(20, b"\0\0\0\x08"), (16, b"\x07"), (17, b"\x08")],
    ids=["extra-data", "type", "granularity"],
)
def test_a_broken_bitmap_directory_is_refused_like_qemu(
    tmp_path: Path, oracle_tools: None, field: int, value: bytes
) -> None:
    image = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    sh("qemu-img", "bitmap", "--add", str(image), "b0")
    with open(image, "r+b") as f:
        f.seek(_directory_entry_offset(image) + field)
        f.write(value)
    before = image.read_bytes()
    refused = sh("qemu-img", "info", str(image), check=False)
    assert refused.returncode != 0
    words = refused.stderr.strip().rsplit("': ", 1)[-1]  # QEMU's reason, without its prefix
    for extra in ((), ("-r",)):
        sock = tmp_path / "s.sock"
        run = sh(
            sys.executable, "-m", "nbdserver", *extra, "-f", "qcow2", "-k", str(sock), str(image), check=False
        )
        assert run.returncode != 0
        assert words in run.stderr and "a.qcow2" in run.stderr, run.stderr
    assert image.read_bytes() == before
