"""``qcow2 bitmap`` against ``qemu-img bitmap`` (issue 9 §3).

Two copies of one qemu-built image go through the same bitmap operations,
one by qemu-img bitmap and one by us.  Afterwards qemu-img info lists the
same bitmaps, qemu-nbd -B (the oracle reader) maps the same dirty extents
out of both, qemu-img check finds ours clean with the same allocation as
QEMU's copy (same image end, same allocated clusters), and the guest data
is what it was.  What qemu-img refuses we refuse with its words, and a
refused command leaves our file byte for byte as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from test_bitmaps import bitmaps_of, make_image, sh, start, stop, write_through

WRITES_LATER = ["write -P 8 2M 200k", "write -z 30M 1M", "discard 40M 1M", "write -P 9 63M 1M"]


def ours(*args: str):
    return sh(sys.executable, "-m", "qcow2", "bitmap", *args, check=False)


def qemu(*args: str):
    return sh("qemu-img", "bitmap", *args, check=False)


def qemu_words(stderr: str, image: Path) -> str:
    """qemu-img's message as we say it, on one line: its error lines joined (a hint without
    the "qemu-img: " prefix left out), the node name it prints ('#block123') replaced by the
    file name, which is what we name."""
    lines = [line.removeprefix("qemu-img: ") for line in stderr.splitlines() if line.startswith("qemu-img: ")]
    return re.sub(r"#block\d+", str(image), " ".join(lines))


def dirty_maps(image: Path, names: list[str]) -> dict[str, str]:
    """Each bitmap's extents as qemu-nbd -B serves them (QEMU reads the file: the oracle)."""
    if not names:
        return {}
    uri, pid = start("qemu", image, "-r", *[a for n in names for a in ("-B", n)])
    try:
        return {n: sh("nbdinfo", f"--map=qemu:dirty-bitmap:{n}", uri).stdout for n in names}
    finally:
        stop(pid)


def check_json(image: Path) -> dict:
    r = sh("qemu-img", "check", "--output=json", str(image), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def assert_same(ref: Path, mine: Path, base: Path | None = None) -> None:
    """The oracle's view of both copies agrees, ours is clean, and its guest data is the
    base's (by default the reference copy's: guest writes went to both)."""
    listed = bitmaps_of(ref)
    assert bitmaps_of(mine) == listed
    names = [b["name"] for b in listed if "in-use" not in b["flags"]]
    assert dirty_maps(mine, names) == dirty_maps(ref, names)
    got, want = check_json(mine), check_json(ref)
    assert not any(got.get(k) for k in ("corruptions", "leaks", "check-errors")), got
    for key in ("image-end-offset", "allocated-clusters"):
        assert got.get(key) == want.get(key), (key, got, want)
    compare = sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(base or ref), str(mine),
                 check=False)  # fmt: skip
    assert compare.returncode == 0, compare.stdout
    info = json.loads(sh("qemu-img", "info", "--output=json", str(mine)).stdout)["format-specific"]["data"]
    ref_info = json.loads(sh("qemu-img", "info", "--output=json", str(ref)).stdout)["format-specific"]["data"]
    assert info == ref_info


