"""``-l``/``--load-snapshot`` and ``--export ...,snapshot=`` (issue 9 §4-5) against qemu-nbd ``-l``.

The same file is served by qemu-nbd ``-r -l X`` and by us with ``-l X``:
nbdinfo must see the same size and read-only flag, the same ``base:allocation``
and ``qemu:allocation-depth`` maps, and ``qemu-img compare`` the same bytes,
on chains with backing files, zero and compressed clusters, extended L2
entries, v2 images, for every form of ``-l``.  A snapshot taken at another
disk size is served at that size (qemu-nbd 7.2 serves it at the image's
current size, cutting it off or padding it): there the oracle is qemu-nbd
on a copy the snapshot was applied to with ``qemu-img snapshot -a``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_snapshots import serve as serve_pid
from test_snapshots import sh, socket_of, stop

from nbdserver.exportspec import ExportSpec, check_exports, parse_export, parse_load_snapshot
from qcow2 import SnapshotRef

MiB = 1 << 20
OURS = [sys.executable, "-m", "nbdserver"]
QEMU = ["qemu-nbd", "-r", "-A", "-t"]


@contextlib.contextmanager
def served(argv: list[str], image: Path, tag: str) -> Iterator[str]:
    pid = serve_pid(argv, image, tag)
    try:
        yield f"nbd+unix:///?socket={socket_of(image, tag)}"
    finally:
        stop(pid)


def view(uri: str) -> dict:
    """What a client sees of an export, but for the bytes (compared separately)."""
    export = json.loads(sh("nbdinfo", "--json", uri).stdout)["exports"][0]
    return {
        "size": export["export-size"],
        "read-only": export["is_read_only"],
        "map": sh("nbdinfo", "--map", uri).stdout,
        "depth": sh("nbdinfo", "--map=qemu:allocation-depth", uri).stdout,
    }


def same_bytes(a: str, b: str) -> bool:
    return sh("qemu-img", "compare", "-f", "raw", "-F", "raw", a, b, check=False).returncode == 0


def assert_served_alike(
    image: Path, ref_opts: list[str], our_opts: list[str], oracle: Path | None = None
) -> None:
    """qemu-nbd with ``ref_opts`` (on ``oracle``, default the same file) and us with ``our_opts``."""
    with (
        served([*QEMU, *ref_opts], oracle or image, "q") as ref,
        served([*OURS, *our_opts], image, "o") as ours,
    ):
        assert view(ours) == view(ref), (ref_opts, our_opts)
        assert same_bytes(ref, ours), (ref_opts, our_opts)


def chain_image(d: Path) -> Path:
    """base.qcow2 (shorter than the top) <- a.qcow2 with normal, compressed, zero and allocated
    zero clusters and a discard; snapshots s1, s2 and one named "1" (id 3) between writes."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(40 * MiB))
    sh("qemu-io", "-c", "write -P 0xb0 0 24M", "-c", "write -z 30M 2M", str(d / "base.qcow2"))
    image = d / "a.qcow2"
    sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        str(image),
        str(64 * MiB),
    )
    writes = [
        [
            "write -P 1 0 1M",
            "write -c -P 5 4M 256k",
            "write -z 8M 64k",
            "write -P 3 9M 128k",
            "write -z 9M 64k",
        ],
        ["write -P 2 512k 1M", "discard 4M 64k", "write -z -u 20M 1M", "write -P 6 50M 3M"],
        ["write -P 7 0 64k", "write -z 9M 128k", "write -P 8 39M 2M"],
        ["write -P 9 0 8M"],  # the active state differs from every snapshot
    ]
    for group, snapshot in zip(writes, ["s1", "s2", "1", None], strict=True):
        sh("qemu-io", *[a for w in group for a in ("-c", w)], str(image))
        if snapshot is not None:
            sh("qemu-img", "snapshot", "-c", snapshot, str(image))
    return image


