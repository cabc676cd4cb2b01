"""``qcow2 check [-r leaks|all]`` against ``qemu-img check``, and the repair of dirty images.

Every case runs both tools on copies of the same image and compares the exit
code, the JSON (every key), the human summary and the stderr findings line by
line.  After a repair, ``qemu-img check`` must find our copy exactly as it
finds qemu's repaired copy, and ``qemu-img compare`` must call them equal.

Broken images are made by qemu (``abort`` in the middle of a lazy-refcounts
session, a write that trips the corruption check) or by editing single
metadata words by hand with the helpers below.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from images import BuildError

import qcow2
from qcow2.check import FIX_ERRORS, FIX_LEAKS, run_check_command
from qcow2.errors import ImageError

KiB = 1024
MiB = 1024 * KiB
MODES = (None, "leaks", "all")
FIX = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}


# -- running both tools ---------------------------------------------------------


@dataclass
class Outcome:
    rc: int
    stdout: str
    findings: list[str]  # stderr lines, minus the program-name prefix

    def json(self) -> dict | None:
        if not self.stdout.strip():
            return None
        d = json.loads(self.stdout)
        d.pop("filename")
        return d


def _findings(stderr: str) -> list[str]:
    """stderr lines, without the program-name prefix ("qemu-img: " / ours "qcow2: ")."""
    return [ln.removeprefix("qemu-img: ").removeprefix("qcow2: ") for ln in stderr.splitlines() if ln]


def run(
    *argv: str | Path, cwd: Path | None = None, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    if p.returncode not in ok:
        raise BuildError(f"{argv} failed (rc={p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    return p


def qemu_check(path: Path, mode: str | None, output: str) -> Outcome:
    argv = ["qemu-img", "check", f"--output={output}"]
    if mode:
        argv += ["-r", mode]
    p = subprocess.run([*argv, path.name], cwd=path.parent, capture_output=True, text=True, timeout=120)
    return Outcome(p.returncode, p.stdout, _findings(p.stderr))


def our_check(path: Path, mode: str | None, output: str) -> Outcome:
    out: list[str] = []
    err: list[str] = []
    rc = run_check_command(str(path), FIX[mode], output, out.append, err.append)
    text = "".join(out)
    if output == "json" and text.strip():
        assert json.loads(text)["filename"] == str(path)
    return Outcome(rc, text, _findings("\n".join(err)))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_same_check(tmp: Path, root: Path, rel: str, modes=MODES) -> dict[str | None, Outcome]:
    """Both tools on copies of ``root`` (the image is ``root/rel``); compare everything."""
    seen = {}
    for mode in modes:
        for output in ("json", "human"):
            tag = f"{mode or 'check'}-{output}"
            q_root = copy_tree(root, tmp / f"q-{tag}")
            o_root = copy_tree(root, tmp / f"o-{tag}")
            q = qemu_check(q_root / rel, mode, output)
            o = our_check(o_root / rel, mode, output)
            where = f"{rel} check -r {mode} --output={output}"
            assert o.findings == q.findings, f"{where}: stderr findings differ"
            assert o.rc == q.rc, f"{where}: exit code {o.rc}, qemu-img {q.rc}"
            if output == "json":
                assert o.json() == q.json(), f"{where}: JSON differs"
                seen[mode] = q
            else:
                assert o.stdout == q.stdout, f"{where}: human output differs"
            if mode:
                _assert_same_after_repair(q_root / rel, o_root / rel, where)
    return seen


def _assert_same_after_repair(q_img: Path, o_img: Path, where: str) -> None:
    q = qemu_check(q_img, None, "json")
    o = qemu_check(o_img, None, "json")
    assert (o.rc, o.json(), o.findings) == (q.rc, q.json(), q.findings), (
        f"{where}: qemu-img check sees our repaired image differently"
    )
    if q.rc not in (0, 3):
        # Corruptions remain, so reading the disk may fail: the files must be the same instead,
        # except that qemu clears the dirty bit when it closes the image, repaired or not; we
        # keep it while the refcounts are still wrong.
        ours, theirs = bytearray(o_img.read_bytes()), bytearray(q_img.read_bytes())
        if theirs[79] & 1 == 0 and ours[79] & 1:
            ours[79] &= ~1
        assert ours == theirs, f"{where}: the repaired files differ"
        return
    p = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(q_img), str(o_img)],
        cwd=q_img.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, f"{where}: qemu-img compare: {p.stdout} {p.stderr}"


# -- editing metadata by hand ------------------------------------------------------


@dataclass
class Hdr:
    cluster_bits: int
    l1_size: int
    l1_offset: int
    rt_offset: int
    rt_clusters: int
    refcount_order: int
    extended_l2: bool

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits


def hdr(path: Path) -> Hdr:
    raw = path.read_bytes()[:112]
    (cbits,) = struct.unpack_from(">I", raw, 20)
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", raw, 36)
    (version,) = struct.unpack_from(">I", raw, 4)
    order, incompat = 4, 0
    if version == 3:
        (incompat,) = struct.unpack_from(">Q", raw, 72)
        (order,) = struct.unpack_from(">I", raw, 96)
    return Hdr(cbits, l1_size, l1_off, rt_off, rt_clusters, order, bool(incompat & 0x10))


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def l2_entry_addr(path: Path, guest: int) -> int:
    h = hdr(path)
    esize = 16 if h.extended_l2 else 8
    per = h.cs // esize
    g = guest >> h.cluster_bits
    l2 = read_u64(path, h.l1_offset + (g // per) * 8) & 0x00FFFFFFFFFFFE00
    assert l2, f"{path}: no L2 table for guest offset {guest:#x}"
    return l2 + (g % per) * esize


def l2_entry(path: Path, guest: int) -> int:
    return read_u64(path, l2_entry_addr(path, guest))


def set_l2_entry(path: Path, guest: int, value: int, bitmap: int | None = None) -> None:
    addr = l2_entry_addr(path, guest)
    write_u64(path, addr, value)
    if bitmap is not None:
        write_u64(path, addr + 8, bitmap)


def _refcount_slot(path: Path, cluster: int) -> tuple[int, int, int]:
    h = hdr(path)
    bits = 1 << h.refcount_order
    per = h.cs * 8 // bits
    block = read_u64(path, h.rt_offset + (cluster // per) * 8) & ~0x1FF
    assert block, f"{path}: no refcount block for cluster {cluster}"
    return block, (cluster % per) * bits, bits


def get_refcount(path: Path, cluster: int) -> int:
    block, bit, bits = _refcount_slot(path, cluster)
    with open(path, "rb") as f:
        f.seek(block + bit // 8)
        raw = f.read(max(1, bits // 8))
    if bits >= 8:
        return int.from_bytes(raw, "big")
    return (raw[0] >> (bit % 8)) & ((1 << bits) - 1)


def set_refcount(path: Path, cluster: int, value: int) -> None:
    block, bit, bits = _refcount_slot(path, cluster)
    with open(path, "r+b") as f:
        f.seek(block + bit // 8)
        if bits >= 8:
            f.write(value.to_bytes(bits // 8, "big"))
            return
        byte = f.read(1)[0]
        mask = ((1 << bits) - 1) << (bit % 8)
        f.seek(block + bit // 8)
        f.write(bytes([(byte & ~mask) | (value << (bit % 8))]))


def create(path: Path, size: int | str, **opts) -> Path:
    """Run in the image's directory: qemu 7.2 resolves a relative data-file name against the cwd."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    run(*argv, path.name, size, cwd=path.parent)
    return path


