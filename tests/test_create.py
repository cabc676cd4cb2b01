"""``qcow2 create`` against ``qemu-img create``: same command line, same image.

Each case runs the same argv through qemu-img (in one directory) and through
our CLI (in a twin directory, so relative data-file and backing names are
equal), then checks what the qemu tools say about ours: byte-identical file
(we replay qemu's allocator, so even the refcount-table moves match), clean
``qemu-img check``, equal ``info``/``map`` JSON, ``qemu-img compare`` equal,
and still clean after qemu-io writes into it.  Error cases must fail the same
way with the same message.  A missing qemu tool fails the suite.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from qcow2 import cli
from qcow2.create import CreateError, create_image, parse_size
from qcow2.format.refblock import encode_refcounts

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SEEDS = int(os.environ.get("QCOW2_CREATE_SEEDS", "12"))


def qemu(cwd: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(argv)} (in {cwd}) failed:\n{p.stdout}{p.stderr}", pytrace=False)
    return p


def ours(cwd: Path, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Our CLI in-process (no interpreter start-up per case), run from ``cwd``."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = cli.main(["create", *argv])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Extents that are not holes (SEEK_DATA/SEEK_HOLE), so sparse files compare fast."""
    out = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, stop))
            pos = stop
    return out


def assert_same_bytes(a: Path, b: Path) -> None:
    """Same length, same bytes, and the same blocks allocated (``qemu-img map`` sees those)."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    assert size_a == size_b, f"{a.name}: qemu's file is {size_a} bytes, ours {size_b}"
    assert data_ranges(a) == data_ranges(b), f"{a.name}: allocated extents differ"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, stop in sorted(set(data_ranges(a)) | set(data_ranges(b))):
            pos = start
            while pos < stop:
                n = min(stop - pos, 8 * MiB)
                ba, bb = os.pread(fa.fileno(), n, pos), os.pread(fb.fileno(), n, pos)
                if ba != bb:
                    i = next(i for i in range(n) if ba[i] != bb[i])
                    pytest.fail(f"{a.name}: first difference at byte {pos + i:#x}", pytrace=False)
                pos += n


def info(cwd: Path, name: str) -> dict:
    doc = json.loads(qemu(cwd, "qemu-img", "info", "--output=json", name).stdout)
    for key in ("filename", "actual-size", "children", "full-backing-filename"):
        doc.pop(key, None)
    return doc


def qmap(cwd: Path, name: str) -> list:
    return json.loads(qemu(cwd, "qemu-img", "map", "--output=json", name).stdout)


def check_clean(cwd: Path, name: str) -> None:
    p = qemu(cwd, "qemu-img", "check", "--output=json", name, check=False)
    assert p.returncode == 0, f"qemu-img check {name}: rc {p.returncode}\n{p.stdout}{p.stderr}"
    doc = json.loads(p.stdout)
    for key in ("leaks", "corruptions", "check-errors", "leaks-fixed", "corruptions-fixed"):
        assert doc.get(key, 0) == 0, f"qemu-img check {name}: {key}={doc[key]}"


@pytest.fixture
def twins(tmp_path: Path, oracle_tools: None) -> tuple[Path, Path]:
    """Two directories with the same backing files: qemu's and ours."""
    q, o = tmp_path / "qemu", tmp_path / "ours"
    for d in (q, o):
        d.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "3M"], cwd=d, check=True)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 3M", "base.qcow2"],
            cwd=d,
            check=True,
            capture_output=True,
        )
        subprocess.run(["truncate", "-s", "1000000", "base.raw"], cwd=d, check=True)
    return q, o


