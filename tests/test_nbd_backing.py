"""Backing files over NBD (issue 9 §7): a local overlay over a golden image served elsewhere.

The golden image (qcow2 with data, zero clusters, a compressed cluster and
holes) is served read-only by qemu-nbd or by our own server; an overlay made
by qemu-img names it as ``nbd+unix:///?socket=S`` (or ``nbd://HOST:PORT/X``,
the legacy and json: forms), qemu-io writes into it.  Then, the golden server
still running, the overlay is exported by our server and by ``qemu-nbd -A``:
both contexts of ``nbdinfo --map``, ``qemu-img map`` over NBD and the guest
bytes (nbdcopy, single reads) must be equal, and ``qcow2 map`` must print what
``qemu-img map`` prints.  Writes through our read-write export must leave what
the same qemu-io writes leave on a copy.  An unreachable remote is refused
with QEMU's message, and ``--confine`` refuses any NBD backing file.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from images import Image, MiB, Recipe
from servers import (
    PYTHON,
    Comparison,
    allocation_map,
    assert_same,
    check_problems,
    compare_image,
    compare_map,
    free_port,
    guest_bytes,
    our_nbd,
    qemu_nbd,
    run,
)

import qcow2
from qcow2 import remote
from qcow2.contract import WouldBlock, without_waiting
from qcow2.errors import ImageError

SIZE = 8 * MiB
GOLDEN_WRITES = (
    "write -P 0x11 0 1M",
    "write -z 1M 512k",  # zero clusters
    "write -P 0x22 1664k 64k",
    "write -z -u 2M 256k",
    "write -c -P 0x33 4M 64k",  # compressed
    "write -P 0x44 5M 300k",  # ends inside a cluster; the rest of the disk: holes
)
OVERLAY_WRITES = (
    "write -P 0xa1 512k 64k",
    "write -P 0xa2 1100k 4k",  # inside a cluster over the golden zeros: copy-on-write over NBD
    "write -z 5M 64k",
    "write -P 0xa3 7M 64k",
    "discard 4M 64k",
)
CLIENT_WRITES = (  # through our read-write export, and by qemu-io on a copy
    "write -P 0xb1 100k 8k",
    "write -P 0xb2 1050k 3k",
    "write -z 3M 128k",
    "write -z -u 5200k 64k",
    "discard 1664k 64k",
    "write -P 0xb3 6M 1M",
    "flush",
)


def build_golden(rc: Recipe) -> Image:
    rc.create("golden.qcow2", SIZE)
    rc.io("golden.qcow2", *GOLDEN_WRITES)
    return rc.image("golden.qcow2")


def build_overlay(rc: Recipe, backing: str, backing_fmt: str = "raw", name: str = "ov.qcow2") -> Image:
    rc.create(name, SIZE, backing=backing, backing_fmt=backing_fmt)
    rc.io(name, *OVERLAY_WRITES)
    return rc.image(name)


def golden_server(kind: str, golden: Image, workdir: Path, export: str = ""):
    serve = qemu_nbd if kind == "qemu-nbd" else our_nbd
    return serve(golden, workdir, export)


@contextlib.contextmanager
def nbdkit_holes() -> Iterator[str]:
    """An export whose first MiB is a hole not known to read as zeros (nbdkit's eval plugin),
    then data, data known to be zeros, and holes of zeros; yields its URI until closed."""
    if shutil.which("nbdkit") is None:
        pytest.fail("oracle tool missing from PATH: nbdkit", pytrace=False)
    extents = "echo 0 1048576 hole; echo 1048576 1048576 data; echo 2097152 1048576 zero; "
    extents += "echo 3145728 5242880 hole,zero"
    argv = [
        "nbdkit", "-U", "-", "eval", f"get_size=echo {SIZE}", "can_extents=exit 0", f"extents={extents}",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "--run", 'echo "$unixsocket"; read _',  # ready once it prints; gone once its stdin closes
    ]  # fmt: skip
    pipe = subprocess.PIPE
    p = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, text=True)
    try:
        sock = p.stdout.readline().strip()
        if not sock:
            pytest.fail(f"nbdkit did not start: {p.stderr.read()}", pytrace=False)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        p.stdin.close()
        p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()


def map_forms(image: Image, names: list[str], workdir: Path) -> Comparison:
    """``qcow2 map`` vs ``qemu-img map`` with the overlay's backing file named each way in turn."""
    cmp = Comparison(image)
    for name in names:
        image.recipe.img("rebase", "-u", "-b", name, "-F", "raw", image.path)
        before = len(cmp.mismatches)
        compare_map(image, cmp)
        if len(cmp.mismatches) > before:
            cmp.context.append(f"backing file named {name!r}")
    return cmp


# -- the overlay exported, against qemu-nbd -A --------------------------------------------------


@pytest.mark.parametrize("golden_kind", ["qemu-nbd", "ours"])
def test_overlay_over_unix_socket(tmp_path: Path, oracle_tools: None, golden_kind: str) -> None:
    golden = build_golden(Recipe(tmp_path / "golden"))
    with golden_server(golden_kind, golden, tmp_path / "golden-srv") as g:
        image = build_overlay(Recipe(tmp_path / "overlay"), g.uri)
        cmp = compare_image(image, tmp_path / "cmp")
        assert_same(cmp, f"overlay over {g.uri} (golden served by {golden_kind}): ours vs qemu")


INFO_KEYS = ("filename", "format", "virtual-size", "backing-filename", "full-backing-filename",
             "backing-filename-format")  # fmt: skip


def test_info_names_the_remote_as_qemu_does(tmp_path: Path, oracle_tools: None) -> None:
    """``qcow2 info --backing-chain``: the NBD layer named as QEMU names it, no disk size."""
    golden = build_golden(Recipe(tmp_path / "golden"))
    with qemu_nbd(golden, tmp_path / "golden-srv", export="golden") as g:
        image = build_overlay(Recipe(tmp_path / "overlay"), f"nbd:unix:{g.sock}:exportname=golden")
        argv = ["info", "--backing-chain", "--output=json", image.path]
        qemu, ours = run(["qemu-img", *argv], image.cwd), run([PYTHON, "-m", "qcow2", *argv], image.cwd)
        assert qemu.rc == 0 and ours.rc == 0, qemu.err + ours.err
        for r, o in zip(json.loads(qemu.out), json.loads(ours.out), strict=True):
            assert {k: o.get(k) for k in INFO_KEYS} == {k: r.get(k) for k in INFO_KEYS}
            assert ("actual-size" in o) == ("actual-size" in r)


def test_overlay_over_tcp(tmp_path: Path, oracle_tools: None) -> None:
    golden = build_golden(Recipe(tmp_path / "golden"))
    port = free_port()
    with qemu_nbd(golden, tmp_path / "golden-srv", export="golden", port=port) as g:
        assert g.uri == f"nbd://127.0.0.1:{port}/golden"
        image = build_overlay(Recipe(tmp_path / "overlay"), g.uri)
        cmp = compare_image(image, tmp_path / "cmp")
        assert_same(cmp, f"overlay over {g.uri}: ours vs qemu")
        names = [f"nbd:127.0.0.1:{port}:exportname=golden", f"nbd+tcp://127.0.0.1:{port}/golden"]
        assert_same(map_forms(image, names, tmp_path), "TCP backing names: qcow2 map vs qemu-img map")


def test_backing_name_forms(tmp_path: Path, oracle_tools: None) -> None:
    """Every way QEMU accepts to name a Unix-socket export: same maps, same File column."""
    golden = build_golden(Recipe(tmp_path / "golden"))
    with qemu_nbd(golden, tmp_path / "golden-srv", export="golden") as g:
        image = build_overlay(Recipe(tmp_path / "overlay"), g.uri)
        nested = {"driver": "raw", "file": {"driver": "nbd", "export": "golden",
                                            "server": {"type": "unix", "path": str(g.sock)}}}  # fmt: skip
        dotted = {"file.driver": "nbd", "file.path": str(g.sock), "file.export": "golden"}
        names = [
            f"nbd:unix:{g.sock}:exportname=golden",
            "json:" + json.dumps(nested),
            "json:" + json.dumps(dotted),
            f"nbd+unix:///golden?socket={str(g.sock).replace('/', '%2F')}",
        ]
        assert_same(map_forms(image, names, tmp_path), "backing names: qcow2 map vs qemu-img map")


def test_qcow2_read_over_nbd(tmp_path: Path, oracle_tools: None) -> None:
    """``-F qcow2`` over an export of the qcow2 file's bytes: QEMU reads the format over NBD."""
    golden = build_golden(Recipe(tmp_path / "golden"))
    file_bytes = Image(golden.path, golden.cwd, "raw", golden.recipe)
    with qemu_nbd(file_bytes, tmp_path / "golden-srv") as g:
        image = build_overlay(Recipe(tmp_path / "overlay"), g.uri, "qcow2")
        cmp = compare_image(image, tmp_path / "cmp")
        assert_same(cmp, f"overlay -F qcow2 over {g.uri}: ours vs qemu")


def test_remote_holes_not_known_as_zeros(tmp_path: Path, oracle_tools: None) -> None:
    """HOLE without ZERO stays unallocated and not zero, DATA+ZERO stays both, as QEMU maps them."""
    with nbdkit_holes() as uri:
        image = build_overlay(Recipe(tmp_path / "overlay"), uri)
        cmp = compare_image(image, tmp_path / "cmp")
        assert_same(cmp, f"overlay over nbdkit holes at {uri}: ours vs qemu")


# -- writes ---------------------------------------------------------------------------------------


def qemu_io(fmt: str, target: str) -> list[str]:
    argv = ["qemu-io", "-f", fmt]
    for c in CLIENT_WRITES:
        argv += ["-c", c]
    return [*argv, target]


@pytest.mark.parametrize("golden_kind", ["qemu-nbd", "ours"])
def test_writes_through_our_export(tmp_path: Path, oracle_tools: None, golden_kind: str) -> None:
    golden = build_golden(Recipe(tmp_path / "golden"))
    with golden_server(golden_kind, golden, tmp_path / "golden-srv") as g:
        rc = Recipe(tmp_path / "overlay")
        image = build_overlay(rc, g.uri)
        # built again rather than copied: cp may turn unwritten extents into holes, and what the
        # host file allocates decides QEMU's metadata-preallocation guess, hence its maps
        twin = build_overlay(rc, g.uri, name="twin.qcow2")
        with our_nbd(image, tmp_path / "srv", writable=True) as ours:
            r = run(qemu_io("raw", ours.uri), tmp_path)
            assert r.rc == 0 and "failed" not in r.out + r.err, f"{r.cmdline()}\n{r.out}{r.err}"
        r = run(qemu_io("qcow2", twin.path), rc.root)
        assert r.rc == 0 and "failed" not in r.out + r.err, f"{r.cmdline()}\n{r.out}{r.err}"
        same = run(["qemu-img", "compare", image.path, twin.path], rc.root)
        assert same.rc == 0, f"{same.cmdline()}: {same.out}{same.err}"
        assert check_problems(image) is None
        ours_map, qemu_map = allocation_map(image)[0], allocation_map(twin)[0]
        assert ours_map == qemu_map


# -- refusals ---------------------------------------------------------------------------------------


def backing_error(text: str) -> str:
    """What follows QEMU's 'Could not open backing file: ' on the (single) error line."""
    found = re.search(r"Could not open backing file: (.*)", text)
    assert found, text
    return found.group(1).strip()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_unreachable_remote_is_refused(tmp_path: Path, oracle_tools: None, transport: str) -> None:
    rc = Recipe(tmp_path / "overlay")
    if transport == "unix":
        name = f"nbd+unix:///?socket={tmp_path}/absent.sock"
    else:
        name = f"nbd://127.0.0.1:{free_port()}"
    rc.img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", "ov.qcow2", str(SIZE))
    qemu = run(["qemu-img", "map", "ov.qcow2"], rc.root)
    assert qemu.rc == 1
    expected = backing_error(qemu.err)
    assert expected.startswith("Failed to connect to "), qemu.err
    ours_map = run([PYTHON, "-m", "qcow2", "map", "ov.qcow2"], rc.root)
    sock = tmp_path / "ours.sock"
    served = run([PYTHON, "-m", "nbdserver", "-r", "-k", str(sock), "ov.qcow2"], rc.root)
    for r in (ours_map, served):
        assert r.rc == 1 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
        assert backing_error(r.err) == expected
    assert not sock.exists()


def test_confine_refuses_nbd_backing(tmp_path: Path, oracle_tools: None) -> None:
    """A remote is no file under the confined directories: a hostile image could make the
    server connect anywhere, so --confine refuses every NBD backing file."""
    golden = build_golden(Recipe(tmp_path / "golden"))
    with qemu_nbd(golden, tmp_path / "golden-srv") as g:
        image = build_overlay(Recipe(tmp_path / "volume"), g.uri)
        with our_nbd(image, tmp_path / "srv") as ours:  # without --confine it opens
            assert run(["nbdinfo", "--size", ours.uri], tmp_path).out.strip() == str(SIZE)
        sock = tmp_path / "confined.sock"
        argv = [PYTHON, "-m", "nbdserver", "-r", "-k", str(sock), "--confine", str(image.cwd), image.path]
        refused = run(argv, image.cwd)
        assert refused.rc == 1 and len(refused.err.strip().splitlines()) == 1, refused.err
        assert "NBD export" in refused.err and "--confine" in refused.err, refused.err
        assert not sock.exists()


def test_a_remote_image_names_no_host_file(tmp_path: Path, oracle_tools: None) -> None:
    """A qcow2 read over NBD whose own backing file is a host path: QEMU cannot resolve a
    relative one (same words here); an absolute one, which QEMU would open, is refused too."""
    rc = Recipe(tmp_path / "img")
    rc.create("base.raw", SIZE, fmt="raw")
    rc.create("mid.qcow2", SIZE, backing="base.raw", backing_fmt="raw")
    rc.create("abs.qcow2", SIZE, backing=str(rc.root / "base.raw"), backing_fmt="raw")
    for mid, expected in (("mid.qcow2", None), ("abs.qcow2", "may only name an NBD export")):
        with qemu_nbd(Image(mid, rc.root, "raw", rc), tmp_path / f"srv-{mid}") as g:
            top = f"top-{mid}"
            rc.img("create", "-q", "-f", "qcow2", "-u", "-b", g.uri, "-F", "qcow2", top, str(SIZE))
            ours = run([PYTHON, "-m", "qcow2", "map", top], rc.root)
            assert ours.rc == 1 and len(ours.err.strip().splitlines()) == 1, ours.err
            if expected is None:  # QEMU's message, after its own prefix
                qemu = run(["qemu-img", "map", top], rc.root)
                assert qemu.rc == 1
                expected = backing_error(qemu.err)
            assert expected in ours.err, ours.err


OTHER_PROTOCOLS = ["nbds://127.0.0.1/x", "ssh://host/disk.qcow2", 'json:{"file.driver": "ssh"}']


@pytest.mark.parametrize("name", OTHER_PROTOCOLS)
def test_other_protocols_are_still_refused(tmp_path: Path, oracle_tools: None, name: str) -> None:
    rc = Recipe(tmp_path / "img")
    rc.img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", "ov.qcow2", str(SIZE))
    ours = run([PYTHON, "-m", "qcow2", "map", "ov.qcow2"], rc.root)
    assert ours.rc == 1 and len(ours.err.strip().splitlines()) == 1, ours.err
    assert "uses a protocol we do not support" in ours.err, ours.err


# -- the driver in-process ---------------------------------------------------------------------------


def test_silent_server_times_out(tmp_path: Path, oracle_tools: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts and never speaks (a busy qemu-nbd -e 1) fails the open, in time."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(4)  # connections wait in the backlog, unanswered
        rc = Recipe(tmp_path / "overlay")
        rc.img("create", "-q", "-f", "qcow2", "-u", "-b", f"nbd+unix:///?socket={path}", "-F", "raw",
               "ov.qcow2", str(SIZE))  # fmt: skip
        monkeypatch.setattr(remote, "CONNECT_TIMEOUT", 0.3)
        expected = r"Could not open backing file: Failed to connect to .* handshake"
        with pytest.raises(ImageError, match=expected):
            qcow2.open_layer(str(rc.root / "ov.qcow2"))


def test_parallel_readers_and_the_event_loop(tmp_path: Path, oracle_tools: None) -> None:
    """Reads from many threads share the one connection and get the guest bytes; a read that
    would wait for the remote is refused on the event loop (it goes to a worker)."""
    golden = build_golden(Recipe(tmp_path / "golden"))
    with our_nbd(golden, tmp_path / "golden-srv") as g:
        image = build_overlay(Recipe(tmp_path / "overlay"), g.uri)
        expected = guest_bytes(image, tmp_path / "guest.raw")
        disk = qcow2.open_disk(str(image.abspath))
        try:
            with without_waiting, pytest.raises(WouldBlock):
                disk.read(7 * MiB + 65536, 4096)  # a hole of the overlay: the golden's

            def reads(seed: int) -> list[str]:
                rng, wrong = random.Random(seed), []
                for _ in range(40):
                    offset = rng.randrange(SIZE)
                    length = rng.randint(1, min(SIZE - offset, 300_000))
                    got = bytes(disk.read(offset, length))
                    if got != expected[offset : offset + length]:
                        wrong.append(f"read({offset}, {length})")
                return wrong

            with ThreadPoolExecutor(max_workers=8) as pool:
                wrong = [w for ws in pool.map(reads, range(8)) for w in ws]
            assert not wrong
        finally:
            disk.close()