def small_image(d: Path, *create: str, raw_backing: bool = False) -> Path:
    image = d / "a.qcow2"
    if raw_backing:
        sh("qemu-img", "create", "-q", "-f", "raw", str(d / "base.raw"), str(16 * MiB))
        sh("qemu-io", "-f", "raw", "-c", "write -P 0xb1 0 12M", str(d / "base.raw"))
        create = (*create, "-b", "base.raw", "-F", "raw")
    sh("qemu-img", "create", "-q", "-f", "qcow2", *create, str(image), str(16 * MiB))
    sh("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 2 2M 128k", "-c", "write -z 4M 1M", str(image))
    sh("qemu-img", "snapshot", "-c", "s1", str(image))
    sh("qemu-io", "-c", "write -P 3 512k 2M", "-c", "discard 2M 64k", str(image))
    return image


def test_every_form_of_l_serves_what_qemu_nbd_serves(tmp_path: Path, oracle_tools: None) -> None:
    image = chain_image(tmp_path)
    forms = ["s1", "s2", "1", "2", "3", "snapshot.name=s2", "snapshot.id=2", "snapshot.id=1,snapshot.name=s1",
             "snapshot.name=1", "snapshot.name=1,snapshot.name=s1"]  # fmt: skip
    for form in forms:
        assert_served_alike(image, ["-l", form], ["-l", form])  # ours without -r: -l implies it
    for form in ("s1", "snapshot.id=2"):
        assert_served_alike(image, ["-l", form], ["-r", "--load-snapshot", form])


@pytest.mark.parametrize(
    "create, raw_backing",
    [(("-o", "extended_l2=on"), True), (("-o", "compat=0.10,cluster_size=4096"), False),
     (("-o", "cluster_size=512"), False), (("-o", "lazy_refcounts=on"), True)],
)  # fmt: skip
def test_snapshot_export_of_other_kinds(tmp_path: Path, oracle_tools: None, create, raw_backing) -> None:
    image = small_image(tmp_path, *create, raw_backing=raw_backing)
    assert_served_alike(image, ["-l", "s1"], ["-l", "s1"])


def test_a_snapshot_of_another_size_is_served_at_its_size(tmp_path: Path, oracle_tools: None) -> None:
    image = small_image(tmp_path)
    sh("qemu-img", "resize", "-q", str(image), str(48 * MiB))
    sh("qemu-io", "-c", "write -P 4 40M 1M", "-c", "write -P 5 0 64k", str(image))
    sh("qemu-img", "snapshot", "-c", "big", str(image))
    sh("qemu-img", "resize", "-q", "--shrink", str(image), str(8 * MiB))
    for name, size in (("s1", 16 * MiB), ("big", 48 * MiB)):
        applied = tmp_path / name / "a.qcow2"
        applied.parent.mkdir()
        shutil.copy(image, applied)
        sh("qemu-img", "snapshot", "-a", name, str(applied))  # QEMU's own view of the snapshot
        assert (
            json.loads(sh("qemu-img", "info", "--output=json", str(applied)).stdout)["virtual-size"] == size
        )
        assert_served_alike(image, [], ["-l", name], oracle=applied)


def test_missing_snapshots_and_bad_values_are_refused_as_qemu_nbd_refuses_them(
    tmp_path: Path, oracle_tools: None
) -> None:
    image = small_image(tmp_path)
    sh("qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    cases = [
        (["-l", "nope"], image, "Failed to load snapshot: Can't find snapshot"),
        (["-l", "snapshot.name=s1,snapshot.id=7"], image, "Failed to load snapshot: Can't find snapshot"),
        (["-l", "snapshot.foo=1"], image, "Invalid parameter 'snapshot.foo'"),
        (
            ["-f", "raw", "-l", "s1"],
            tmp_path / "r.raw",
            "does not support temporarily loading internal snapshots",
        ),
    ]
    for opts, target, words in cases:
        sock = str(tmp_path / "x.sock")
        ref = sh("qemu-nbd", *opts, "-k", sock, str(target), check=False)
        ours = sh(*OURS, *opts, "-k", sock, str(target), check=False)
        assert ref.returncode == 1 and words in ref.stderr, ref.stderr
        assert ours.returncode != 0 and words in ours.stderr and "Traceback" not in ours.stderr, ours.stderr
    for opts, words in (
        (["-s"], "-l cannot be combined with -s"),
        (["-B", "b0"], "-l cannot be combined with -B"),
    ):
        ours = sh(*OURS, "-l", "s1", *opts, "-k", str(tmp_path / "x.sock"), str(image), check=False)
        assert ours.returncode == 2 and words in ours.stderr, ours.stderr


