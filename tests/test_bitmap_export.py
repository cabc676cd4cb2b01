"""``-B NAME``: persistent dirty bitmaps as ``qemu:dirty-bitmap:NAME`` (issue 9 §2).

The same image is served by qemu-nbd and by us with the same ``-B``; the
same clients (nbdinfo --map, libnbd block status at odd offsets, with and
without REQ_ONE, LIST_META_CONTEXT queries) must get the same answers,
before and after writes through each server.  Refusals say what qemu-nbd
says.  The run search itself is checked against the bits one granule at a
time.
"""

from __future__ import annotations

import random
import shutil
import struct
import sys
from pathlib import Path

import nbd
import pytest
from test_bitmaps import WRITES, make_image, sh, start, stop

from nbdserver.constants import Opt, Rep
from nbdserver.export import Export
from nbdserver.handshake import Handshake
from qcow2.contract import Bitmap, Disk
from qcow2.dirtymap import WINDOW_GRANULES, dirty_runs

NAMES = ("b0", "coarse", "fine", "off")
MiB = 1 << 20
# (offset, length, flags): whole disk, unaligned starts and ends inside dirty and clean
# granules, REQ_ONE, a tail past a short backing file's end.
PROBES = [
    (0, 64 * MiB, 0),
    (0, 64 * MiB, nbd.CMD_FLAG_REQ_ONE),
    (32 * MiB + 1000, 70_000, 0),
    (32 * MiB + 1000, 70_000, nbd.CMD_FLAG_REQ_ONE),
    (4 * MiB - 512, 1536, 0),
    (9000 * 1024 + 7, 5 * MiB, 0),
    (63 * MiB + 4096, MiB - 4096, 0),
    (21 * MiB - 3, 3 * MiB, nbd.CMD_FLAG_REQ_ONE),
]


def bitmap_opts(names=NAMES) -> list[str]:
    return [a for n in names for a in ("-B", n)]


def answers(uri: str, names=NAMES, probes=PROBES) -> dict:
    """What a libnbd client sees: per probe and bitmap context, the extents of the reply."""
    h = nbd.NBD()
    h.add_meta_context("base:allocation")  # one reply, allocation and bitmaps side by side
    for n in names:
        h.add_meta_context(f"qemu:dirty-bitmap:{n}")
    h.connect_uri(uri)
    try:
        out = {}
        for offset, length, flags in probes:
            seen: dict[str, list[int]] = {}

            def collect(context, _offset, entries, _err, seen=seen):
                seen[context] = list(entries)
                return 0

            h.block_status(length, offset, collect, flags)
            out[(offset, length, flags)] = seen
        return out
    finally:
        h.shutdown()


def maps(uri: str, names=NAMES) -> dict[str, str]:
    return {n: sh("nbdinfo", f"--map=qemu:dirty-bitmap:{n}", uri).stdout for n in names}


def served(kind: str, image: Path, *opts: str, names=NAMES) -> tuple[dict, dict]:
    uri, pid = start(kind, image, *opts, *bitmap_opts(names))
    try:
        return maps(uri, names), answers(uri, names)
    finally:
        stop(pid)


def unaligned_writes(image: Path) -> None:
    """Bits at odd places, set by QEMU itself before anyone serves the image."""
    sh(
        "qemu-io",
        "-c",
        "write -P 6 4M 1000",
        "-c",
        "write -P 7 9000k 3k",
        "-c",
        "write -z 21M 1536k",
        str(image),
    )


