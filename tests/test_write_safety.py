"""Writes that cannot succeed: a full disk, and a write that would land on metadata.

Both must fail the request with the right NBD error, keep the connection
usable, and leave an image that `qemu-img check` finds without corruption.
"""

from __future__ import annotations

import contextlib
import errno
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from images import Image, Recipe
from servers import our_nbd, qemu_nbd

MiB = 1 << 20


def qemu(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def image_at(recipe: Recipe, path: Path) -> Image:
    return Image(path.name, path.parent, "qcow2", recipe)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size``: the test runs as root, like CI."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_disk_full_reports_enospc_and_keeps_the_image_consistent(tmp_path: Path, recipe: Recipe) -> None:
    with small_filesystem(tmp_path / "fs", "3m") as fs:
        img = fs / "full.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
        with our_nbd(image_at(recipe, img), tmp_path / "srv", writable=True) as srv:
            h = connect(srv.uri)
            written = 0
            with pytest.raises(nbd.Error) as failure:
                for written in range(0, 64 * MiB, MiB):
                    h.pwrite(bytes([1 + written // MiB]) * MiB, written)
            assert failure.value.errno == errno.errorcode[errno.ENOSPC], failure.value
            assert written >= MiB, "nothing could be written at all: the test proves nothing"
            h.flush()
            for offset in range(0, written, MiB):  # what was acknowledged reads back
                assert h.pread(MiB, offset) == bytes([1 + offset // MiB]) * MiB, offset
            h.shutdown()
        assert srv.exit_problem is None, srv.stderr()
        result = qemu("qemu-img", "check", "--output=json", str(img), check=False)
        report = json.loads(result.stdout)
        assert result.returncode == 0, (result.returncode, report, result.stderr)
        info = json.loads(qemu("qemu-img", "info", "--output=json", str(img)).stdout)
        assert info["dirty-flag"] is False


def test_write_onto_metadata_marks_the_image_corrupt(tmp_path: Path, recipe: Recipe) -> None:
    img = tmp_path / "cr.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    qemu("qemu-io", "-c", "write -P 1 0 64k", str(img))
    # Point guest cluster 0 at the active L1 table's cluster (QEMU's own example, §19.8).
    with open(img, "r+b") as f:
        header = f.read(104)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | l1_offset))
    with our_nbd(image_at(recipe, img), tmp_path / "srv", writable=True) as srv:
        h = connect(srv.uri)
        with pytest.raises(nbd.Error) as failure:
            h.pwrite(b"\x02" * 4096, 0)
        assert failure.value.errno == errno.errorcode[errno.EIO], failure.value
        assert h.pread(512, 512 * 1024) == bytes(512), "the connection goes on"
        h.shutdown()
    failed = [line for line in srv.stderr().splitlines() if "WRITE at offset 0" in line]
    assert failed and all("client 1" in line and "export ''" in line for line in failed), srv.stderr()
    info = json.loads(qemu("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
    with open(img, "rb") as f:
        f.seek(l1_offset)
        assert struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00 == l2_offset, "L1 table untouched"
    # A corrupt image is never opened for writing again; reading still works.
    refused = subprocess.run(
        [sys.executable, "-m", "nbdserver", "-k", str(tmp_path / "again.sock"), str(img)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and "corrupt" in refused.stderr, refused.stderr
    repaired = qemu("qemu-img", "check", "-r", "all", str(img), check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr


def _fields(img: Path, *names: str) -> list[int]:
    """Header fields (offsets of the qcow2 header table) of ``img``."""
    at = {"l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q")}
    with open(img, "rb") as f:
        header = f.read(104)
    return [struct.unpack_from(at[n][1], header, at[n][0])[0] for n in names]


def _poke(img: Path, offset: int, fmt: str, value: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _l1_zero(img: Path) -> None:
    _poke(img, 40, ">Q", 0)  # the L1 table "at" the header


def _header_only(img: Path) -> None:
    img.write_bytes(img.read_bytes()[:65536])  # tables, refcounts: all beyond EOF


def _reftable_entry_at_header(img: Path) -> None:
    (table,) = _fields(img, "refcount_table_offset")
    _poke(img, table, ">Q", 0)


def _reftable_past_eof(img: Path) -> None:
    _poke(img, 48, ">Q", 1 << 30)


def _compressed_at_header(img: Path) -> None:
    qemu("qemu-io", "-c", "write -c -P 1 2M 64k", str(img))
    (l1,) = _fields(img, "l1_table_offset")
    with open(img, "rb") as f:
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 32 * 8)
        entry = struct.unpack(">Q", f.read(8))[0]
    offset_bits = 62 - (16 - 8)  # 64 KiB clusters: host offset in bits 0..53
    _poke(img, l2 + 32 * 8, ">Q", entry & ~((1 << offset_bits) - 1))  # same size, offset 0


# The five images of issue 8 §1 and the qemu-io command each was destroyed by.
METADATA_TRAPS = {
    "l1-at-header": (_l1_zero, "write -P 0xab 0 64k"),
    "truncated-to-header": (_header_only, "write -P 0xab 1088k 4k"),
    "refcount-entry-at-header": (_reftable_entry_at_header, "write -P 0xab 1088k 4k"),
    "refcount-table-past-eof": (_reftable_past_eof, "write -P 0xab 1088k 4k"),
    "compressed-at-header": (_compressed_at_header, "write -z 2M 64k"),
}


@pytest.mark.parametrize("case", sorted(METADATA_TRAPS))
def test_no_write_lands_on_the_header_whatever_the_image_says(
    tmp_path: Path, recipe: Recipe, case: str
) -> None:
    """Both servers get the same corrupt image and the same writes through qemu-io.

    Ours must fail them with EIO wherever qemu-nbd does, and never touch the
    header beyond the corrupt bit: the file stays a qcow2 image QEMU can
    inspect and repair.  Reads keep working.
    """
    corrupt, command = METADATA_TRAPS[case]
    outcomes = {}
    for name, serve in (("qemu-nbd", qemu_nbd), ("ours", our_nbd)):
        img = tmp_path / f"{name}.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
        corrupt(img)
        before = img.read_bytes()[:65536]
        with serve(image_at(recipe, img), tmp_path / f"srv-{name}", writable=True) as srv:
            wrote = qemu("qemu-io", "-f", "raw", "-c", command, "-c", "flush", srv.uri, check=False)
            read = qemu("qemu-io", "-f", "raw", "-c", "read 0 4k", srv.uri, check=False)
        failed = "Input/output error" in wrote.stdout + wrote.stderr
        outcomes[name] = failed
        after = img.read_bytes()[:65536]
        changed = [i for i in range(65536) if before[i] != after[i]]
        assert all(72 <= i < 80 for i in changed), f"{name}: header bytes {changed[:8]} changed"
        info = json.loads(qemu("qemu-img", "info", "--output=json", str(img)).stdout)
        assert info["format"] == "qcow2", info
        if name == "ours":
            assert "read 4096/4096 bytes" in read.stdout, read.stdout + read.stderr
            assert failed, wrote.stdout + wrote.stderr
            assert info["format-specific"]["data"]["corrupt"] is True, info
            assert srv.exit_problem is None, srv.stderr()
    assert outcomes["ours"] >= outcomes["qemu-nbd"], outcomes


def test_probed_raw_image_keeps_its_first_sector_raw(tmp_path: Path) -> None:
    """Issue 8 §4: a guest must not turn a probed raw image into a qcow2 pointing at host files.

    The same writes through qemu-nbd and through us, both probing the format:
    the header write is refused with EPERM by both, ordinary writes to sector
    0 (partial ones too) go through, and a write that would complete a magic
    byte by byte is refused.  Afterwards the image still probes as raw.
    """
    header = tmp_path / "evil.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", str(header), "1M")
    evil = header.read_bytes()[:512]
    (tmp_path / "evil.bin").write_bytes(evil)
    (tmp_path / "qfi.bin").write_bytes(b"QFI")
    (tmp_path / "fb.bin").write_bytes(b"\xfb")
    writes = [
        ("evil", f"write -s {tmp_path / 'evil.bin'} 0 512", False),
        ("plain", "write -P 0x33 0 4k", True),
        ("partial", "write -P 0x44 100 10", True),
        ("prefix", f"write -s {tmp_path / 'qfi.bin'} 0 3", True),
        ("last byte", f"write -s {tmp_path / 'fb.bin'} 3 1", False),
    ]
    results = {}
    for name, serve in (("qemu-nbd", "qemu"), ("ours", "ours")):
        raw = tmp_path / f"{name}.img"
        qemu("qemu-img", "create", "-q", "-f", "raw", str(raw), "1M")
        sock = tmp_path / f"{name}.sock"
        pidfile = tmp_path / f"{name}.pid"
        if serve == "qemu":
            argv = ["qemu-nbd", "-t", "-k", str(sock)]
        else:
            argv = [sys.executable, "-m", "nbdserver", "-k", str(sock)]
        # qemu-nbd --fork exits 1 after its warning about probing; the pid file says it serves.
        started = qemu(*argv, "--fork", "--pid-file", str(pidfile), str(raw), check=False)
        assert pidfile.exists(), started.stderr
        try:
            uri = f"nbd+unix:///?socket={sock}"
            for label, command, allowed in writes:
                out = qemu("qemu-io", "-f", "raw", "-c", command, uri, check=False)
                text = out.stdout + out.stderr
                results[(name, label)] = "Operation not permitted" not in text
                assert results[(name, label)] == allowed, (name, label, text)
        finally:
            pid = int(pidfile.read_text())
            subprocess.run(["kill", str(pid)], check=True)
            qemu("sh", "-c", f"while kill -0 {pid} 2>/dev/null; do sleep 0.05; done")
        info = json.loads(qemu("qemu-img", "info", "--output=json", str(raw)).stdout)
        assert info["format"] == "raw", info
    assert {k[1]: v for k, v in results.items() if k[0] == "ours"} == {
        k[1]: v for k, v in results.items() if k[0] == "qemu-nbd"
    }


def test_writes_reach_the_file_when_the_client_leaves_without_flush(tmp_path: Path, recipe: Recipe) -> None:
    img = tmp_path / "left.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
    with our_nbd(image_at(recipe, img), tmp_path / "srv", writable=True) as srv:
        h = connect(srv.uri)
        h.pwrite(b"\x5a" * 65536, 1 * MiB)
        h.zero(65536, 0)
        h.shutdown()  # NBD_CMD_DISC without FLUSH; returns once the server closed the connection
        # The server still runs; another reader of the file must see the writes.
        seen = qemu("qemu-io", "-r", "-U", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 64k", str(img))
        assert "Pattern verification failed" not in seen.stdout + seen.stderr, seen.stdout