def differential(argv: list[str], twins: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    q, o = twins
    qp = qemu(q, "qemu-img", "create", "-f", "qcow2", *argv)
    rc, out, err = ours(o, argv, capsys)
    assert rc == 0, err
    assert out == qp.stdout, "the Formatting line differs"
    img = argv[-2] if argv[-1][0].isdigit() else argv[-1]
    assert_same_bytes(q / img, o / img)
    check_clean(o, img)
    assert info(o, img) == info(q, img)
    assert qmap(o, img) == qmap(q, img)
    for name in {"d.raw", "sub/d.raw"} & {p.relative_to(q).as_posix() for p in q.rglob("*.raw")}:
        assert_same_bytes(q / name, o / name)
    qemu(q, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(q / img), str(o / img))
    size = info(o, img)["virtual-size"]
    if size:
        writes = ["-c", f"write -P 0x5a 0 {min(size, 70 * KiB)}"]
        if size > 200 * KiB:
            writes += ["-c", f"write -z {100 * KiB} 50k", "-c", f"write -P 0xa5 {size - 65 * KiB} 65k"]
        qemu(o, "qemu-io", "-f", "qcow2", *writes, img)
        check_clean(o, img)
        qemu(o, "qemu-io", "-f", "qcow2", "-c", f"read -P 0x5a 0 {min(size, 70 * KiB)}", img)


CASES = {
    "default-1M": ["x.qcow2", "1M"],
    "empty": ["x.qcow2", "0"],
    "one-sector": ["x.qcow2", "512"],
    "unaligned-rounds-to-512": ["x.qcow2", "100"],
    "fraction-suffix": ["x.qcow2", "1.5M"],
    "v2": ["-o", "compat=0.10", "x.qcow2", "1M"],
    "v2-name": ["-o", "compat=v2", "x.qcow2", "5G"],
    "v3-explicit": ["-o", "compat=1.1", "x.qcow2", "1M"],
    "cluster-512": ["-o", "cluster_size=512", "x.qcow2", "1M"],
    "cluster-4k": ["-o", "cluster_size=4k", "x.qcow2", "1M"],
    "cluster-2M": ["-o", "cluster_size=2M", "x.qcow2", "1M"],
    "4TiB-sparse": ["x.qcow2", "4T"],
    "64TiB-refcount64": ["-o", "refcount_bits=64", "x.qcow2", "64T"],
    "512-clusters-L1-crosses-refblocks": ["-o", "cluster_size=512,refcount_bits=64", "x.qcow2", "20G"],
    "512-clusters-1bit": ["-o", "cluster_size=512,refcount_bits=1", "x.qcow2", "127G"],
    "refcount-1": ["-o", "refcount_bits=1", "x.qcow2", "3M"],
    "refcount-2": ["-o", "refcount_bits=2", "x.qcow2", "3M"],
    "refcount-4": ["-o", "refcount_bits=4", "x.qcow2", "3M"],
    "refcount-8": ["-o", "refcount_bits=8", "x.qcow2", "3M"],
    "refcount-32": ["-o", "refcount_bits=32", "x.qcow2", "3M"],
    "lazy-zstd": ["-o", "lazy_refcounts=on,compression_type=zstd", "x.qcow2", "1M"],
    "extended-l2": ["-o", "extended_l2=on", "x.qcow2", "10M"],
    "extended-l2-16k": ["-o", "extended_l2=on,cluster_size=16k", "x.qcow2", "10M"],
    "prealloc-metadata": ["-o", "preallocation=metadata", "x.qcow2", "1M"],
    "prealloc-falloc": ["-o", "preallocation=falloc", "x.qcow2", "1M"],
    "prealloc-full": ["-o", "preallocation=full", "x.qcow2", "1M"],
    "prealloc-metadata-unaligned": ["-o", "preallocation=metadata", "x.qcow2", "1049088"],
    "prealloc-metadata-3G": ["-o", "preallocation=metadata", "x.qcow2", "3G"],
    "prealloc-metadata-several-refblocks": ["-o", "preallocation=metadata,refcount_bits=64", "x.qcow2", "1G"],
    "prealloc-metadata-reftable-grows": [
        "-o",
        "preallocation=metadata,cluster_size=512,refcount_bits=64",
        "x.qcow2",
        "6M",
    ],
    "prealloc-falloc-reftable-grows": [
        "-o",
        "preallocation=falloc,cluster_size=512,refcount_bits=64",
        "x.qcow2",
        "6M",
    ],
    "prealloc-full-2M-unaligned": ["-o", "preallocation=full,cluster_size=2M", "x.qcow2", "5000000"],
    "prealloc-falloc-empty": ["-o", "preallocation=falloc", "x.qcow2", "0"],
    "prealloc-metadata-extl2": ["-o", "preallocation=metadata,extended_l2=on", "x.qcow2", "5000000"],
    "prealloc-metadata-v2": ["-o", "preallocation=metadata,compat=0.10", "x.qcow2", "2M"],
    "data-file": ["-o", "data_file=d.raw", "x.qcow2", "1M"],
    "data-file-raw": ["-o", "data_file=d.raw,data_file_raw=on", "x.qcow2", "1M"],
    "data-file-raw-unaligned": ["-o", "data_file=d.raw,data_file_raw=on", "x.qcow2", "1049088"],
    "data-file-falloc": ["-o", "data_file=d.raw,preallocation=falloc", "x.qcow2", "3M"],
    "data-file-full-extl2": ["-o", "data_file=d.raw,preallocation=full,extended_l2=on", "x.qcow2", "3000000"],
    "data-file-subdir": ["-o", "data_file=d.raw", "sub/x.qcow2", "1M"],
    "backing-qcow2": ["-b", "base.qcow2", "-F", "qcow2", "x.qcow2", "8M"],
    "backing-qcow2-size-from-backing": ["-b", "base.qcow2", "-F", "qcow2", "x.qcow2"],
    "backing-raw-size-rounded": ["-b", "base.raw", "-F", "raw", "x.qcow2"],
    "backing-v2": ["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2"],
    "backing-opts": ["-o", "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=512", "x.qcow2", "1M"],
    "backing-extl2-prealloc": [
        "-o",
        "extended_l2=on,preallocation=metadata",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "x.qcow2",
    ],
    "backing-relative-to-image": ["-b", "../base.qcow2", "-F", "qcow2", "sub/x.qcow2", "1M"],
    "backing-unsafe": ["-u", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    "size-option": ["-o", "size=7M", "x.qcow2"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_create_matches_qemu(name: str, twins: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    for d in twins:
        (d / "sub").mkdir()
    differential(CASES[name], twins, capsys)


def random_argv(rnd: random.Random) -> list[str]:
    """A random but valid option set, with sizes that keep preallocated files small."""
    cs = 1 << rnd.randint(9, 21)
    opts = [f"cluster_size={cs}"]
    v3 = rnd.random() < 0.8
    extl2 = data_raw = False
    if not v3:
        opts.append("compat=0.10")
    else:
        opts.append(f"refcount_bits={1 << rnd.randint(0, 6)}")
        extl2 = cs >= 16 * KiB and rnd.random() < 0.4
        if extl2:
            opts.append("extended_l2=on")
        if rnd.random() < 0.3:
            opts.append("lazy_refcounts=on")
        if rnd.random() < 0.3:
            opts.append("compression_type=zstd")
        if rnd.random() < 0.3:
            opts.append("data_file=d.raw")
            data_raw = rnd.random() < 0.5
            if data_raw:
                opts.append("data_file_raw=on")
    pre = rnd.choice(["off", "off", "metadata", "falloc", "full"])
    if pre != "off":
        opts.append(f"preallocation={pre}")
    argv = ["-o", ",".join(opts)]
    if not data_raw and (pre == "off" or extl2) and rnd.random() < 0.3:
        argv += ["-b", "base.qcow2", "-F", "qcow2"] if rnd.random() < 0.5 else ["-b", "base.raw", "-F", "raw"]
    if pre == "off" and not data_raw:
        top = 1 << (42 if cs >= 4 * KiB else 33)
        size = rnd.choice([0, 512, MiB, rnd.randrange(1 << 34), rnd.randrange(top)])
    else:
        size = rnd.randrange((256 * MiB if cs >= 64 * KiB and pre == "metadata" else 24 * MiB) + 1)
    return [*argv, "x.qcow2", str(size)]


@pytest.mark.parametrize("seed", range(SEEDS))
def test_create_random_options(seed: int, twins: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    differential(random_argv(random.Random(seed)), twins, capsys)


ERRORS = {
    "extl2-small-clusters": ["-o", "cluster_size=8k,extended_l2=on", "x.qcow2", "1M"],
    "cluster-not-power-of-two": ["-o", "cluster_size=1000", "x.qcow2", "1M"],
    "cluster-too-big": ["-o", "cluster_size=4M", "x.qcow2", "1M"],
    "cluster-too-small": ["-o", "cluster_size=256", "x.qcow2", "1M"],
    "cluster-not-a-size": ["-o", "cluster_size=abc", "x.qcow2", "1M"],
    "raw-without-data-file": ["-o", "data_file_raw=on", "x.qcow2", "1M"],
    "raw-with-backing": [
        "-o",
        "data_file=d.raw,data_file_raw=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "x.qcow2",
    ],
    "prealloc-with-backing": ["-o", "preallocation=metadata", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2"],
    "v2-lazy": ["-o", "compat=0.10,lazy_refcounts=on", "x.qcow2", "1M"],
    "v2-extl2": ["-o", "compat=0.10,extended_l2=on", "x.qcow2", "1M"],
    "v2-data-file": ["-o", "compat=0.10,data_file=d.raw", "x.qcow2", "1M"],
    "v2-zstd": ["-o", "compat=0.10,compression_type=zstd", "x.qcow2", "1M"],
    "v2-refcount-8": ["-o", "compat=0.10,refcount_bits=8", "x.qcow2", "1M"],
    "refcount-3": ["-o", "refcount_bits=3", "x.qcow2", "1M"],
    "refcount-128": ["-o", "refcount_bits=128", "x.qcow2", "1M"],
    "refcount-0": ["-o", "refcount_bits=0", "x.qcow2", "1M"],
    "refcount-nan": ["-o", "refcount_bits=abc", "x.qcow2", "1M"],
    "backing-without-format": ["-b", "base.qcow2", "x.qcow2", "1M"],
    "backing-unsafe-without-format": ["-u", "-b", "base.qcow2", "x.qcow2", "1M"],
    "backing-missing": ["-b", "nothere.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    "backing-same-name": ["-b", "x.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    "backing-empty-name": ["-b", "", "-F", "qcow2", "x.qcow2", "1M"],
    "backing-format-alone": ["-o", "backing_fmt=qcow2", "x.qcow2", "1M"],
    "compat-unknown": ["-o", "compat=2.0", "x.qcow2", "1M"],
    "compression-unknown": ["-o", "compression_type=lz4", "x.qcow2", "1M"],
    "prealloc-unknown": ["-o", "preallocation=bogus", "x.qcow2", "1M"],
    "bool-unknown": ["-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
    "option-unknown": ["-o", "bogus=1", "x.qcow2", "1M"],
    "no-size": ["x.qcow2"],
    "size-garbage": ["x.qcow2", "1X"],
    "size-too-big": ["x.qcow2", "8E"],
    "size-twice": ["-o", "size=2M", "x.qcow2", "3M"],
    "too-large-for-l1": ["-o", "cluster_size=512", "x.qcow2", "1P"],
    "too-large-no-hint": ["x.qcow2", "7E"],
    "format-unknown": ["-f", "foo", "x.qcow2", "1M"],
    "data-file-dir-missing": ["-o", "data_file=nodir/d.raw", "x.qcow2", "1M"],
}


def _message(text: str, prog: str) -> list[str]:
    """The error lines without the program prefix; qemu-img prefixes every line of a size hint."""
    return [line.removeprefix(prog + ": ") for line in text.strip().splitlines()]


@pytest.mark.parametrize("name", list(ERRORS))
def test_create_errors_like_qemu(name: str, twins: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    q, o = twins
    argv = ERRORS[name]
    fmt = [] if "-f" in argv else ["-f", "qcow2"]
    qp = qemu(q, "qemu-img", "create", *fmt, *argv, check=False)
    rc, out, err = ours(o, argv, capsys)
    assert qp.returncode == 1 and rc == 1
    assert _message(err, "qcow2") == _message(qp.stderr, "qemu-img")
    assert out == qp.stdout
    assert not (o / "x.qcow2").exists() and not (q / "x.qcow2").exists()


def test_refcount_packing_is_lsb_first() -> None:
    """Sub-byte refcounts pack from the least significant bit; wider ones are big-endian."""
    counts = bytearray([1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert encode_refcounts(counts, 1) == bytes([0b10001101, 0b00000001])
    assert encode_refcounts(counts[:4], 2) == bytes([0b01010001])
    assert encode_refcounts(counts[:4], 4) == bytes([0x01, 0x11])
    assert encode_refcounts(counts[:2], 16) == b"\x00\x01\x00\x00"
    assert encode_refcounts(counts[:1], 64) == b"\x00" * 7 + b"\x01"


def test_parse_size_like_qemu_strtosz() -> None:
    assert parse_size("1M") == MiB and parse_size("1.5k") == 1536 and parse_size("2T") == 2 * TiB
    assert parse_size("4096") == 4096 and parse_size("3g") == 3 * GiB
    for bad in ("", "1X", "-1", "1.5", "k", "1..5k"):
        assert parse_size(bad) is None, bad


def test_api_errors_and_cleanup(tmp_path: Path) -> None:
    """create_image raises qemu's message and leaves nothing behind when it fails."""
    with pytest.raises(CreateError, match="data-file-raw requires data-file"):
        create_image(str(tmp_path / "a.qcow2"), MiB, data_file_raw=True)
    with pytest.raises(CreateError, match="Could not create"):
        create_image(str(tmp_path / "b.qcow2"), MiB, data_file=str(tmp_path / "no" / "d.raw"))
    assert list(tmp_path.iterdir()) == []


def test_api_image_is_served_by_our_reader(tmp_path: Path, oracle_tools: None) -> None:
    """The image is also valid for our own reader (the server opens what create writes)."""
    from qcow2 import open_layer

    path = tmp_path / "x.qcow2"
    create_image(str(path), 5 * MiB + 512, cluster_size=4096, refcount_bits=2, preallocation="metadata")
    layer = open_layer(str(path), "qcow2")
    try:
        assert layer.size == 5 * MiB + 512
    finally:
        layer.close()
    check_clean(tmp_path, "x.qcow2")
    shutil.rmtree(tmp_path / "none", ignore_errors=True)
