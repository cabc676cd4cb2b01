"""Hostile and corrupt images: QEMU's answer, or a one-line refusal; never a traceback or a hang.

Every command (``qcow2 info``, ``map``, ``check``) and the server's read path
run under ``prlimit --as`` (bounded memory) and a timeout, on the images of
issue 8 §2 and on a seeded corpus of mutants of qemu-built images (headers,
extensions, L1/L2/refcount tables, snapshot table, bitmap directory).  A
read-only command never changes the file.  Where QEMU opens and serves an
image, the server serves the same bytes as qemu-nbd.

``HOSTILE_CASES=N`` runs N mutants instead of the default (``HOSTILE_SEED``
picks the first seed); a failure prints the seed that rebuilds its mutant.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from images import Image, Recipe
from servers import our_nbd, qemu_nbd

HERE = Path(__file__).resolve().parent
PROBE = HERE / "hostile_probe.py"
MEMORY_LIMIT = 1 << 30  # prlimit --as: address space of one probe or server
TIMEOUT = 60  # seconds for one probe (all four steps)
MUTANTS = int(os.environ.get("HOSTILE_CASES", "48"))
FIRST_SEED = int(os.environ.get("HOSTILE_SEED", "1"))
MiB = 1 << 20


def sh(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60, cwd=cwd)


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def be(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def extensions(path: Path) -> dict[int, tuple[int, int]]:
    """Header extension type -> (data offset, length)."""
    data = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]
    found = {}
    while pos + 8 <= len(data):
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0:
            break
        found[kind] = (pos + 8, length)
        pos += 8 + ((length + 7) & ~7)
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe(image: Path) -> tuple[list[dict], subprocess.CompletedProcess]:
    argv = ["prlimit", f"--as={MEMORY_LIMIT}", "--", sys.executable, str(PROBE), str(image)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=image.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{image.name}: the commands did not finish within {TIMEOUT}s (a hang)")
    steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return steps, done


def problems(image: Path) -> list[str]:
    """What is wrong with how our commands treat ``image`` (empty: all is well)."""
    before = digest(image)
    steps, done = probe(image)
    found = []
    if done.returncode != 0 or len(steps) != 4:
        found.append(f"probe exited {done.returncode}: {done.stderr[-2000:]}")
    for s in steps:
        if s["unexpected"]:
            found.append(f"{s['step']}: {s['unexpected'][-1500:]}")
        elif s["step"] in ("info", "map") and s["rc"] == 1:
            lines = s["stderr"].strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("qcow2: "):
                found.append(f"{s['step']}: refusal is not one 'qcow2: ...' line: {s['stderr']!r}")
        elif s["step"] in ("info", "map") and s["rc"] != 0:
            found.append(f"{s['step']}: exit status {s['rc']}")
        elif s["step"] == "check" and s["rc"] not in (0, 1, 2, 3):
            found.append(f"check: exit status {s['rc']}")
    if digest(image) != before:
        found.append("a read-only command changed the file")
    return found


# -- the images of issue 8 §2 --------------------------------------------------------------


def _fresh(d: Path, name: str = "img.qcow2", *opts: str) -> Path:
    path = d / name
    sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, name, "64M", cwd=d)  # relative names: from d
    return path


def reftable_at_l1(d: Path) -> Path:
    img = _fresh(d)
    sh("qemu-io", "-c", "write -P 7 0 1M", str(img))
    poke(img, 48, ">Q", be(img, 40, ">Q"))
    return img


def non_ascii_feature_name(d: Path) -> Path:
    img = _fresh(d)
    sh("qemu-io", "-c", "write -P 9 1M 64k", str(img))
    start, _ = extensions(img)[0x6803F857]
    with open(img, "r+b") as f:
        f.seek(start + 2)
        f.write("Zürich ☃".encode())
    return img


def huge_bitmap_count(d: Path) -> Path:
    img = _fresh(d)
    sh("qemu-img", "bitmap", "--add", str(img), "b0")
    start, _ = extensions(img)[0x23852875]
    poke(img, start, ">I", 0xFFFFFFFF)
    return img


def fifo_backing(d: Path) -> Path:
    os.mkfifo(d / "fifo")
    return _fresh(d, "img.qcow2", "-u", "-b", "fifo", "-F", "raw")


def directory_backing(d: Path) -> Path:
    (d / "dir").mkdir()
    return _fresh(d, "img.qcow2", "-u", "-b", "dir", "-F", "raw")


def fifo_data_file(d: Path) -> Path:
    img = _fresh(d, "img.qcow2", "-o", "data_file=data.raw")
    (d / "data.raw").unlink()
    os.mkfifo(d / "data.raw")
    return img


def no_refcount_table(d: Path) -> Path:
    img = _fresh(d)
    poke(img, 56, ">I", 0)
    return img


def snapshot_extra_data_too_big(d: Path) -> Path:
    img = _fresh(d)
    sh("qemu-img", "snapshot", "-c", "s1", str(img))
    poke(img, be(img, 64, ">Q") + 36, ">I", 65536)
    return img


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    qemu_serves: bool  # qemu-nbd serves it: so must we, the same bytes
    names: str = ""  # what our refusal must mention


CASES = {
    "refcount-table-at-l1": Case(reftable_at_l1, True),
    "non-ascii-feature-name": Case(non_ascii_feature_name, True),
    "huge-bitmap-count": Case(huge_bitmap_count, False, "bitmaps"),
    "fifo-backing-file": Case(fifo_backing, False, "FIFO"),
    "directory-backing-file": Case(directory_backing, False, "directory"),
    "fifo-data-file": Case(fifo_data_file, False, "FIFO"),
    "refcount-table-clusters-0": Case(no_refcount_table, False, "reference count table"),
    "snapshot-extra-data-too-big": Case(snapshot_extra_data_too_big, False, "extra metadata"),
}


def _image(path: Path, recipe: Recipe) -> Image:
    return Image(path.name, path.parent, "qcow2", recipe)


def _start_ours(img: Path, sock: Path) -> subprocess.CompletedProcess:
    argv = ["prlimit", f"--as={MEMORY_LIMIT}", "--", sys.executable, "-m", "nbdserver", "-r", "-f", "qcow2"]
    argv += ["-k", str(sock), "--fork", "--pid-file", str(sock) + ".pid", str(img)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=img.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{img.name}: the server neither started nor refused within {TIMEOUT}s")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_image(tmp_path: Path, recipe: Recipe, name: str) -> None:
    case = CASES[name]
    img = case.build(tmp_path)
    found = problems(img)
    assert not found, "\n".join(found)
    steps, _ = probe(img)
    by_step = {s["step"]: s for s in steps}
    if not case.qemu_serves:
        for step in ("info", "map"):
            assert by_step[step]["rc"] == 1, by_step[step]
            assert case.names in by_step[step]["stderr"], by_step[step]
        refused = _start_ours(img, tmp_path / "s.sock")
        assert refused.returncode == 1, refused
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qcow2-nbd: cannot open"), refused.stderr
        assert case.names in lines[0], lines
        return
    assert all(s["rc"] == 0 for s in steps if s["step"] != "check"), steps
    assert by_step["serve"]["stderr"] == "", by_step["serve"]
    ours_map = subprocess.run(
        [sys.executable, "-m", "qcow2", "map", "--output=json", str(img)], capture_output=True, text=True
    )
    qemu_map = sh("qemu-img", "map", "--output=json", str(img))
    assert json.loads(ours_map.stdout) == json.loads(qemu_map.stdout), ours_map.stderr
    before = digest(img)
    with (
        qemu_nbd(_image(img, recipe), tmp_path / "q") as ref,
        our_nbd(_image(img, recipe), tmp_path / "o") as ours,
    ):
        same = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", ref.uri, ours.uri],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert same.returncode == 0, same.stdout + same.stderr
    assert ours.exit_problem is None, ours.stderr()
    assert digest(img) == before


# -- a seeded corpus of mutants ---------------------------------------------------------------


def _bases(d: Path) -> list[Path]:
    """Images with every structure a mutation can hit: data, compressed, zero clusters,
    a snapshot, a bitmap, a backing file, a v2 image, extended L2."""
    d.mkdir()
    a = _fresh(d, "a.qcow2")
    sh("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 2 2M 64k", "-c", "write -z 4M 64k", str(a))
    sh("qemu-img", "snapshot", "-c", "s1", str(a))
    sh("qemu-io", "-c", "write -P 3 512k 64k", str(a))
    sh("qemu-img", "bitmap", "--add", str(a), "b0")
    sh("qemu-img", "create", "-q", "-f", "raw", str(d / "base.raw"), "64M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 4 0 4M", str(d / "base.raw"))
    b = _fresh(d, "b.qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw")
    sh("qemu-io", "-c", "write -P 5 1M 128k", str(b))
    c = _fresh(d, "c.qcow2", "-o", "extended_l2=on,cluster_size=128k")
    sh("qemu-io", "-c", "write -P 6 4k 8k", "-c", "write -z 1M 256k", str(c))
    return [a, b, c]


_INTERESTING = [0, 1, 8, 0x200, 0xFFFF, 1 << 16, (1 << 16) - 1, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 62,
                1 << 63, (1 << 64) - 1]  # fmt: skip


def _targets(img: Path) -> list[tuple[int, int]]:
    """(offset, width) of fields worth corrupting: header fields, extensions, table entries."""
    header = [(o, w) for o, w in ((4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8),
                                  (48, 8), (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4),
                                  (100, 4), (104, 1))]  # fmt: skip
    ext = [(start + i, 8) for start, length in extensions(img).values() for i in range(0, length, 8)]
    ext += [(start - 8, 4) for start, _ in extensions(img).values()] + [
        (start - 4, 4) for start, _ in extensions(img).values()
    ]
    tables = []
    for table_field, count in ((40, 8), (48, 4), (64, 6)):
        offset = be(img, table_field, ">Q")
        if offset:
            tables += [(offset + 8 * i, 8) for i in range(count)]
    l1 = be(img, 40, ">Q")
    l2 = be(img, l1, ">Q") & 0x00FFFFFFFFFFFE00
    if l2:
        tables += [(l2 + 8 * i, 8) for i in range(40)]
    reft = be(img, 48, ">Q")
    block = be(img, reft, ">Q") & ~0x1FF
    if block:
        tables += [(block + 2 * i, 2) for i in range(16)]
    if 0x23852875 in extensions(img):
        start, _ = extensions(img)[0x23852875]
        directory = be(img, start + 16, ">Q")
        tables += [
            (directory + i, w) for i, w in ((0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4))
        ]
    return header + ext + tables


def _mutate(img: Path, rng: random.Random) -> list[str]:
    targets = _targets(img)
    size = img.stat().st_size
    done = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        offset, width = rng.choice(targets)
        old = (
            int.from_bytes(img.read_bytes()[offset : offset + width], "big") if offset + width <= size else 0
        )
        how = rng.randrange(4)
        if how == 0:
            value = rng.choice(_INTERESTING + [size, size * 4, be(img, 40, ">Q"), be(img, 48, ">Q")])
        elif how == 1:
            value = old ^ (1 << rng.randrange(width * 8))
        elif how == 2:
            value = rng.getrandbits(width * 8)
        else:
            value = old + rng.choice((-1, 1, 512, 65536))
        value %= 1 << (width * 8)
        with open(img, "r+b") as f:
            f.seek(offset)
            f.write(value.to_bytes(width, "big"))
        done.append(f"{width} bytes at {offset:#x}: {old:#x} -> {value:#x}")
    return done


def test_mutated_images(tmp_path: Path) -> None:
    bases = _bases(tmp_path / "bases")

    def one(seed: int) -> str | None:
        rng = random.Random(seed)
        base = bases[seed % len(bases)]
        img = base.parent / f"m{seed}-{base.name}"
        shutil.copy(base, img)
        mutations = _mutate(img, rng)
        found = problems(img)
        img.unlink()
        if found:
            return f"seed {seed} ({base.name}; {'; '.join(mutations)}):\n  " + "\n  ".join(found)
        return None

    seeds = range(FIRST_SEED, FIRST_SEED + MUTANTS)
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(one, seeds) if f]
    assert not failures, f"{len(failures)} of {MUTANTS} mutants mistreated:\n" + "\n".join(failures)