def io(path: Path, *cmds: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    return run(*argv, path.name, cwd=path.parent, ok=ok)


def crash(path: Path, *cmds: str) -> None:
    """Writes, a flush, then SIGABRT: a lazy-refcounts image stays dirty (iotest 039)."""
    io(path, *cmds, "flush", "abort", ok=(-6, 134))
    assert read_u64(path, 72) & 1, f"{path}: not dirty after the crash"


# -- clean images of many shapes (shared case images; plain check only) --------------

CLEAN_CASES = [
    "fresh-v3",
    "fresh-v2",
    "types-v3",
    "types-v2",
    "mixed-v3-cs512",
    "mixed-v3-cs4096",
    "mixed-v3-cs16384",
    "mixed-v3-cs65536",
    "mixed-v3-cs2097152",
    "mixed-v2-cs512",
    "mixed-v2-cs65536",
    *(f"refcount-bits-{1 << o}" for o in range(7)),
    "reftable-growth",
    "size-unaligned-4k",
    "compress-write-zlib",
    "compress-convert-zstd-4k",
    "compress-convert-zlib-512",
    "extl2-19.5-backing",
    "extl2-cs16k-backing",
    "extl2-prealloc-metadata-nobacking",
    "chain-depth-2",
    "data-file",
    "data-file-raw",
    "prealloc-metadata",
    "prealloc-full",
    "hole-punch-plain",
    "internal-snapshots",
    "internal-snapshot-deleted",
    "bitmaps",
]


@pytest.mark.parametrize("name", CLEAN_CASES)
def test_clean_shapes(case_image, name: str) -> None:
    image = case_image(name)
    path = image.abspath
    for output in ("json", "human"):
        q = qemu_check(path, None, output)
        o = our_check(path, None, output)
        assert (o.rc, o.findings) == (q.rc, q.findings), f"{name} --output={output}"
        if output == "json":
            assert o.json() == q.json(), name
        else:
            assert o.stdout == q.stdout, name
    assert q.rc == 0, f"{name}: the shared case image is not clean: {q.findings}"


@pytest.mark.parametrize("name", ["lazy-refcounts-dirty", "corrupt-bit"])
def test_shared_broken_cases(case_image, tmp_path: Path, name: str) -> None:
    image = case_image(name)
    root = image.recipe.root
    assert_same_check(tmp_path, root, str(image.abspath.relative_to(root)))


# -- leaks, refcounts too low, refcount 0 -------------------------------------------

GEOMETRIES = [(64 * KiB, 16), (4 * KiB, 1), (512, 64), (16 * KiB, 4), (64 * KiB, 2)]


def _written(tmp: Path, cs: int, bits: int, **opts) -> Path:
    img = create(tmp / "src" / "x.qcow2", 16 * cs, cluster_size=cs, refcount_bits=bits, **opts)
    io(img, f"write -P 0x5a 0 {4 * cs}", f"write -P 0x6b {6 * cs} {cs}", f"write -c -P 0x7c {8 * cs} {cs}")
    return img


@pytest.fixture
def src(tmp_path: Path, oracle_tools: None) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


@pytest.mark.parametrize("cs,bits", GEOMETRIES)
def test_leak(tmp_path: Path, src: Path, cs: int, bits: int) -> None:
    img = _written(tmp_path, cs, bits)
    set_l2_entry(img, cs, 0)  # guest cluster 1 loses its data cluster
    set_l2_entry(img, 3 * cs, 0)
    seen = assert_same_check(tmp_path, src, "x.qcow2")
    assert seen[None].rc == 3 and seen[None].json()["leaks"] == 2
    assert seen["leaks"].rc == 0


def test_refcount_too_low(tmp_path: Path, src: Path) -> None:
    img = create(src / "x.qcow2", "1M")
    io(img, "write -P 1 0 192k")
    run("qemu-img", "snapshot", "-c", "s1", img)
    io(img, "write -P 2 64k 4k")  # COW: cluster 1 now has its own copy, the others stay shared
    data = l2_entry(img, 0) & 0x00FFFFFFFFFFFE00
    assert get_refcount(img, data >> 16) == 2
    set_refcount(img, data >> 16, 1)
    seen = assert_same_check(tmp_path, src, "x.qcow2")
    assert seen[None].rc == 2 and seen["all"].rc == 0
    assert seen["leaks"].rc == 2


@pytest.mark.parametrize("cs,bits", [(64 * KiB, 16), (4 * KiB, 1), (512, 64)])
def test_refcount_zero_needs_rebuild(tmp_path: Path, src: Path, cs: int, bits: int) -> None:
    img = _written(tmp_path, cs, bits)
    data = l2_entry(img, 2 * cs) & 0x00FFFFFFFFFFFE00
    set_refcount(img, data // cs, 0)
    seen = assert_same_check(tmp_path, src, "x.qcow2")
    assert seen["leaks"].rc == 1 and seen["leaks"].json() is None
    assert seen["all"].rc == 0


def test_refcount_too_high_on_metadata(tmp_path: Path, src: Path) -> None:
    """Leaked references on the L1 table and a refcount block (refblock refcount != 1 → rebuild)."""
    img = _written(tmp_path, 64 * KiB, 16)
    h = hdr(img)
    set_refcount(img, h.l1_offset >> h.cluster_bits, 3)
    block = read_u64(img, h.rt_offset) >> h.cluster_bits
    set_refcount(img, block, 2)
    assert_same_check(tmp_path, src, "x.qcow2")


# -- dirty images (lazy refcounts, crash) -----------------------------------------

DIRTY = [
    ("64k-16", 64 * KiB, 16, ["write -P 0x5a 0 128k", "write -z 256k 64k", "write -P 0x5b 300000 1000"]),
    ("4k-1", 4 * KiB, 1, ["write -P 1 0 40k", "write -P 2 100k 4k", "write -z -u 0 4k"]),
    # 64 refcounts per block: the rebuild needs ~90 refcount blocks and a two-cluster table
    ("512-64", 512, 64, ["write -P 1 0 40k", "write -P 2 40k 2600k"]),
    ("extl2", 64 * KiB, 16, ["write -P 3 8k 4k", "write -P 4 200k 100k", "write -z 320k 64k"]),
]


def _dirty(src: Path, cs: int, bits: int, cmds: list[str], extl2: bool = False) -> Path:
    opts = {"cluster_size": cs, "refcount_bits": bits, "lazy_refcounts": "on"}
    if extl2:
        opts["extended_l2"] = "on"
    img = create(src / "x.qcow2", "4M", **opts)
    io(img, "write -P 9 1M 64k")  # some clean, refcounted data first
    crash(img, *cmds)
    return img


@pytest.mark.parametrize("name,cs,bits,cmds", DIRTY, ids=[d[0] for d in DIRTY])
def test_dirty(tmp_path: Path, src: Path, name: str, cs: int, bits: int, cmds: list[str]) -> None:
    _dirty(src, cs, bits, cmds, extl2=name == "extl2")
    seen = assert_same_check(tmp_path, src, "x.qcow2")
    assert seen[None].rc == 2
    assert seen["all"].rc == 0


def test_dirty_with_snapshot(tmp_path: Path, src: Path) -> None:
    img = create(src / "x.qcow2", "1M", lazy_refcounts="on")
    io(img, "write -P 1 0 256k")
    run("qemu-img", "snapshot", "-c", "s1", img)
    crash(img, "write -P 2 64k 4k", "write -P 3 512k 64k")
    assert_same_check(tmp_path, src, "x.qcow2")


# -- corrupt bit -----------------------------------------------------------------


def test_corrupt_alias_of_l1(tmp_path: Path, src: Path) -> None:
    """§19.8: an L2 entry pointing at the L1 table; qemu marks the image corrupt on write."""
    img = create(src / "x.qcow2", "1M")
    io(img, "write -P 1 0 64k", "write -P 3 128k 64k")
    h = hdr(img)
    set_l2_entry(img, 0, (1 << 63) | h.l1_offset)
    p = io(img, "write -P 2 0 4k", ok=(0, 1))
    assert "Input/output error" in p.stdout + p.stderr
    assert read_u64(img, 72) & 2, "qemu did not mark the image corrupt"
    seen = assert_same_check(tmp_path, src, "x.qcow2")
    assert seen["all"].rc == 0


# -- damaged single words -------------------------------------------------------


def _std(tmp_path: Path) -> Path:
    return _written(tmp_path, 64 * KiB, 16)


def _reserved_l2_bits(img: Path) -> None:
    set_l2_entry(img, 0, l2_entry(img, 0) | 0x2)


def _reserved_l1_bits(img: Path) -> None:
    h = hdr(img)
    write_u64(img, h.l1_offset, read_u64(img, h.l1_offset) | 0x0100000000000000)


def _compressed_copied(img: Path) -> None:
    set_l2_entry(img, 8 * 64 * KiB, l2_entry(img, 8 * 64 * KiB) | (1 << 63))


def _unaligned_data(img: Path) -> None:
    set_l2_entry(img, 64 * KiB, l2_entry(img, 64 * KiB) + 0x200)


def _unaligned_prealloc_zero(img: Path) -> None:
    set_l2_entry(img, 64 * KiB, l2_entry(img, 64 * KiB) + 0x201)


def _past_eof(img: Path) -> None:
    set_l2_entry(img, 2 * 64 * KiB, (1 << 63) | (256 * MiB))


def _copied_missing(img: Path) -> None:
    set_l2_entry(img, 0, l2_entry(img, 0) & ~(1 << 63))
    h = hdr(img)
    write_u64(img, h.l1_offset, read_u64(img, h.l1_offset) & ~(1 << 63))


def _refblock_outside(img: Path) -> None:
    h = hdr(img)
    write_u64(img, h.rt_offset + 8, 64 * MiB)


def _refblock_unaligned(img: Path) -> None:
    h = hdr(img)
    write_u64(img, h.rt_offset, read_u64(img, h.rt_offset) + 0x200)


def _reftable_reserved(img: Path) -> None:
    h = hdr(img)
    write_u64(img, h.rt_offset, read_u64(img, h.rt_offset) | 0x1)


def _truncated(img: Path) -> None:
    with open(img, "r+b") as f:
        f.truncate(f.seek(0, 2) - 3 * 64 * KiB)


EDITS = {
    "l2-reserved-bits": _reserved_l2_bits,
    "l1-reserved-bits": _reserved_l1_bits,
    "compressed-with-copied": _compressed_copied,
    "unaligned-data-cluster": _unaligned_data,
    "unaligned-prealloc-zero": _unaligned_prealloc_zero,
    "reference-past-eof": _past_eof,
    "copied-missing": _copied_missing,
    "refblock-outside-image": _refblock_outside,
    "refblock-unaligned": _refblock_unaligned,
    "reftable-reserved-bits": _reftable_reserved,
    "file-truncated": _truncated,
}


@pytest.mark.parametrize("name", list(EDITS))
def test_damaged_word(tmp_path: Path, src: Path, name: str) -> None:
    img = _std(tmp_path)
    EDITS[name](img)
    assert_same_check(tmp_path, src, "x.qcow2")


def test_extl2_bad_bitmaps(tmp_path: Path, src: Path) -> None:
    img = create(src / "x.qcow2", "1M", extended_l2="on")
    io(img, "write -P 1 0 64k", "write -P 2 64k 8k", "write -z 192k 64k")
    set_l2_entry(img, 0, l2_entry(img, 0), bitmap=0x00000001_00000003)  # alloc and zero overlap
    set_l2_entry(img, 192 * KiB, 0, bitmap=0xFFFF0000_00000001)  # unallocated with an alloc bit
    assert_same_check(tmp_path, src, "x.qcow2")


# -- dirty images opened read-write ---------------------------------------------------


def test_open_dirty_read_write(tmp_path: Path, src: Path) -> None:
    img = _dirty(src, 64 * KiB, 16, DIRTY[0][3])
    expected = tmp_path / "expected.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, expected)  # read-only: no repair
    assert read_u64(img, 72) & 1
    disk = qcow2.open_disk(str(img), read_only=False)
    try:
        assert read_u64(img, 72) & 1 == 0, "the dirty bit survived the open"
        buf = bytearray(disk.size)
        disk.readinto(0, memoryview(buf))
        assert bytes(buf) == expected.read_bytes()
        disk.write(8 * KiB, b"\xee" * 4096)
    finally:
        disk.close()
    q = qemu_check(img, None, "json")
    assert q.rc == 0 and q.findings == [], q.findings
    io(img, "read -P 0xee 8k 4k", "read -P 0x5a 0 8k", "read -P 0x5a 12k 116k", "read -P 9 1M 64k")


def test_open_dirty_read_write_512_64(tmp_path: Path, src: Path) -> None:
    img = _dirty(src, 512, 64, DIRTY[2][3])
    qemu_copy = copy_tree(src, tmp_path / "q") / "x.qcow2"
    io(qemu_copy, "read 0 512")  # qemu's own automatic repair on a read-write open
    disk = qcow2.open_disk(str(img), read_only=False)
    disk.close()
    q = qemu_check(img, None, "json")
    assert q.rc == 0 and q.findings == [], q.findings
    assert q.json() == qemu_check(qemu_copy, None, "json").json()
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", img, qemu_copy)


def test_open_dirty_unrepairable(tmp_path: Path, src: Path) -> None:
    """Repair leaves internal errors (a refcount block qemu cannot read): the open fails."""
    img = _dirty(src, 64 * KiB, 16, DIRTY[0][3])
    _refblock_unaligned(img)
    qemu_copy = copy_tree(src, tmp_path / "q") / "x.qcow2"
    p = subprocess.run(
        ["qemu-io", "-c", "read 0 512", str(qemu_copy)], capture_output=True, text=True, timeout=60
    )
    assert "Could not repair dirty image" in p.stderr
    with pytest.raises(ImageError, match="Could not repair dirty image"):
        qcow2.open_disk(str(img), read_only=False)


# -- the command line -------------------------------------------------------------


def test_cli(tmp_path: Path, src: Path) -> None:
    img = _std(tmp_path)
    set_l2_entry(img, 64 * KiB, 0)
    cli = [sys.executable, "-m", "qcow2", "check"]
    p = subprocess.run(
        [*cli, "--output=json", "x.qcow2"], cwd=src, capture_output=True, text=True, timeout=60
    )
    q = run("qemu-img", "check", "--output=json", "x.qcow2", cwd=src, ok=(3,))
    assert p.returncode == 3
    assert json.loads(p.stdout) == json.loads(q.stdout)
    assert p.stderr == q.stderr
    p = subprocess.run([*cli, "-r", "leaks", "x.qcow2"], cwd=src, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Double checking the fixed image now..." in p.stdout
    raw = src / "r.raw"
    raw.write_bytes(bytes(4096))
    p = subprocess.run([*cli, str(raw)], capture_output=True, text=True, timeout=60)
    q = run("qemu-img", "check", raw, ok=(63,))
    assert p.returncode == q.returncode == 63


# -- more shapes of damage ----------------------------------------------------------


def test_refcount_overflow(tmp_path: Path, src: Path) -> None:
    """1-bit refcounts: a second reference to a cluster overflows the in-memory count."""
    img = create(src / "x.qcow2", "1M", refcount_bits=1)
    io(img, "write -P 1 0 128k")
    set_l2_entry(img, 64 * KiB, l2_entry(img, 0))
    assert_same_check(tmp_path, src, "x.qcow2")


def test_compressed_entry_in_data_file_image(tmp_path: Path, src: Path) -> None:
    img = create(src / "d.qcow2", "1M", data_file="d.raw")
    io(img, "write -P 1 0 192k")
    set_l2_entry(img, 64 * KiB, 0x4000000000050000)
    assert_same_check(tmp_path, src, "d.qcow2")


def test_dirty_compressed_and_zero(tmp_path: Path, src: Path) -> None:
    img = create(src / "x.qcow2", "2M", lazy_refcounts="on", cluster_size=4096)
    io(img, "write -c -P 1 0 4k", "write -c -P 2 4k 4k", "write -P 3 64k 64k")
    crash(img, "write -c -P 4 8k 4k", "write -z 64k 8k", "write -z -u 72k 8k", "write -P 5 1M 12k")
    assert_same_check(tmp_path, src, "x.qcow2")


LUKS = ("--object", "secret,id=sec0,data=abc")


def test_luks(tmp_path: Path, src: Path) -> None:
    """The LUKS header area is refcounted; our check needs no key (metadata is not encrypted).

    qemu-img's PBKDF calibration divides by the thread's CPU time, which this
    kernel samples by tick and can read as 0 ms ("Unable to get accurate CPU
    usage"): that one failure is retried.
    """
    img = src / "enc.qcow2"
    for attempt in range(5):
        try:
            run(
                "qemu-img", "create", "-q", *LUKS, "-f", "qcow2", "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", img, "1M",
            )  # fmt: skip
            break
        except BuildError as e:  # qemu's PBKDF calibration reads 0 ms of tick-sampled CPU time
            if "Unable to get accurate CPU usage" not in str(e) or attempt == 4:
                raise
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"
    run("qemu-io", *LUKS, "--image-opts", "-c", "write -P 1 0 192k", opts)
    set_l2_entry(img, 64 * KiB, 0)
    for mode in MODES:
        q_img = copy_tree(src, tmp_path / f"q-{mode}") / "enc.qcow2"
        o_img = copy_tree(src, tmp_path / f"o-{mode}") / "enc.qcow2"
        argv = ["qemu-img", "check", *LUKS, "--image-opts", "--output=json"] + (["-r", mode] if mode else [])
        p = subprocess.run(
            [*argv, f"driver=qcow2,file.filename={q_img},encrypt.key-secret=sec0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        q = Outcome(p.returncode, p.stdout, _findings(p.stderr))
        o = our_check(o_img, mode, "json")
        assert (o.rc, o.json(), o.findings) == (q.rc, q.json(), q.findings), mode