def copies(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    """Two copies of ``base``, each in a directory of its own with a link to its backing file."""
    made = []
    for who in ("ref", "ours"):
        where = tmp_path / who
        where.mkdir()
        shutil.copy(base, where / base.name)
        if (tmp_path / "backing.qcow2").exists():
            (where / "backing.qcow2").symlink_to(tmp_path / "backing.qcow2")
        made.append(where / base.name)
    return made[0], made[1]


def both(ref: Path, mine: Path, *args: str) -> None:
    """One command on each copy (the last argument the bitmap name); both must succeed."""
    *opts, name = args
    r, o = qemu(*opts, str(ref), name), ours(*opts, str(mine), name)
    assert r.returncode == 0, r.stderr
    assert o.returncode == 0, o.stderr


KINDS = {
    "plain": (),
    "clusters-512": ("-o", "cluster_size=512"),  # no feature table: the extension comes first
    "extended-l2": ("-o", "extended_l2=on"),
    "backing": ("-b", "backing.qcow2", "-F", "qcow2"),  # the header rebuilt around its name
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_life_of_bitmaps_as_qemu_img_lives_it(tmp_path: Path, oracle_tools: None, kind: str) -> None:
    """From no bitmaps extension at all to bitmaps with bits set by QEMU's writes, changed
    every way, merged from another file, and back to no extension."""
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "backing.qcow2"), "64M")
    sh("qemu-io", "-c", "write -P 7 0 64M", str(tmp_path / "backing.qcow2"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", *KINDS[kind], str(base), "64M")
    sh("qemu-io", "-c", "write -P 1 1M 300k", "-c", "write -P 2 20M 2M", str(base))
    other = tmp_path / "other.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(other), "64M")
    sh("qemu-img", "bitmap", "--add", "-g", "4k", str(other), "theirs")
    sh("qemu-io", "-c", "write 5M 10k", "-c", "write 60M 64k", str(other))
    ref, mine = copies(tmp_path, base)

    both(ref, mine, "--add", "b0")  # the header gains the extension
    assert_same(ref, mine, base)
    assert "bitmaps" in sh("qemu-img", "info", str(mine)).stdout
    both(ref, mine, "--add", "-g", "512k", "--disable", "coarse")
    both(ref, mine, "--add", "-g", "512", "fine")
    for image in (ref, mine):  # QEMU's own writes set the bits of the enabled ones
        sh("qemu-io", "-c", "write -P 3 4M 100k", "-c", "write -P 4 33M 1k", str(image))
        write_through("qemu", image, WRITES_LATER)
    both(ref, mine, "--merge", "fine", "coarse")  # finer into coarser
    both(ref, mine, "--merge", "theirs", "-b", str(other), "-F", "qcow2", "b0")
    both(ref, mine, "--clear", "fine")
    both(ref, mine, "--enable", "coarse")
    both(ref, mine, "--disable", "b0")
    assert_same(ref, mine)
    both(ref, mine, "--remove", "coarse")
    both(ref, mine, "--remove", "--add", "-g", "1M", "b0")  # the same name again, in one call
    assert_same(ref, mine)
    for name in ("fine", "b0"):
        both(ref, mine, "--remove", name)
    assert bitmaps_of(mine) == []  # the last one gone: QEMU drops the extension
    assert_same(ref, mine)
    autoclear = json.loads(sh("qemu-img", "info", "--output=json", str(mine)).stdout)
    assert "bitmaps" not in autoclear["format-specific"]["data"]


def test_the_header_is_rebuilt_around_a_data_file_and_a_backing_name(tmp_path: Path, oracle_tools: None):
    """Extensions in QEMU's order (backing format, data file, features, bitmaps), the backing
    name after them, as the first bitmap comes and the last goes."""
    base, data = tmp_path / "base.qcow2", tmp_path / "base.data"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "backing.qcow2"), "64M")
    opts = ("-b", "backing.qcow2", "-F", "qcow2", "-o", f"data_file={data}")  # one data file for all
    sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(base), "64M")
    sh("qemu-io", "-c", "write -P 1 1M 300k", str(base))
    ref, mine = copies(tmp_path, base)
    for step in (("--add", "b0"), ("--add", "-g", "1M", "b1"), ("--remove", "b0"), ("--remove", "b1")):
        both(ref, mine, *step)
        assert mine.read_bytes()[:4096] == ref.read_bytes()[:4096]  # cluster 0 as QEMU writes it
        assert_same(ref, mine, base)