def test_a_snapshot_export_is_read_only_and_keeps_writers_out(tmp_path: Path, oracle_tools: None) -> None:
    image = small_image(tmp_path)
    before = image.read_bytes()
    with served([*OURS, "-l", "s1"], image, "o") as uri:  # no -r: -l implies it
        refused = sh("qemu-io", "-f", "raw", "-c", "write 0 4k", uri, check=False)
        assert "Permission denied" in refused.stderr + refused.stdout
        locked = sh("qemu-img", "snapshot", "-c", "x", str(image), check=False)  # as behind qemu-nbd -l
        assert locked.returncode == 1 and 'Failed to get "write" lock' in locked.stderr
    assert image.read_bytes() == before


def test_export_key_snapshot(tmp_path: Path, oracle_tools: None) -> None:
    """--export ...,snapshot=: the active state and its snapshots side by side, all read-only."""
    image = chain_image(tmp_path)
    sock = tmp_path / "multi.sock"
    argv = [*OURS, "-k", str(sock), "--fork", "--pid-file", str(tmp_path / "multi.pid")]
    argv += ["--export", f"name=now,file={image},readonly=on"]
    argv += ["--export", f"name=first,file={image},snapshot=s1,description=before the upgrade"]
    argv += ["--export", f"name=third,file={image},snapshot=3"]
    sh(*argv)
    uri = lambda name: f"nbd+unix:///{name}?socket={sock}"  # noqa: E731
    try:
        listing = json.loads(sh("nbdinfo", "--list", "--json", uri("")).stdout)["exports"]
        assert {e["export-name"]: (e["is_read_only"], e.get("description")) for e in listing} == {
            "now": (True, None),
            "first": (True, "before the upgrade"),
            "third": (True, None),
        }
        for name, load in (("now", None), ("first", "s1"), ("third", "3")):
            with served([*QEMU, *(["-l", load] if load else [])], image, "q") as ref:
                assert view(uri(name)) == view(ref), name
                assert same_bytes(ref, uri(name)), name
    finally:
        stop(int((tmp_path / "multi.pid").read_text()))
    refused = sh(
        *OURS, "-k", str(sock), "--export", f"name=x,file={image},snapshot=s1,readonly=off", check=False
    )
    assert refused.returncode == 2 and "a snapshot= export is read-only" in refused.stderr


def test_snapshot_values_parse_as_qemu_nbds() -> None:
    assert parse_load_snapshot("s1") == SnapshotRef(id_or_name="s1")
    assert parse_load_snapshot("snapshot.id=2") == SnapshotRef(ident="2")
    assert parse_load_snapshot("snapshot.name=a,,b,snapshot.id=") == SnapshotRef(ident="", name="a,b")
    assert parse_load_snapshot("snapshot.name=x,snapshot.name=y") == SnapshotRef(name="y")  # the last one
    with pytest.raises(ValueError, match="Invalid parameter 'snapshot.foo'"):
        parse_load_snapshot("snapshot.foo=1")
    spec = parse_export("name=x,file=a.qcow2,snapshot=s1")
    assert (spec.read_only, spec.snapshot) == (True, SnapshotRef(id_or_name="s1"))
    for text, why in (
        ("file=a,snapshot=s,readonly=off", "read-only"),
        ("file=a,snapshot=s,bitmap=b", "bitmap="),
    ):
        with pytest.raises(ValueError, match=why):
            parse_export(text)


def test_one_file_in_several_exports_only_when_all_are_read_only(tmp_path: Path) -> None:
    f = str(tmp_path / "a.qcow2")
    (tmp_path / "a.qcow2").write_bytes(b"")
    check_exports([ExportSpec("a", f, True), ExportSpec("b", f, True, snapshot=SnapshotRef(id_or_name="1"))])
    for specs in (
        [ExportSpec("a", f, False), ExportSpec("b", f, True)],
        [ExportSpec("a", f, True), ExportSpec("b", f)],
    ):
        with pytest.raises(ValueError, match="one image file, one export"):
            check_exports(specs)
