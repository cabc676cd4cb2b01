"""Test images built with the real qemu tools, and the log that rebuilds them.

Every image of the differential suite is made by ``qemu-img``/``qemu-io`` (plus a
couple of coreutils/util-linux commands and the header edits below).  A
:class:`Recipe` runs those commands in one work directory and remembers each of
them as a shell line, so a failing test can print a script that rebuilds the
exact image.

Header edits that no qemu tool can make (setting the corrupt bit, an unknown
incompatible bit, removing the backing-format extension) are done by this file
run as a script, ``python3 tests/images.py COMMAND FILE ...``; the recipe
records that command line too.

``CASES`` maps a case name to a builder ``f(recipe) -> Image``; the map and
export matrices run over it.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

THIS_FILE = Path(__file__).resolve()

KiB = 1024
MiB = 1024 * KiB

QCOW2_MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA

ORACLE_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy", "fallocate", "truncate")


def missing_tools() -> list[str]:
    return [t for t in ORACLE_TOOLS if shutil.which(t) is None]


class BuildError(AssertionError):
    """A qemu command used to build a test image failed: the recipe is broken."""


def _no_core_dumps() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class Image:
    """An image ready for comparison.

    ``path`` is what every tool gets on its command line, interpreted relative
    to ``cwd`` (so relative backing/data-file names are resolved the way a user
    in ``cwd`` would see them).
    """

    path: str
    cwd: Path
    fmt: str
    recipe: Recipe
    # re-checked before each use of a cached image: what makes the case meaningful
    premise: Callable[[Image], None] | None = None

    def check_premise(self) -> None:
        if self.premise is not None:
            self.premise(self)

    def settle(self) -> None:
        self.recipe.settle(sync=False)

    @property
    def abspath(self) -> Path:
        return (self.cwd / self.path).resolve()


class Recipe:
    """Runs build commands in ``root`` and logs them as a replayable script."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.steps: list[str] = []
        self._files: list[Path] | None = None

    # -- running -------------------------------------------------------
    def run(
        self,
        *argv: str,
        cwd: str | Path | None = None,
        ok_signals: tuple[int, ...] = (),
        expect_fail: bool = False,
    ) -> subprocess.CompletedProcess:
        argv = tuple(str(a) for a in argv)
        where = self.root if cwd is None else self.root / cwd
        line = shlex.join(argv)
        if cwd is not None:
            line = f"(cd {shlex.quote(str(cwd))} && {line})"
        self.steps.append(line)
        p = subprocess.run(
            argv,
            cwd=where,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_no_core_dumps,
        )
        failed = p.returncode != 0 and -p.returncode not in ok_signals
        # qemu-io keeps going after a failing -c command; catch its messages too.
        if argv[0] == "qemu-io" and ("failed:" in p.stdout or "failed:" in p.stderr):
            failed = True
        if failed != expect_fail:
            raise BuildError(
                f"build step {'unexpectedly succeeded' if expect_fail else 'failed'} "
                f"(rc={p.returncode}): {line}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}\n"
                f"recipe so far:\n{self.script()}"
            )
        return p

    def note(self, text: str) -> None:
        self.steps.append(f"# {text}")

    def script(self) -> str:
        lines = [f"mkdir -p WORK && cd WORK   # was {self.root}"]
        lines += self.steps
        return "\n".join(lines)

    # -- qemu shorthands ----------------------------------------------
    def create(
        self,
        name: str,
        size: int | str,
        fmt: str = "qcow2",
        backing: str | None = None,
        backing_fmt: str | None = None,
        cwd: str | None = None,
        **opts: object,
    ) -> str:
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if backing is not None:
            argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
        if opts:
            argv += ["-o", ",".join(f"{k}={_optval(v)}" for k, v in opts.items())]
        argv += [name, str(size)]
        self.run(*argv, cwd=cwd)
        return name

    def io(self, name: str, *cmds: str, fmt: str = "qcow2", cwd: str | None = None, **kw) -> None:
        if not cmds:
            return
        argv = ["qemu-io", "-f", fmt]
        for c in cmds:
            argv += ["-c", c]
        argv.append(name)
        self.run(*argv, cwd=cwd, **kw)

    def img(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
        return self.run("qemu-img", *args, cwd=cwd)

    def tool(self, command: str, *args: str, cwd: str | None = None) -> None:
        """Run one of this file's header-editing commands (see ``main``)."""
        self.run(sys.executable, str(THIS_FILE), command, *args, cwd=cwd)

    def qemu_map(self, name: str, cwd: str | None = None) -> list[dict]:
        p = self.img("map", "--output=json", name, cwd=cwd)
        return json.loads(p.stdout)

    def image(self, name: str, fmt: str = "qcow2", cwd: str | Path | None = None) -> Image:
        """The image ``name`` (relative to ``root/cwd``), to be opened from ``root/cwd``."""
        where = self.root if cwd is None else self.root / cwd
        self.settle()
        return Image(path=name, cwd=where, fmt=fmt, recipe=self)

    def settle(self, sync: bool = True) -> None:
        """Flush every file of the recipe and drop it from the page cache.

        Holes seen through SEEK_DATA/SEEK_HOLE (which qemu's metadata-preallocation
        recursion reports as zeros) depend on the file system's writeback and page
        cache state on ext4: unwritten extents count as holes until they are written
        back or read into the cache.  Settling makes that state the same for every
        test and every tool, whatever ran before.
        """
        if self._files is None or sync:
            self._files = [p for p in sorted(self.root.rglob("*")) if p.is_file() and not p.is_symlink()]
        for p in self._files:
            fd = os.open(p, os.O_RDONLY)
            try:
                if sync:
                    os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def clone(image: Image, where: Path) -> Image:
    """The same image in a sparse copy of its recipe's whole directory at ``where``.

    Backing and data files come along, so relative names resolve in the copy
    exactly as in the original; the copy's recipe lists the same build steps.
    """
    src = image.recipe.root
    p = subprocess.run(["cp", "-a", "--sparse=always", str(src), str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        raise BuildError(f"cp -a {src} {where}: {p.stderr}")
    rc = Recipe(where)
    rc.steps = list(image.recipe.steps)
    return Image(image.path, where / image.cwd.relative_to(src), image.fmt, rc, image.premise)


def _optval(v: object) -> str:
    if v is True:
        return "on"
    if v is False:
        return "off"
    return str(v)


# ---------------------------------------------------------------------------
# Header editing (no qemu tool does these)


def read_header(path: str | Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(112)
    if raw[:4] != QCOW2_MAGIC:
        raise ValueError(f"{path}: not qcow2")
    (version,) = struct.unpack_from(">I", raw, 4)
    h = {
        "version": version,
        "backing_file_offset": struct.unpack_from(">Q", raw, 8)[0],
        "backing_file_size": struct.unpack_from(">I", raw, 16)[0],
        "cluster_bits": struct.unpack_from(">I", raw, 20)[0],
        "size": struct.unpack_from(">Q", raw, 24)[0],
        "incompatible_features": 0,
        "compatible_features": 0,
        "autoclear_features": 0,
        "refcount_order": 4,
        "header_length": 72,
    }
    if version >= 3:
        inc, comp, auto, order, hlen = struct.unpack_from(">QQQII", raw, 72)
        h.update(
            incompatible_features=inc,
            compatible_features=comp,
            autoclear_features=auto,
            refcount_order=order,
            header_length=hlen,
        )
    return h


def set_incompatible_bits(path: str | Path, mask: int) -> None:
    """OR ``mask`` into the incompatible-features field (v3 only)."""
    with open(path, "r+b") as f:
        f.seek(72)
        (cur,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", cur | mask))


def header_extensions(path: str | Path) -> tuple[int, list[tuple[int, bytes]], int]:
    """(start, [(magic, data)], end) of the header extension area, end excluding the end marker."""
    h = read_header(path)
    with open(path, "rb") as f:
        cluster = f.read(1 << h["cluster_bits"])
    start = pos = h["header_length"]
    exts = []
    while pos + 8 <= len(cluster):
        magic, length = struct.unpack_from(">II", cluster, pos)
        if magic == 0:
            break
        exts.append((magic, cluster[pos + 8 : pos + 8 + length]))
        pos += 8 + ((length + 7) & ~7)
    return start, exts, pos


def strip_backing_format(path: str | Path) -> None:
    """Remove the backing-format header extension, making an "old style" image."""
    start, exts, end = header_extensions(path)
    kept = [(m, d) for m, d in exts if m != EXT_BACKING_FORMAT]
    if len(kept) == len(exts):
        raise ValueError(f"{path}: no backing format extension")
    blob = b"".join(struct.pack(">II", m, len(d)) + d + b"\0" * (-len(d) % 8) for m, d in kept)
    blob += b"\0" * 8  # end marker
    old_len = end + 8 - start
    blob += b"\0" * (old_len - len(blob))
    h = read_header(path)
    assert h["backing_file_offset"] == 0 or h["backing_file_offset"] >= start + old_len
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(blob)


def write_file(path: str | Path, spec: str) -> None:
    """Write a raw file from ``spec``: comma-separated ``OFFSET:LENGTH:BYTE`` runs over a
    file truncated to the size given as the first item (``SIZE,off:len:byte,...``).
    Sizes need not be multiples of 512, which ``qemu-img create`` would round up."""
    items = spec.split(",")
    size = int(items[0], 0)
    with open(path, "wb") as f:
        f.truncate(size)
        for it in items[1:]:
            off, length, byte = (int(x, 0) for x in it.split(":"))
            f.seek(off)
            f.write(bytes([byte]) * length)


def poke(path: str | Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite one big-endian field (``struct`` format ``fmt``, e.g. ``>I``) at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "poke":
        poke(args[0], int(args[1], 0), args[2], int(args[3], 0))
    elif cmd == "set-incompat":
        set_incompatible_bits(args[0], int(args[1], 0))
    elif cmd == "strip-backing-format":
        strip_backing_format(args[0])
    elif cmd == "write-file":
        write_file(args[0], args[1])
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------
# Builders.  Each takes a Recipe and returns the Image to compare.

Builder = Callable[[Recipe], Image]
CASES: dict[str, Builder] = {}


def case(name: str):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return deco


def mixed_ops(cs: int, size: int, compress: bool = True, zero_flags: bool = True) -> list[str]:
    """A little of everything, at offsets scaled by the cluster size ``cs``."""
    ops = [
        f"write -P 0x11 0 {cs}",  # normal
        f"write -P 0x22 {2 * cs + 100} 300",  # partial, unaligned: COW of the rest
        f"write -z {4 * cs} {cs}",  # zero on unallocated
        f"write -P 0x33 {6 * cs} {2 * cs}",
        f"write -z {6 * cs} {cs}",  # zero over data, kept allocation
        f"write -z -u {7 * cs} {cs}",  # zero over data, unmapped
        f"write -P 0x55 {11 * cs} {cs}",
        f"discard {11 * cs} {cs}",
        f"write -P 0x66 {12 * cs + 1} {cs}",  # straddles two clusters, unaligned
        f"write -P 0x77 {size - 700} 700",  # tail of the disk
    ]
    if compress:
        ops.append(f"write -c -P 0x44 {9 * cs} {cs}")
        ops.append(f"write -c {10 * cs} {cs}")  # compressed zeros
    if not zero_flags:
        ops = [o for o in ops if not o.startswith("write -z")]
    return ops


# -- plain images --------------------------------------------------------


@case("fresh-v3")
def _fresh_v3(rc: Recipe) -> Image:
    return rc.image(rc.create("a.qcow2", "1M"))


@case("fresh-v2")
def _fresh_v2(rc: Recipe) -> Image:
    return rc.image(rc.create("a.qcow2", "1M", compat="0.10"))


TYPES_19_2 = [
    "write -P 0xaa 0 64k",
    "write -z 128k 64k",
    "write -P 0xbb 256k 64k",
    "write -z 256k 64k",
    "write -P 0xcc 384k 64k",
    "write -z -u 384k 64k",
    "write -P 0xdd 512k 4k",
    "write -P 0x77 266240 4k",  # into the ZERO_ALLOC cluster
    "write -P 0x12 700001 1234",
    "write -P 0x13 786432 64k",
    "discard 786432 64k",
]


@case("types-v3")
def _types_v3(rc: Recipe) -> Image:
    rc.create("a.qcow2", "1M")
    rc.io("a.qcow2", *TYPES_19_2)
    return rc.image("a.qcow2")


@case("types-v2")
def _types_v2(rc: Recipe) -> Image:
    rc.create("a.qcow2", "1M", compat="0.10")
    rc.io("a.qcow2", *TYPES_19_2)
    return rc.image("a.qcow2")


def _mixed(cs: int, compat: str = "1.1", **opts) -> Builder:
    def build(rc: Recipe) -> Image:
        size = 14 * cs + 3 * 512  # deliberately not a multiple of the cluster size
        rc.create("m.qcow2", size, cluster_size=cs, compat=compat, **opts)
        rc.io("m.qcow2", *mixed_ops(cs, size, compress=True))
        return rc.image("m.qcow2")

    return build


for _cs in (512, 4 * KiB, 16 * KiB, 64 * KiB, 2 * MiB):
    case(f"mixed-v3-cs{_cs}")(_mixed(_cs))
for _cs in (512, 4 * KiB, 64 * KiB):
    case(f"mixed-v2-cs{_cs}")(_mixed(_cs, compat="0.10"))
for _order in range(7):
    case(f"refcount-bits-{1 << _order}")(_mixed(4 * KiB, refcount_bits=1 << _order))


@case("reftable-growth")
def _reftable_growth(rc: Recipe) -> Image:
    rc.create("rf.qcow2", "4M", cluster_size=512, refcount_bits=64)
    rc.io("rf.qcow2", "write -P 1 0 40k", "write -P 2 40k 2600k", "write -z 100k 300k", "write -c 3M 512")
    return rc.image("rf.qcow2")


@case("size-unaligned-64k")
def _size_unaligned_64k(rc: Recipe) -> Image:
    rc.create("u.qcow2", 100000)  # qemu rounds to 100352
    rc.io("u.qcow2", "write -P 0x5 0 4096", "write -P 0x6 65536 34816", "write -z 70000 1000")
    return rc.image("u.qcow2")


@case("size-unaligned-4k")
def _size_unaligned_4k(rc: Recipe) -> Image:
    rc.create("u.qcow2", 100000, cluster_size=4096)
    rc.io(
        "u.qcow2",
        "write -P 0x5 0 4096",
        "write -P 0x6 98304 2048",
        "write -z -u 8192 8192",
        "write -c 4096 4096",
    )
    return rc.image("u.qcow2")


@case("raw-unaligned")
def _raw_unaligned(rc: Recipe) -> Image:
    rc.tool("write-file", "r.raw", "100000,0:5000:0xaa,70000:30000:0xbb")
    return rc.image("r.raw", fmt="raw")


@case("raw-sparse")
def _raw_sparse(rc: Recipe) -> Image:
    rc.create("r.raw", "1M", fmt="raw")
    rc.io(
        "r.raw", "write -P 1 0 64k", "write -P 2 300k 100k", "write -z 320k 8k", "discard 512k 4k", fmt="raw"
    )
    return rc.image("r.raw", fmt="raw")


# -- compression ---------------------------------------------------------


def _pattern_raw(rc: Recipe, name: str = "pat.raw") -> str:
    """A raw source with compressible runs, a zero run, incompressible noise and an unaligned end."""
    rc.tool("write-file", name, "300000,0:65536:0x55,65536:70000:0x66,200000:1:0x01")
    # noise that does not compress: /dev/urandom via dd, fixed seed not needed (content is compared)
    rc.run(
        "dd", "if=/dev/urandom", f"of={name}", "bs=4096", "seek=40", "count=12", "conv=notrunc", "status=none"
    )
    return name


@case("compress-write-zlib")
def _compress_write_zlib(rc: Recipe) -> Image:
    rc.create("c.qcow2", "1M")
    rc.io(
        "c.qcow2",
        "write -c -P 0x55 0 64k",
        "write -c -P 0x66 64k 64k",
        "write -P 0x77 128k 64k",
        "write -c 256k 128k",
    )
    return rc.image("c.qcow2")


@case("compress-write-zstd")
def _compress_write_zstd(rc: Recipe) -> Image:
    rc.create("c.qcow2", "1M", compression_type="zstd")
    rc.io(
        "c.qcow2",
        "write -c -P 0x55 0 64k",
        "write -c -P 0x66 64k 64k",
        "write -P 0x77 128k 64k",
        "write -c 256k 128k",
    )
    return rc.image("c.qcow2")


def _compress_convert(opts: str) -> Builder:
    """``qemu-img convert -c`` of the pattern file: mixed compressible and random clusters."""

    def build(rc: Recipe) -> Image:
        src = _pattern_raw(rc)
        rc.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, "c.qcow2")
        return rc.image("c.qcow2")

    return build


case("compress-convert-zlib")(_compress_convert("compression_type=zlib"))
case("compress-convert-zstd")(_compress_convert("compression_type=zstd"))
case("compress-convert-zstd-4k")(_compress_convert("compression_type=zstd,cluster_size=4096"))
case("compress-convert-zlib-512")(_compress_convert("cluster_size=512"))


# -- extended L2 ---------------------------------------------------------


@case("extl2-19.5-backing")
def _extl2_backing(rc: Recipe) -> Image:
    rc.create("eb.qcow2", "1M")
    rc.io("eb.qcow2", "write -P 0x11 0 256k")
    rc.create("ex.qcow2", "1M", backing="eb.qcow2", backing_fmt="qcow2", extended_l2=True)
    rc.io(
        "ex.qcow2",
        "write -P 0x22 8k 4k",
        "write -z 20k 2k",
        "write -z 128k 64k",
        "write -P 0x33 196608 64k",
        "write -z 200704 2k",
        "write -P 0x44 300001 5000",
        "discard 196608 8k",
    )
    return rc.image("ex.qcow2")


@case("extl2-19.5-nobacking")
def _extl2_nobacking(rc: Recipe) -> Image:
    rc.create("xw.qcow2", "256k", extended_l2=True)
    rc.io("xw.qcow2", "write -P 1 4k 4k")
    return rc.image("xw.qcow2")


def _extl2_small(cs: int) -> Builder:
    def build(rc: Recipe) -> Image:
        sc = cs // 32
        size = 20 * cs + 1024
        rc.create("base.qcow2", size, cluster_size=cs)
        rc.io("base.qcow2", f"write -P 0x10 0 {8 * cs}", f"write -P 0x20 {15 * cs} {2 * cs}")
        rc.create(
            "x.qcow2", size, backing="base.qcow2", backing_fmt="qcow2", cluster_size=cs, extended_l2=True
        )
        rc.io(
            "x.qcow2",
            f"write -P 0x31 {sc} {sc}",
            f"write -P 0x32 {3 * sc + 7} 100",
            f"write -z {5 * sc} {2 * sc}",
            f"write -z {cs} {cs}",
            f"write -P 0x33 {2 * cs} {cs}",
            f"write -z {2 * cs + 4 * sc} {sc}",
            f"write -z -u {2 * cs + 8 * sc} {3 * sc}",
            f"discard {2 * cs + 16 * sc} {4 * sc}",
            f"write -c -P 0x34 {4 * cs} {cs}",
            f"write -P 0x35 {10 * cs + 31 * sc} {2 * sc}",
            f"write -z {16 * cs} {sc}",
        )
        return rc.image("x.qcow2")

    return build


case("extl2-cs16k-backing")(_extl2_small(16 * KiB))
case("extl2-cs32k-backing")(_extl2_small(32 * KiB))


@case("extl2-cs32k-nobacking")
def _extl2_32k_nobacking(rc: Recipe) -> Image:
    cs = 32 * KiB
    size = 14 * cs + 3 * 512
    rc.create("x.qcow2", size, cluster_size=cs, extended_l2=True)
    rc.io("x.qcow2", *mixed_ops(cs, size), f"write -P 0x9 {cs + 1024} 1024", f"write -z {cs + 3072} 1024")
    return rc.image("x.qcow2")


@case("extl2-prealloc-metadata-backing")
def _extl2_prealloc_backing(rc: Recipe) -> Image:
    rc.create("b.qcow2", "1M")
    rc.io("b.qcow2", "write -P 0x11 0 512k", "write -z 128k 64k")
    rc.create(
        "x.qcow2", "1M", backing="b.qcow2", backing_fmt="qcow2", extended_l2=True, preallocation="metadata"
    )
    rc.io("x.qcow2", "write -P 0x22 8k 4k", "write -z 64k 2k", "write -P 0x23 600k 4k", "write -z 700k 64k")
    return rc.image("x.qcow2")


@case("extl2-prealloc-metadata-nobacking")
def _extl2_prealloc_nobacking(rc: Recipe) -> Image:
    rc.create("x.qcow2", "1M", extended_l2=True, preallocation="metadata")
    rc.io("x.qcow2", "write -P 0x22 8k 4k", "write -z 64k 2k")
    return rc.image("x.qcow2")


# -- backing chains ------------------------------------------------------


def _chain(depth: int) -> Builder:
    def build(rc: Recipe) -> Image:
        prev = None
        for i in range(depth + 1):
            name = f"l{i}.qcow2"
            size = (1 * MiB) + (i % 3 - 1) * 128 * KiB  # sizes go up and down
            if prev is None:
                rc.create(name, size)
            else:
                rc.create(name, size, backing=prev, backing_fmt="qcow2")
            c = 64 * KiB
            rc.io(
                name,
                f"write -P {0x10 + i} {i * c} {2 * c}",
                f"write -z {(i + 3) * c} {c}",
                f"write -P {0x30 + i} {(i + 5) * c + 512 * i} 4096",
                f"discard {(i + 1) * c} {c}" if i % 2 else f"write -z -u {(8 + i) * c} {c}",
            )
            prev = name
        return rc.image(prev)

    return build


for _d in range(1, 6):
    case(f"chain-depth-{_d}")(_chain(_d))


@case("chain-19.3")
def _chain_19_3(rc: Recipe) -> Image:
    rc.create("base.qcow2", "512k")
    rc.io("base.qcow2", "write -P 0x11 0 64k", "write -P 0x22 192k 64k", "write -z 320k 64k")
    rc.create("top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2")
    rc.io("top.qcow2", "write -P 0x33 64k 64k", "write -z 192k 64k", "write -P 0x44 768k 64k")
    return rc.image("top.qcow2")


@case("chain-short-raw-100000")
def _chain_short_raw(rc: Recipe) -> Image:
    rc.tool("write-file", "short.raw", "100000,0:100000:0xaa")
    rc.create("over.qcow2", "256k", backing="short.raw", backing_fmt="raw")
    return rc.image("over.qcow2")


@case("chain-short-raw-writes")
def _chain_short_raw_writes(rc: Recipe) -> Image:
    rc.tool("write-file", "short.raw", "100000,0:30000:0xaa,40000:60000:0xbb")
    rc.create("over.qcow2", "256k", backing="short.raw", backing_fmt="raw", cluster_size=4096)
    rc.io("over.qcow2", "write -P 0xcc 98000 4000", "write -z 8192 4096", "write -P 0xdd 131072 4096")
    return rc.image("over.qcow2")


@case("chain-raw-base-sparse")
def _chain_raw_sparse(rc: Recipe) -> Image:
    rc.create("base.raw", "2M", fmt="raw")
    rc.io("base.raw", "write -P 1 0 100k", "write -P 2 1M 64k", "write -z 20k 8k", fmt="raw")
    rc.create("top.qcow2", "1536k", backing="base.raw", backing_fmt="raw")
    rc.io("top.qcow2", "write -P 3 64k 64k", "write -z 1M 4k")
    return rc.image("top.qcow2")


@case("chain-backing-longer")
def _chain_backing_longer(rc: Recipe) -> Image:
    rc.create("base.qcow2", "4M", cluster_size=4096)
    rc.io("base.qcow2", "write -P 1 0 4M")
    rc.create("top.qcow2", "1000k", backing="base.qcow2", backing_fmt="qcow2")
    rc.io("top.qcow2", "write -z 64k 64k", "write -P 2 900k 100k")
    return rc.image("top.qcow2")


@case("chain-backing-shorter-mid")
def _chain_backing_shorter_mid(rc: Recipe) -> Image:
    rc.create("base.qcow2", "3M")
    rc.io("base.qcow2", "write -P 1 0 3M")
    rc.create("mid.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2", cluster_size=4096)
    rc.io("mid.qcow2", "write -P 2 8k 4k")
    rc.create("top.qcow2", "2M", backing="mid.qcow2", backing_fmt="qcow2", cluster_size=16384)
    rc.io("top.qcow2", "write -P 3 1536k 16k")
    return rc.image("top.qcow2")


@case("chain-relative-subdir")
def _chain_relative(rc: Recipe) -> Image:
    (rc.root / "imgs" / "deep").mkdir(parents=True)
    (rc.root / "elsewhere").mkdir()
    rc.create("base.qcow2", "1M", cwd="imgs/deep")
    rc.io("base.qcow2", "write -P 1 0 256k", cwd="imgs/deep")
    # top lives in imgs/, names its backing file relative to imgs/
    rc.create("top.qcow2", "1M", backing="deep/base.qcow2", backing_fmt="qcow2", cwd="imgs")
    rc.io("top.qcow2", "write -P 2 64k 64k", cwd="imgs")
    return rc.image("../imgs/top.qcow2", cwd="elsewhere")


@case("chain-relative-three-dirs")
def _chain_relative3(rc: Recipe) -> Image:
    for d in ("a/b/c", "run"):
        (rc.root / d).mkdir(parents=True)
    rc.create("base.qcow2", "1M", cwd="a/b/c")
    rc.io("base.qcow2", "write -P 1 0 1M", cwd="a/b/c")
    rc.create("mid.qcow2", "1M", backing="c/base.qcow2", backing_fmt="qcow2", cwd="a/b")
    rc.io("mid.qcow2", "write -z 0 128k", cwd="a/b")
    rc.create("top.qcow2", "1M", backing="b/mid.qcow2", backing_fmt="qcow2", cwd="a")
    rc.io("top.qcow2", "write -P 3 64k 4k", cwd="a")
    return rc.image("../a/top.qcow2", cwd="run")


@case("chain-old-style-qcow2-base")
def _old_style_qcow2(rc: Recipe) -> Image:
    rc.create("base.qcow2", "1M")
    rc.io("base.qcow2", "write -P 1 0 128k")
    rc.create("top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2")
    rc.io("top.qcow2", "write -P 2 64k 64k")
    rc.tool("strip-backing-format", "top.qcow2")
    img = rc.image("top.qcow2")
    img.premise = _no_backing_format
    img.check_premise()
    return img


@case("chain-old-style-raw-base")
def _old_style_raw(rc: Recipe) -> Image:
    rc.create("base.raw", "1M", fmt="raw")
    rc.io("base.raw", "write -P 1 0 128k", "write -P 3 512k 4k", fmt="raw")
    rc.create("top.qcow2", "1M", backing="base.raw", backing_fmt="raw", compat="0.10")
    rc.io("top.qcow2", "write -P 2 64k 64k")
    rc.tool("strip-backing-format", "top.qcow2")
    img = rc.image("top.qcow2")
    img.premise = _no_backing_format
    img.check_premise()
    return img


@case("chain-v2-over-v3-extl2")
def _chain_v2_over_v3(rc: Recipe) -> Image:
    rc.create("base.qcow2", "1M", extended_l2=True, cluster_size=32768, compression_type="zstd")
    rc.io("base.qcow2", "write -P 1 1k 3k", "write -c -P 2 64k 32k", "write -z 128k 2k")
    rc.create("top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2", compat="0.10", cluster_size=4096)
    rc.io("top.qcow2", "write -P 3 2k 1k", "write -z 96k 8k")
    return rc.image("top.qcow2")


# -- external data file --------------------------------------------------

DATA_FILE_OPS = [
    "write -P 0x11 0 64k",
    "write -P 0x22 192k 64k",
    "write -z 192k 64k",
    "write -z 320k 64k",
    "write -P 0x33 500000 3000",
    "write -z -u 600k 64k",
]


@case("data-file")
def _data_file(rc: Recipe) -> Image:
    rc.create("d.qcow2", "1M", data_file="d.raw")
    rc.io("d.qcow2", *DATA_FILE_OPS)
    return rc.image("d.qcow2")


@case("data-file-raw")
def _data_file_raw(rc: Recipe) -> Image:
    rc.create("r.qcow2", "1M", data_file="r.raw", data_file_raw=True)
    rc.io("r.qcow2", *DATA_FILE_OPS)
    return rc.image("r.qcow2")


@case("data-file-relative-with-backing")
def _data_file_relative(rc: Recipe) -> Image:
    (rc.root / "imgs" / "data").mkdir(parents=True)
    rc.create("base.qcow2", "1M", cwd="imgs")
    rc.io("base.qcow2", "write -P 1 0 1M", cwd="imgs")
    rc.create("d.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2", data_file="data/d.raw", cwd="imgs")
    rc.io("d.qcow2", *DATA_FILE_OPS, cwd="imgs")
    # qemu 7.2 resolves a relative data-file name against the *current directory*
    # (unlike backing names), so the tools run from the image's directory here;
    # running from elsewhere makes qemu fail to open data/d.raw.
    return rc.image("d.qcow2", cwd="imgs")


# -- preallocation and host-file holes --------------------------------------


def _prealloc(mode: str) -> Builder:
    def build(rc: Recipe) -> Image:
        rc.create("p.qcow2", "1M", preallocation=mode)
        rc.io(
            "p.qcow2",
            "write -P 1 64k 64k",
            "write -z 256k 64k",
            "write -z -u 384k 64k",
            "write -P 2 700000 100",
        )
        return rc.image("p.qcow2")

    return build


for _m in ("off", "metadata", "falloc", "full"):
    case(f"prealloc-{_m}")(_prealloc(_m))


@case("prealloc-metadata-untouched")
def _prealloc_untouched(rc: Recipe) -> Image:
    rc.create("p.qcow2", "1M", preallocation="metadata", cluster_size=4096)
    return rc.image("p.qcow2")


def _punch(rc: Recipe, name: str, guest: int, delta: int, length: int) -> None:
    ext = next(
        e for e in rc.qemu_map(name) if e["start"] <= guest < e["start"] + e["length"] and "offset" in e
    )
    host = ext["offset"] + guest - ext["start"] + delta
    rc.run("fallocate", "-p", "-o", str(host), "-l", str(length), name)


@case("hole-punch-prealloc-metadata")
def _hole_prealloc(rc: Recipe) -> Image:
    rc.create("p.qcow2", "1M", preallocation="metadata")
    rc.io("p.qcow2", "write -P 1 0 256k")
    _punch(rc, "p.qcow2", 64 * KiB, 4096, 8192)
    _punch(rc, "p.qcow2", 192 * KiB, 0, 64 * KiB)
    return rc.image("p.qcow2")


@case("hole-punch-plain")
def _hole_plain(rc: Recipe) -> Image:
    rc.create("p.qcow2", "1M")
    rc.io("p.qcow2", "write -P 1 0 256k")
    _punch(rc, "p.qcow2", 64 * KiB, 4096, 8192)
    return rc.image("p.qcow2")


@case("unwritten-extent-prealloc-metadata")
def _unwritten_prealloc(rc: Recipe) -> Image:
    rc.create("p.qcow2", "1M", preallocation="metadata")
    rc.io("p.qcow2", "write -P 1 0 128k")
    # the host range of guest 256k.. is a hole; make part of it an unwritten (fallocated) extent
    ext = next(e for e in rc.qemu_map("p.qcow2") if e["start"] <= 256 * KiB < e["start"] + e["length"])
    host = ext["offset"] + 256 * KiB - ext["start"]
    rc.run("fallocate", "-o", str(host), "-l", str(128 * KiB), "p.qcow2")
    return rc.image("p.qcow2")


@case("hole-punch-prealloc-falloc")
def _hole_falloc(rc: Recipe) -> Image:
    rc.create("p.qcow2", "1M", preallocation="falloc")
    _punch(rc, "p.qcow2", 128 * KiB, 0, 128 * KiB)
    return rc.image("p.qcow2")


# -- snapshots, bitmaps, dirty and corrupt images ----------------------------


@case("internal-snapshots")
def _snapshots(rc: Recipe) -> Image:
    rc.create("sn.qcow2", "1M")
    rc.io("sn.qcow2", "write -P 1 0 128k", "write -z 256k 64k")
    rc.img("snapshot", "-c", "snap1", "sn.qcow2")
    rc.io("sn.qcow2", "write -P 2 0 4k", "write -z -u 64k 64k", "write -P 3 512k 64k")
    rc.img("snapshot", "-c", "snap2", "sn.qcow2")
    rc.io("sn.qcow2", "discard 512k 64k", "write -P 4 600k 8k")
    return rc.image("sn.qcow2")


@case("internal-snapshot-deleted")
def _snapshot_deleted(rc: Recipe) -> Image:
    rc.create("sn.qcow2", "1M", cluster_size=4096)
    rc.io("sn.qcow2", "write -P 1 0 128k")
    rc.img("snapshot", "-c", "s1", "sn.qcow2")
    rc.io("sn.qcow2", "write -P 2 4k 8k")
    rc.img("snapshot", "-d", "s1", "sn.qcow2")
    return rc.image("sn.qcow2")


@case("bitmaps")
def _bitmaps(rc: Recipe) -> Image:
    rc.create("bm.qcow2", "1M")
    rc.img("bitmap", "--add", "-g", "64k", "bm.qcow2", "b0")
    rc.img("bitmap", "--add", "--disable", "bm.qcow2", "second")
    rc.io("bm.qcow2", "write -P 1 0 64k", "write -P 1 512k 64k", "write -z 700k 4k")
    return rc.image("bm.qcow2")


@case("lazy-refcounts-dirty")
def _lazy_dirty(rc: Recipe) -> Image:
    rc.create("lz.qcow2", "1M", lazy_refcounts=True)
    # abort = simulated crash; SIGABRT is the expected way out
    rc.io(
        "lz.qcow2",
        "write -P 0x5a 0 128k",
        "write -z 256k 64k",
        "write -P 0x5b 300000 1000",
        "flush",
        "abort",
        ok_signals=(6,),
    )
    img = rc.image("lz.qcow2")
    img.premise = _has_incompat_bit(0, "dirty")
    img.check_premise()
    return img


@case("corrupt-bit")
def _corrupt(rc: Recipe) -> Image:
    rc.create("cr.qcow2", "1M")
    rc.io("cr.qcow2", "write -P 1 0 64k", "write -z 128k 64k")
    rc.tool("set-incompat", "cr.qcow2", "0x2")
    img = rc.image("cr.qcow2")
    img.premise = _has_incompat_bit(1, "corrupt")
    img.check_premise()
    return img


def _has_incompat_bit(bit: int, what: str) -> Callable[[Image], None]:
    def premise(img: Image) -> None:
        if not read_header(img.abspath)["incompatible_features"] & (1 << bit):
            raise BuildError(f"{img.abspath} is no longer {what} (bit {bit} clear): some tool rewrote it")

    return premise


def _no_backing_format(img: Image) -> None:
    _, exts, _ = header_extensions(img.abspath)
    if any(m == EXT_BACKING_FORMAT for m, _ in exts):
        raise BuildError(f"{img.abspath} has a backing format extension: not an old-style image")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