@pytest.mark.parametrize(
    "ops",
    [
        ("--add", "--disable"),
        ("--disable", "--add"),  # disable runs first: not found
        ("--add", "--remove"),
        ("--remove", "--add", "-g", "128k"),
        ("--clear", "--merge", "coarse", "--enable"),
        ("--merge", "fine", "--merge", "off"),
        ("--clear", "--remove", "--merge", "fine"),  # the merge target is gone by then
    ],
    ids=lambda ops: " ".join(ops),
)
def test_several_operations_run_in_qemu_img_order(tmp_path: Path, oracle_tools: None, ops) -> None:
    base = tmp_path / "base.qcow2"
    make_image(base)
    name = "new" if ops[0] in ("--add", "--disable") else "b0"
    ref, mine = copies(tmp_path, base)
    before = mine.read_bytes()
    r, o = qemu(*ops, str(ref), name), ours(*ops, str(mine), name)
    assert o.returncode == r.returncode, (r.stderr, o.stderr)
    if r.returncode:
        assert o.stderr.strip() == f"qcow2: {qemu_words(r.stderr, mine)}"
        assert mine.read_bytes() == before  # refused: untouched (qemu-img keeps what ran before)
    else:
        assert_same(ref, mine, base)


V2 = ("-o", "compat=0.10")
REFUSALS = [  # (qemu-img create options, size, options, bitmap name or None)
    (V2, "64M", ("--add",), "b0"),
    (V2, "64M", ("--remove",), "b0"),
    ((), "64M", ("--add", "-g", "256"), "x"),
    ((), "64M", ("--add", "-g", "1000"), "x"),
    ((), "64M", ("--add", "-g", "4G"), "x"),
    ((), "64M", ("--add", "-g", "64kb"), "x"),
    ((), "4T", ("--add", "-g", "512"), "x"),  # more than 512 MiB of bits
    ((), "64M", ("--add",), ""),
    ((), "64M", ("--add",), "n" * 1024),
    ((), "64M", ("--add",), "b0"),
    ((), "64M", ("--remove",), "nope"),
    ((), "64M", ("--clear",), "nope"),
    ((), "64M", ("--enable",), "nope"),
    ((), "64M", ("--merge", "nope"), "b0"),
    ((), "64M", (), "b0"),
    ((), "64M", ("--add",), None),
    ((), "64M", ("-g", "64k", "--remove"), "b0"),
    ((), "64M", ("-g", "many"), "b0"),  # the option parsed before the other checks
    ((), "64M", ("-F", "qcow2", "--merge", "b0"), "b0"),
    ((), "64M", ("-b", "x.qcow2", "--add"), "b1"),
]


@pytest.mark.parametrize(
    "create,size,opts,name", REFUSALS, ids=[" ".join(c[2]) + f" {c[3]}"[:30] for c in REFUSALS]
)
def test_refusals_say_what_qemu_img_says_and_change_nothing(
    tmp_path: Path, oracle_tools: None, create, size, opts, name
) -> None:
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", *create, str(base), size)
    if create != V2:
        sh("qemu-img", "bitmap", "--add", str(base), "b0")
    ref, mine = copies(tmp_path, base)
    tail = [] if name is None else [name]
    refuse = qemu(*opts, str(ref), *tail)
    before = mine.read_bytes()
    got = ours(*opts, str(mine), *tail)
    assert refuse.returncode == 1 and got.returncode == 1, (refuse.stderr, got.stderr)
    assert got.stderr == f"qcow2: {qemu_words(refuse.stderr, mine)}\n"
    assert mine.read_bytes() == before


def test_granularity_bounds_and_long_names_that_qemu_accepts(tmp_path: Path, oracle_tools: None) -> None:
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(base), "64M")
    ref, mine = copies(tmp_path, base)
    both(ref, mine, "--add", "-g", "2G", "largest")
    both(ref, mine, "--add", "-g", "512", "smallest")
    both(ref, mine, "--add", "-g", "0", "default")  # 0: the default, 4k for 512-byte clusters
    both(ref, mine, "--add", "n" * 1023)
    assert [b["granularity"] for b in bitmaps_of(mine)] == [1 << 31, 512, 4096, 4096]
    assert_same(ref, mine, base)