@pytest.mark.parametrize("kind", ["plain", "small-clusters"])
def test_bitmaps_read_as_qemu_nbd_serves_them(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    image = tmp_path / "a.qcow2"
    make_image(image, *(("-o", "cluster_size=4096") if kind == "small-clusters" else ()))
    unaligned_writes(image)
    before = image.read_bytes()
    ref = served("qemu", image, "-r")
    ours = served("ours", image, "-r")
    assert ours == ref
    assert "dirty" in ours[0]["fine"] and "dirty" not in ours[0]["off"]
    assert image.read_bytes() == before  # a read-only export changes nothing, bitmaps included


def test_writes_through_the_server_show_in_the_exported_bitmap(tmp_path: Path, oracle_tools: None) -> None:
    """Read-write, bitmaps exported: a second client sees each server's writes in the bitmaps
    at once (enabled ones only), and the same as qemu-nbd's; the stored file checks clean."""
    base = tmp_path / "base.qcow2"
    make_image(base)
    results = {}
    for kind in ("qemu", "ours"):
        image = tmp_path / f"{kind}.qcow2"
        shutil.copy(base, image)
        uri, pid = start(kind, image, *bitmap_opts())
        try:
            before = maps(uri)
            sh("qemu-io", "-f", "raw", *[a for w in WRITES for a in ("-c", w)], uri)
            results[kind] = (before, maps(uri), answers(uri))
        finally:
            stop(pid)
    assert results["ours"] == results["qemu"]
    before, after, _ = results["ours"]
    assert after["b0"] != before["b0"] and after["off"] == before["off"]
    check = sh("qemu-img", "check", str(tmp_path / "ours.qcow2"), check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_bitmap_of_the_backing_file_is_found_and_clean_past_its_end(
    tmp_path: Path, oracle_tools: None
) -> None:
    """qemu-nbd searches the chain from the top; the backing file here is shorter than the
    overlay, and the overlay has a bitmap of the same name as a deeper one."""
    backing = tmp_path / "backing.qcow2"
    make_image(backing, size="48M")
    unaligned_writes(backing)
    overlay = tmp_path / "overlay.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(overlay), "64M")
    sh("qemu-img", "bitmap", "--add", str(overlay), "coarse")
    sh("qemu-io", "-c", "write -P 9 60M 64k", "-c", "write -P 9 1M 4k", str(overlay))
    ref = served("qemu", overlay, "-r")
    ours = served("ours", overlay, "-r")
    assert ours == ref
    assert ours[0]["coarse"] != ours[0]["b0"]  # the overlay's own "coarse", not the backing's


def test_list_meta_context_names_the_bitmaps_as_qemu_nbd_does(tmp_path: Path, oracle_tools: None) -> None:
    image = tmp_path / "a.qcow2"
    make_image(image)
    queries = [[], ["qemu:"], ["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:fine"], ["qemu:dirty-bitmap:nope"]]

    def listed(uri: str) -> list[list[str]]:
        out = []
        for q in queries:
            h = nbd.NBD()
            h.set_opt_mode(True)
            for name in q:
                h.add_meta_context(name)
            h.connect_uri(uri)
            found: list[str] = []
            h.opt_list_meta_context(lambda name, found=found: found.append(name) or 0)
            h.opt_abort()
            out.append(found)
        return out

    got = {}
    for kind, extra in (("qemu", ("-A",)), ("ours", ())):  # we always offer allocation-depth
        uri, pid = start(kind, image, "-r", "-B", "fine", "-B", "b0", *extra)
        try:
            got[kind] = listed(uri)
        finally:
            stop(pid)
    assert got["ours"] == got["qemu"]
    assert sorted(got["ours"][2]) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine"]


@pytest.mark.parametrize("problem", ["missing", "inconsistent"])
def test_a_bitmap_that_cannot_be_exported_is_refused_as_qemu_nbd_refuses_it(
    tmp_path: Path, oracle_tools: None, problem: str
) -> None:
    image = tmp_path / "a.qcow2"
    make_image(image)
    if problem == "inconsistent":  # a writer killed while the image was open
        uri, pid = start("qemu", image)
        stop(pid, 9)
    name = "nope" if problem == "missing" else "b0"
    before = image.read_bytes()
    sock = tmp_path / "s.sock"
    qemu = sh("qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), "-B", name, str(image), check=False)
    ours = sh(sys.executable, "-m", "nbdserver", "-r", "-k", str(sock), "-B", name, str(image), check=False)
    assert qemu.returncode != 0 and ours.returncode != 0
    words = qemu.stderr.strip().removeprefix("qemu-nbd: ")
    assert words in ours.stderr, ours.stderr
    assert image.read_bytes() == before


# --- without sockets: the run search and the handshake -------------------------------


def naive_runs(bits: bytes, g: int, covered: int, offset: int, end: int) -> list[tuple[int, int]]:
    """(length, dirty) per byte range, one granule at a time: the definition."""
    runs: list[list[int]] = []
    pos = offset
    while pos < end:
        granule = pos >> g
        stop = min(end, (granule + 1) << g)
        dirty = int(pos < covered and bool(bits[granule >> 3] >> (granule & 7) & 1))
        if pos < covered:
            stop = min(stop, covered)
        if runs and runs[-1][1] == dirty:
            runs[-1][0] += stop - pos
        else:
            runs.append([stop - pos, dirty])
        pos = stop
    return [tuple(r) for r in runs]


def test_dirty_runs_follow_the_bits_one_granule_at_a_time() -> None:
    rng = random.Random(9)
    for _ in range(300):
        g = rng.choice([9, 12, 16])
        granules = rng.randrange(1, 400)
        covered = (granules << g) - rng.choice([0, 0, 1, (1 << g) - 1])
        bits = bytearray(-(-granules // 64) * 8)
        for _ in range(rng.randrange(0, 6)):
            a = rng.randrange(granules)
            for i in range(a, min(granules, a + rng.randrange(1, 40))):
                bits[i >> 3] |= 1 << (i & 7)
        offset = rng.randrange(covered + 3 * (1 << g))
        end = offset + rng.randrange(1, (granules + 4) << g)
        got: list[tuple[int, int]] = []
        pos = offset
        while pos < end:  # as the server asks: again from where the last map ended
            m = dirty_runs(bits, g, covered, pos, end - pos)
            assert pos < m.end <= end
            for n, d in zip((m.bounds[1:] - m.bounds[:-1]).tolist(), m.dirty.tolist(), strict=True):
                if got and got[-1][1] == d:
                    got[-1] = (got[-1][0] + n, d)
                else:
                    got.append((n, d))
            pos = m.end
        assert got == naive_runs(bits, g, covered, offset, end)


def test_dirty_runs_look_at_a_bounded_window() -> None:
    g = 9
    bits = bytes([0b10]) + bytes(WINDOW_GRANULES // 4)
    covered = (len(bits) * 8) << g
    m = dirty_runs(bits, g, covered, 0, covered)
    assert m.end == WINDOW_GRANULES << g
    assert m.dirty.tolist() == [0, 1, 0]


class _FakeBitmap(Bitmap):
    def __init__(self, name: str) -> None:
        self.name = name


def _handshake(names: list[str]) -> Handshake:
    export = Export("", Disk(), bitmaps=[_FakeBitmap(n) for n in names])
    h = Handshake({"": export})
    h.feed(struct.pack(">I", 3))
    return h


def _meta(h: Handshake, code: int, queries: list[str]) -> list[str]:
    data = struct.pack(">II", 0, len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q.encode() for q in queries
    )
    h.feed(struct.pack(">QII", 0x49484156454F5054, code, len(data)))
    step = h.feed(data)
    names = []
    for r in step.replies:
        rep, length = struct.unpack(">II", r[12:20])
        if rep == Rep.META_CONTEXT:
            names.append(r[24 : 20 + length].decode())
    return names


def test_dirty_bitmap_wildcards_list_but_do_not_select() -> None:
    h = _handshake(["x", "y"])
    assert _meta(h, Opt.LIST_META_CONTEXT, ["qemu:dirty-bitmap:"]) == [
        "qemu:dirty-bitmap:x",
        "qemu:dirty-bitmap:y",
    ]
    assert _meta(h, Opt.LIST_META_CONTEXT, ["qemu:dirty-bitmap"]) == []
    h.feed(struct.pack(">QII", 0x49484156454F5054, Opt.STRUCTURED_REPLY, 0))
    assert _meta(h, Opt.SET_META_CONTEXT, ["qemu:dirty-bitmap:", "qemu:"]) == []
    assert _meta(h, Opt.SET_META_CONTEXT, ["qemu:dirty-bitmap:y", "base:allocation"]) == [
        "base:allocation",
        "qemu:dirty-bitmap:y",
    ]


def test_export_option_takes_bitmaps(tmp_path: Path, oracle_tools: None) -> None:
    """``--export ...,bitmap=B,bitmap=C`` offers the same contexts as ``-B``, in the order given."""
    from nbdserver.exportspec import parse_export

    assert parse_export("file=a,bitmap=x,bitmap=y,bitmap=x").bitmaps == ("x", "y")
    image = tmp_path / "a.qcow2"
    make_image(image)
    unaligned_writes(image)
    ref = served("qemu", image, "-r", names=("fine", "b0"))
    sock = tmp_path / "e.sock"
    spec = f"name=disk,file={image},readonly=on,bitmap=fine,bitmap=b0"
    started = sh(
        sys.executable,
        "-m",
        "nbdserver",
        "-k",
        str(sock),
        "--fork",
        "--pid-file",
        str(tmp_path / "e.pid"),
        "--export",
        spec,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    pid = int((tmp_path / "e.pid").read_text())
    try:
        uri = f"nbd+unix:///disk?socket={sock}"
        assert (maps(uri, ("fine", "b0")), answers(uri, ("fine", "b0"))) == ref
    finally:
        stop(pid)
