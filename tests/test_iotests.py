"""What QEMU's iotests 154 and 244 examine, checked on our export.

Each case builds an image with qemu-img/qemu-io, copies it, and applies the
same qemu-io commands twice: locally by qemu-io on the first copy (QEMU's own
qcow2 driver), and by qemu-io through our NBD export on the second.  Then the
two must agree on the guest bytes, on ``qemu-img map --output=json`` (depth,
present, zero, data, and whether a range is mapped to the host at all: the
same allocation), and our copy must pass ``qemu-img check``.

* zero writes (iotest 154's subject): partial-cluster requests over ranges
  that already read as zero (unallocated, zero clusters, zeros or nothing in
  the backing file) need no allocation, those over data do; the tail cluster
  of an image whose size is not a multiple of the cluster size; ``write -z``
  (NBD_CMD_FLAG_NO_HOLE) and ``write -z -u`` (may unmap); and FAST_ZERO,
  sent by libnbd to our export and to ``qemu-nbd`` on a copy: the same
  requests must fail with ENOTSUP (zeroing would need a data write) and the
  others leave the same image behind.
* external data files (iotest 244's subject): writes, zero writes and
  discards on ``data_file=`` images, with ``data_file_raw=on`` (the data file
  must then be the guest disk, byte for byte) and over a backing file.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from images import Image, KiB, MiB, Recipe
from servers import (
    allocation_map,
    check_problems,
    guest_bytes,
    our_nbd,
    qemu_nbd,
    run,
)

Build = Callable[[Recipe], Image]


def _fail(what: str, image: Image, ops: list[str] | tuple[str, ...], server=None, detail: str = "") -> None:
    parts = [what]
    if detail:
        parts.append(detail)
    parts.append("--- operations (qemu-io -c ..., the same locally and through the export):")
    parts += [f"    {op}" for op in ops]
    if server is not None and server.stderr().strip():
        parts.append(f"--- our server's stderr:\n{server.stderr()[-4000:]}")
    parts.append("--- commands that built the image (both copies):\n" + image.recipe.script())
    pytest.fail("\n".join(parts), pytrace=False)


def _qemu_io(fmt: str, target: str, ops: list[str] | tuple[str, ...]) -> list[str]:
    argv = ["qemu-io", "-f", fmt]
    for op in ops:
        argv += ["-c", op]
    return [*argv, target]


def _io_failed(r) -> bool:
    return r.rc != 0 or "failed" in r.out or "failed" in r.err


def same_as_qemu(build: Build, ops: list[str] | tuple[str, ...], tmp_path: Path) -> tuple[Image, Image]:
    """Build twice, apply ``ops`` locally and through our export; compare.  Returns (local, ours).

    Built twice rather than copied: a copy would not keep the host files' extents
    (written zeros, unwritten extents, holes) as they were, and map depends on them."""
    local = build(Recipe(tmp_path / "local"))
    ours = build(Recipe(tmp_path / "ours"))
    r = run(_qemu_io(local.fmt, local.path, ops), local.cwd)
    if _io_failed(r):
        _fail(f"ORACLE FAILED: local qemu-io rc={r.rc}\n{r.out}{r.err}", local, ops)
    with our_nbd(ours, tmp_path / "srv", writable=True) as srv:
        r = run(_qemu_io("raw", srv.uri, ops), tmp_path)
        if _io_failed(r):
            _fail(f"qemu-io through our export failed: rc={r.rc}\n{r.out}{r.err}", ours, ops, srv)
    if srv.exit_problem:
        _fail(f"our server: {srv.exit_problem}", ours, ops, srv)
    compare_images(local, ours, ops, tmp_path, srv)
    return local, ours


def compare_images(local: Image, ours: Image, ops, tmp_path: Path, srv=None) -> None:
    a, b = guest_bytes(local, tmp_path / "local.raw"), guest_bytes(ours, tmp_path / "ours.raw")
    if a != b:
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        _fail(
            "guest views differ",
            ours,
            ops,
            srv,
            f"first difference at offset {i}: qemu {a[i : i + 16].hex()} ours {b[i : i + 16].hex()}; "
            f"sizes {len(a)} vs {len(b)}",
        )
    (ma, ra), (mb, rb) = allocation_map(local), allocation_map(ours)
    if ma != mb:
        diff = "\n".join(
            difflib.unified_diff(ra.out.splitlines(), rb.out.splitlines(), "qemu", "ours", lineterm="")
        )
        _fail(
            "qemu-img map --output=json differs (start/length/depth/present/zero/data/offset?)",
            ours,
            ops,
            srv,
            diff,
        )
    problem = check_problems(ours)
    if problem:
        _fail("our copy is not clean", ours, ops, srv, problem)


# --- iotest 154: zero writes ------------------------------------------------------------------

C = 8 * KiB  # top image cluster size in the zero-write cases
SIZE = 1 * MiB + 3 * KiB  # the last cluster is 3 KiB long (six sectors)
TAIL = 1 * MiB
WHERE = {  # zero writes inside the tail cluster (offset, length)
    "head": (TAIL, 512),
    "back": (TAIL + 2560, 512),
    "middle": (TAIL + 1024, 1024),
    "whole": (TAIL, 3 * KiB),
}


def _tail_build(backing: str) -> Build:
    def build(rc: Recipe) -> Image:
        top = {"cluster_size": C}
        if backing != "none":
            # the backing file is shorter: it ends 1 KiB into the top's tail cluster
            rc.create("base.qcow2", TAIL + KiB, cluster_size=2 * KiB)
            rc.io("base.qcow2", "write -P 0x61 0 64k")
            if backing == "zero":
                rc.io("base.qcow2", f"write -P 0x62 {TAIL} 1k", f"write -z {TAIL} 1k")
            elif backing == "data":
                rc.io("base.qcow2", f"write -P 0x63 {TAIL + 512} 512")
            rc.create("top.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2", **top)
        else:
            rc.create("top.qcow2", SIZE, **top)
        return rc.image("top.qcow2")

    return build


TAIL_CASES = [
    (backing, where, unmap)
    for backing in ("none", "unallocated", "zero", "data")
    for where in WHERE
    for unmap in (False, True)
    if not (unmap and where in ("head", "middle"))
]


@pytest.mark.parametrize(
    ("backing", "where", "unmap"),
    TAIL_CASES,
    ids=[f"{b}-{w}-{'unmap' if u else 'nohole'}" for b, w, u in TAIL_CASES],
)
def test_zero_write_in_unaligned_tail_cluster(backing, where, unmap, tmp_path: Path, oracle_tools: None):
    off, length = WHERE[where]
    same_as_qemu(_tail_build(backing), [f"write -z {'-u ' if unmap else ''}{off} {length}"], tmp_path)


def _regions_build(backing: bool, **top: object) -> Build:
    """Clusters in different states, one small story per cluster index (C = 8 KiB).

    ``top``: more ``-o`` options for the top image (its cluster size stays C unless given)."""
    top = {"cluster_size": C, **top}

    def build(rc: Recipe) -> Image:
        if backing:
            rc.create("base.qcow2", SIZE, cluster_size=512)
            rc.io(
                "base.qcow2",
                f"write -P 0x11 {5 * C} 1k",  # data at the start of cluster 5
                f"write -P 0x12 {6 * C + 6 * KiB} 1k",  # data after the request in cluster 6
                f"write -P 0x13 {7 * C} {C}",  # cluster 7: data, then zero clusters over it
                f"write -z {7 * C} {C}",
                f"write -P 0x14 {10 * C} {C}",  # cluster 10: data under a top zero cluster
                f"write -P 0x15 {12 * C + 2 * KiB} 2k",  # middle of a multi-cluster request
                f"write -P 0x16 {15 * C + 3 * KiB} 1k",  # inside the request, in cluster 15
                f"write -z {20 * C} {2 * C}",  # zeros written into the backing file
            )
            rc.create("top.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2", **top)
        else:
            rc.create("top.qcow2", SIZE, **top)
        rc.io(
            "top.qcow2",
            f"write -P 0x21 {8 * C} {C}",  # cluster 8: data in the top
            f"write -z {9 * C} {C}",  # cluster 9: a zero cluster
            f"write -z {10 * C} {C}",
            f"write -P 0x22 {16 * C} {C}",  # cluster 16: data, zeroed whole below
            f"write -P 0x23 {17 * C} {C}",  # 17: data, then discarded
            f"discard {17 * C} {C}",
            f"write -P 0x24 {18 * C + 4 * KiB} 4k",  # 18: data in its second half only
        )
        return rc.image("top.qcow2")

    return build


def _region_ops(flag: str) -> list[str]:
    z = f"write -z {flag}".rstrip()
    k = KiB
    return [
        f"{z} 0 2k",  # 0: head of an unallocated cluster
        f"{z} {C + 6 * k} 2k",  # 1: its tail
        f"{z} {2 * C + 2 * k} 3k",  # 2: middle
        f"{z} {3 * C + 6 * k} 4k",  # 3|4: across a cluster boundary
        f"{z} {5 * C + 2 * k} 1k",  # 5: backing data at the cluster start
        f"{z} {6 * C + 2 * k} 1k",  # 6: backing data after the request
        f"{z} {7 * C + 1 * k} 2k",  # 7: backing zero clusters
        f"{z} {8 * C + 1 * k} 1k",  # 8: over top data
        f"{z} {9 * C + 512} 1k",  # 9: inside a zero cluster
        f"{z} {10 * C + 3 * k} 2k",  # 10: inside a zero cluster hiding backing data
        f"{z} {11 * C + 6 * k} {2 * C + 1 * k}",  # 11..13: backing data in the middle cluster
        f"{z} {15 * C + 2 * k} 3k",  # 15: backing data inside the request
        f"{z} {16 * C} {C}",  # 16: a whole data cluster
        f"{z} {17 * C + 1 * k} 1k",  # 17: a discarded cluster
        f"{z} {18 * C + 1 * k} 1k",  # 18: data elsewhere in the cluster
        f"{z} {20 * C + 1 * k} {C}",  # 20|21: zeros written in the backing file
        f"{z} {TAIL + 1 * k} 1k",  # the short tail cluster
    ]


@pytest.mark.parametrize("backing", [False, True], ids=["nobacking", "backing"])
@pytest.mark.parametrize("flag", ["", "-u"], ids=["nohole", "unmap"])
def test_partial_cluster_zero_writes(backing, flag, tmp_path: Path, oracle_tools: None):
    same_as_qemu(_regions_build(backing), _region_ops(flag), tmp_path)


@pytest.mark.parametrize("backing", [False, True], ids=["nobacking", "backing"])
def test_zero_writes_then_data_over_them(backing, tmp_path: Path, oracle_tools: None):
    """Both flags mixed, and data written over the zeroed ranges afterwards (the zero
    flags/allocations left by the first round must be taken over correctly)."""
    ops = _region_ops("") + _region_ops("-u")[::2]
    ops += [f"write -P 0x7{i % 10} {i * C + 1536} 1k" for i in range(0, 22, 3)]
    same_as_qemu(_regions_build(backing), ops, tmp_path)


# FAST_ZERO: only libnbd sends it; qemu-nbd on a copy is the reference.

FAST = nbd.CMD_FLAG_FAST_ZERO
NO_HOLE = nbd.CMD_FLAG_NO_HOLE


def _fast_zero_requests() -> list[tuple[int, int, int]]:
    k = KiB
    reqs = []
    for extra in (0, NO_HOLE):
        reqs += [
            (0 + (extra and 2 * k), 2 * k, extra),  # head / middle of an unallocated cluster
            (5 * C + 2 * k, 1 * k, extra),  # backing data in the cluster
            (7 * C + 1 * k, 2 * k, extra),  # backing zeros
            (8 * C + 1 * k + (extra and 2 * k), 1 * k, extra),  # over top data: needs a write
            (9 * C + 512 + (extra and 2 * k), 1 * k, extra),  # inside a zero cluster
            (18 * C + (extra and 512), 1 * k, extra),  # zeros, data elsewhere in the cluster
            (TAIL + (extra and 1 * k), 1 * k, extra),  # the short tail cluster
        ]
    reqs += [
        (16 * C, C, 0),  # a whole data cluster: a zero flag, no data write
        (11 * C + 6 * k, 2 * C + 1 * k, 0),  # backing data in the middle cluster
        (19 * C, 3 * C, NO_HOLE),  # whole clusters, keep the allocation
        (8 * C + 5 * k, 512, 0),  # over data, one sector (less than a 1 KiB subcluster)
        (8 * C + 6 * k + 100, 300, 0),  # over data, not even sector-aligned
    ]
    return reqs


def _send_fast_zeroes(uri: str, reqs) -> list[str]:
    h = nbd.NBD()
    h.connect_uri(uri)
    out = []
    try:
        for off, length, flags in reqs:
            try:
                h.zero(length, off, flags=FAST | flags)
                out.append(f"zero {off}+{length} flags={flags | FAST:#x}: ok")
            except nbd.Error as e:
                name = errno.errorcode.get(e.errnum or 0, str(e.errnum))
                out.append(f"zero {off}+{length} flags={flags | FAST:#x}: {name}")
    finally:
        h.shutdown()
    return out


FAST_ZERO_IMAGES = {
    "nobacking": _regions_build(False),
    "backing": _regions_build(True),
    "extl2-16k-backing": _regions_build(True, extended_l2=True, cluster_size=16 * KiB),
    "extl2-32k": _regions_build(False, extended_l2=True, cluster_size=32 * KiB),
    "data-file": _regions_build(False, data_file="top.data"),
    "data-file-raw": _regions_build(False, data_file="top.data", data_file_raw=True),
    "lazy-refcounts-backing": _regions_build(True, lazy_refcounts=True),
}


@pytest.mark.parametrize("kind", list(FAST_ZERO_IMAGES))
def test_fast_zero_like_qemu_nbd(kind, tmp_path: Path, oracle_tools: None):
    reference = FAST_ZERO_IMAGES[kind](Recipe(tmp_path / "ref"))
    ours = FAST_ZERO_IMAGES[kind](Recipe(tmp_path / "ours"))
    reqs = _fast_zero_requests()
    with qemu_nbd(reference, tmp_path / "qsrv", writable=True) as q:
        want = _send_fast_zeroes(q.uri, reqs)
    with our_nbd(ours, tmp_path / "osrv", writable=True) as o:
        got = _send_fast_zeroes(o.uri, reqs)
    ops = [f"(libnbd) {line.rsplit(':', 1)[0]}" for line in want]
    if "ENOTSUP" not in "".join(want) or ": ok" not in "".join(want):
        _fail(
            "premise: qemu-nbd should both refuse and accept some fast zeroes",
            reference,
            ops,
            None,
            "\n".join(want),
        )
    if got != want:
        diff = "\n".join(difflib.unified_diff(want, got, "qemu-nbd", "ours", lineterm=""))
        _fail("FAST_ZERO answers differ from qemu-nbd's", ours, ops, o, diff)
    compare_images(reference, ours, ops, tmp_path, o)


# --- iotest 244: external data files ---------------------------------------------------------------

DATA_OPS = (
    "write -P 0x11 1M 3M",
    "discard 2M 1M",
    "write -z 2560k 1M",  # over discarded and written space
    "write -z -u 3584k 1M",  # over written and unallocated space
    "write -z 5M 512k",  # over unallocated space
    "write -P 0x22 300k 5000",  # unaligned, allocating
    "write -z 1100k 3k",  # partial cluster over data
    "write -P 0x33 6M 64k",
    "write -z -u 6M 64k",
    "discard 1M 64k",
    "write -P 0x44 1M 4k",  # into a discarded cluster again
)


def _data_file_build(raw: bool, backing: bool = False) -> Build:
    def build(rc: Recipe) -> Image:
        opts: dict[str, object] = {"data_file": "top.data"}  # relative: QEMU resolves it from the cwd
        if raw:
            opts["data_file_raw"] = True
        if backing:
            rc.create("base.qcow2", "8M")
            rc.io("base.qcow2", "write -P 0x55 0 8M", "write -z 5M 256k")
            rc.create("top.qcow2", "8M", backing="base.qcow2", backing_fmt="qcow2", **opts)
        else:
            rc.create("top.qcow2", "8M", **opts)
        rc.io("top.qcow2", "write -P 0x66 7M 128k")
        return rc.image("top.qcow2")

    return build


@pytest.mark.parametrize(
    ("raw", "backing"),
    [(False, False), (True, False), (False, True)],
    ids=["data-file", "data-file-raw", "data-file-backing"],
)
def test_external_data_file_writes(raw, backing, tmp_path: Path, oracle_tools: None):
    local, ours = same_as_qemu(_data_file_build(raw, backing), DATA_OPS, tmp_path)
    # the data file itself, stale bytes under zero clusters included, as qemu-io left it
    theirs, mine = (local.cwd / "top.data").read_bytes(), (ours.cwd / "top.data").read_bytes()
    if theirs != mine:
        i = next((k for k in range(min(len(theirs), len(mine))) if theirs[k] != mine[k]), None)
        _fail(
            "the data files differ", ours, DATA_OPS, None, f"sizes {len(theirs)} vs {len(mine)}; first at {i}"
        )
    if raw:  # the data file is the disk
        want = guest_bytes(ours, tmp_path / "ours-guest.raw")
        data = (ours.cwd / "top.data").read_bytes()
        if data != want:
            i = next((k for k in range(min(len(data), len(want))) if data[k] != want[k]), None)
            _fail(
                "data_file_raw: the data file is not the guest disk",
                ours,
                DATA_OPS,
                None,
                f"sizes {len(data)} vs {len(want)}; first difference at {i}",
            )