def test_merge_from_another_file_checks_its_bitmap(tmp_path: Path, oracle_tools: None) -> None:
    base = tmp_path / "base.qcow2"
    make_image(base)
    small, raw = tmp_path / "small.qcow2", tmp_path / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(small), "32M")
    sh("qemu-img", "bitmap", "--add", str(small), "s")
    sh("qemu-img", "create", "-q", "-f", "raw", str(raw), "64M")
    ref, mine = copies(tmp_path, base)
    for source in (("-b", str(small)), ("-b", str(raw), "-F", "raw"), ("-b", str(tmp_path / "none.qcow2"))):
        r = qemu("--merge", "s", *source, str(ref), "b0")
        before = mine.read_bytes()
        o = ours("--merge", "s", *source, str(mine), "b0")
        assert r.returncode == o.returncode == 1
        if "none.qcow2" in source[1]:
            assert "No such file or directory" in o.stderr and o.stderr.count("\n") == 1
        else:
            assert o.stderr == f"qcow2: {qemu_words(r.stderr, mine)}\n"
        assert mine.read_bytes() == before
    o = ours("--merge", "b0", "-b", str(mine), str(mine), "fine")  # itself, locked by itself
    assert o.returncode == 1 and 'shared "write" lock' in o.stderr


def test_inconsistent_bitmaps_can_only_be_removed(tmp_path: Path, oracle_tools: None) -> None:
    """A bitmap left in use by a killed writer: qemu-img refuses to use it and removes it;
    qemu-img check has nothing to say about it, before or after."""
    base = tmp_path / "base.qcow2"
    make_image(base)
    _, pid = start("qemu", base)
    stop(pid, 9)
    sh("qemu-img", "bitmap", "--add", str(base), "later")
    assert "in-use" in bitmaps_of(base)[0]["flags"]
    ref, mine = copies(tmp_path, base)
    before = mine.read_bytes()
    for args in (("--clear",), ("--enable",), ("--disable",), ("--merge", "later"), ("--add",)):
        r, o = qemu(*args, str(ref), "b0"), ours(*args, str(mine), "b0")
        assert r.returncode == o.returncode == 1
        assert o.stderr.startswith(f"qcow2: {qemu_words(r.stderr, mine)}")
        assert o.stderr.count("\n") == 1
    r, o = qemu("--merge", "b0", str(ref), "later"), ours("--merge", "b0", str(mine), "later")
    assert r.returncode == o.returncode == 1 and "Bitmap 'b0' is inconsistent" in o.stderr
    assert mine.read_bytes() == before
    shutil.copy(base, ref)  # qemu-img's refused calls stored its bitmaps again: start over
    both(ref, mine, "--remove", "b0")
    assert_same(ref, mine, base)
    both(ref, mine, "--remove", "coarse")
    both(ref, mine, "--clear", "later")
    assert_same(ref, mine, base)


@pytest.mark.parametrize("server", ["ours", "ours -r", "qemu"])
def test_an_image_a_server_holds_is_refused_as_qemu_img_refuses_it(
    tmp_path: Path, oracle_tools: None, server: str
) -> None:
    image = tmp_path / "a.qcow2"
    make_image(image)
    kind, *opts = server.split()
    _, pid = start(kind, image, *opts)
    try:
        before = image.read_bytes()
        r, o = qemu("--add", str(image), "x"), ours("--add", str(image), "x")
        assert r.returncode == o.returncode == 1
        assert 'Failed to get "write" lock' in r.stderr and 'Failed to get "write" lock' in o.stderr
        assert o.stderr.count("\n") == 1
        assert image.read_bytes() == before
    finally:
        stop(pid)


def test_a_dirty_image_is_repaired_first_as_qemu_img_repairs_it(tmp_path: Path, oracle_tools: None) -> None:
    """Lazy refcounts, a writer killed: the read-write open repairs, then the bitmap goes in."""
    base = tmp_path / "base.qcow2"
    make_image(base, "-o", "lazy_refcounts=on")
    sh("qemu-io", "-c", "write -P 5 8M 1M", "-c", "abort", str(base), check=False)
    assert json.loads(sh("qemu-img", "info", "--output=json", str(base)).stdout)["dirty-flag"]
    ref, mine = copies(tmp_path, base)
    both(ref, mine, "--add", "-g", "128k", "after")
    assert not json.loads(sh("qemu-img", "info", "--output=json", str(mine)).stdout)["dirty-flag"]
    assert_same(ref, mine)
