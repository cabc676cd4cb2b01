"""--client-overlays / --client-overlay-dir: every client writes into an overlay of its own.

The oracle for what an overlay must hold is QEMU: the same qemu-io writes go
into an overlay made locally by ``qemu-img create -b GOLD`` and through our
per-client export; then the kept overlay equals QEMU's (``qemu-img compare``,
``qemu-img map``, ``qemu-img check``), and our export of it answers block
status as ``qemu-nbd -A`` does for QEMU's.  Clients at once never see each
other's writes, the golden image is never written (byte for byte, and locked
against writers while served), throwaway overlays leave nothing behind.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import nbd
import pytest
from images import Image, Recipe
from inprocess import in_process_server
from nbd_wire import RawClient
from servers import allocation_map, check_problems, our_nbd, qemu_nbd, run

import qcow2
from nbdserver.export import Export
from nbdserver.overlays import ClientOverlays
from nbdserver.server import Server

MiB = 1 << 20
WRITES = (
    "write -P 0x21 1M 64k",
    "write -P 0x22 3M 5000",  # unaligned, partial clusters over golden data
    "write -z 4M 1M",
    "discard 6M 1M",
    "write -z -u 9M 64k",  # over nothing in the golden image
    "write -P 0x23 60M 1M",
)


def _golden(rc: Recipe) -> Image:
    rc.create("gold.qcow2", "64M", cluster_size=65536)
    rc.io("gold.qcow2", "write -P 0x11 0 8M", "write -z 16M 1M", "write -c -P 0x12 20M 1M")
    return rc.image("gold.qcow2")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _qemu_io(uri_or_path: str, fmt: str, ops, cwd: Path) -> None:
    argv = ["qemu-io", "-f", fmt, *[x for op in ops for x in ("-c", op)], uri_or_path]
    r = run(argv, cwd)
    assert r.rc == 0 and "failed" not in r.out + r.err, r.out + r.err


def _uri(srv, name: str) -> str:
    return f"nbd+unix:///{name}?socket={srv.sock}"


def _maps(uri: str, cwd: Path) -> str:
    out = []
    for ctx in ("base:allocation", "qemu:allocation-depth"):
        r = run(["nbdinfo", f"--map={ctx}", uri], cwd)
        assert r.rc == 0, r.err
        out.append(f"{ctx}\n{r.out}")
    return "\n".join(out)


def test_kept_overlay_holds_what_qemu_would(tmp_path: Path, oracle_tools: None):
    gold = _golden(Recipe(tmp_path / "ours"))
    kept = tmp_path / "kept"
    kept.mkdir()
    before = _sha(gold.abspath)
    with our_nbd(gold, tmp_path / "srv", writable=True, options=["--client-overlay-dir", str(kept)]) as srv:
        _qemu_io(_uri(srv, "vm1"), "raw", WRITES, tmp_path)
        ours_map = _maps(_uri(srv, "vm1"), tmp_path)  # a new connection takes the kept overlay up again
    assert srv.exit_problem is None, srv.stderr()
    assert _sha(gold.abspath) == before, "the golden image was written"

    # QEMU: the same writes into an overlay qemu-img made over a copy of the golden image.
    ref = _golden(Recipe(tmp_path / "ref"))
    overlay = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(ref.abspath), "-F", "qcow2", "vm1.qcow2"]
    r = run(overlay, ref.cwd)
    assert r.rc == 0, r.err
    _qemu_io("vm1.qcow2", "qcow2", WRITES, ref.cwd)
    theirs = Image("vm1.qcow2", ref.cwd, "qcow2", ref.recipe)
    mine = Image("vm1.qcow2", kept, "qcow2", gold.recipe)
    r = run(["qemu-img", "compare", str(theirs.abspath), str(mine.abspath)], tmp_path)
    assert r.rc == 0, r.out + r.err
    (a, ra), (b, rb) = allocation_map(theirs), allocation_map(mine)
    assert a == b, "\n".join(difflib.unified_diff(ra.out.splitlines(), rb.out.splitlines(), "qemu", "ours"))
    assert check_problems(mine) is None, check_problems(mine)
    with qemu_nbd(theirs, tmp_path / "qsrv") as q:
        want = _maps(q.uri, tmp_path)
    assert ours_map == want


def test_clients_at_once_each_see_only_their_own_writes(tmp_path: Path, oracle_tools: None):
    gold = _golden(Recipe(tmp_path / "img"))
    before = _sha(gold.abspath)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)  # the server's throwaway overlays go here
    try:
        with our_nbd(gold, tmp_path / "srv", writable=True, options=["--client-overlays"]) as srv:
            handles = []
            for _ in range(8):
                h = nbd.NBD()
                h.add_meta_context("qemu:allocation-depth")
                h.connect_uri(_uri(srv, ""))
                handles.append(h)
            assert not any(h.can_multi_conn() for h in handles), "each client has its own disk"
            for i, h in enumerate(handles):
                h.pwrite(bytes([0x40 + i]) * 65536, MiB)
                h.zero(65536, 2 * MiB)
            for i, h in enumerate(handles):
                assert h.pread(65536, MiB) == bytes([0x40 + i]) * 65536
                assert h.pread(65536, 2 * MiB) == bytes(65536)
                assert h.pread(65536, 3 * MiB) == b"\x11" * 65536  # the golden image below
                h.flush()
            # a new client starts from the golden image again
            fresh = nbd.NBD()
            fresh.connect_uri(_uri(srv, ""))
            assert fresh.pread(65536, MiB) == b"\x11" * 65536
            for h in [*handles, fresh]:
                h.shutdown()
            # the golden image is locked against writers while served
            r = run(["qemu-io", "-c", "write 0 512", str(gold.abspath)], tmp_path)
            assert r.rc != 0 and "lock" in r.err, r.out + r.err
    finally:
        if env_tmp is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = env_tmp
    assert srv.exit_problem is None, srv.stderr()
    assert "Traceback" not in srv.stderr(), srv.stderr()
    assert list(scratch.iterdir()) == [], "throwaway overlays are gone"
    assert _sha(gold.abspath) == before, "the golden image was written"
    r = run(["qemu-img", "check", str(gold.abspath)], tmp_path)
    assert r.rc == 0, r.out


def test_kept_overlay_names(tmp_path: Path, oracle_tools: None):
    gold = _golden(Recipe(tmp_path / "img"))
    kept = tmp_path / "kept"
    kept.mkdir()
    options = ["--client-overlay-dir", str(kept), "-x", "golden", "-D", "the golden image"]
    with our_nbd(gold, tmp_path / "srv", writable=True, options=options) as srv:
        first = nbd.NBD()
        first.connect_uri(_uri(srv, "vm-7"))
        first.pwrite(b"\x77" * 4096, 0)
        # one client per kept overlay: a second one is told why it cannot have it
        r = run(["qemu-io", "-f", "raw", "-c", "read 0 512", _uri(srv, "vm-7")], tmp_path)
        assert r.rc != 0 and "overlay 'vm-7' is in use by another client" in r.err, r.out + r.err
        assert first.pread(4096, 0) == b"\x77" * 4096  # the first client goes on
        first.shutdown()
        again = nbd.NBD()
        again.connect_uri(_uri(srv, "vm-7"))
        assert again.pread(4096, 0) == b"\x77" * 4096
        again.shutdown()
        for bad in ("../escape", ".hidden", "a%2Fb", "x" * 200):
            h = nbd.NBD()
            with pytest.raises(nbd.Error):
                h.connect_uri(_uri(srv, bad))
        r = run(["nbdinfo", "--list", "--json", _uri(srv, "golden")], tmp_path)
        assert r.rc == 0, r.err
        assert '"export-name": "golden"' in r.out and '"export-name": "vm-7"' in r.out
        assert "the golden image" in r.out
    assert sorted(p.name for p in kept.iterdir()) == ["vm-7.qcow2"], "no stray files"
    assert srv.exit_problem is None, srv.stderr()


@pytest.mark.parametrize("clash", [["-r"], ["-s"], ["-l", "s1"], ["-B", "b0"], ["--offset", "512"]])
def test_client_overlays_refuse_options_that_do_not_fit(clash, tmp_path: Path, oracle_tools: None):
    gold = _golden(Recipe(tmp_path / "img"))
    argv = [sys.executable, "-m", "nbdserver", "--client-overlays", *clash, "-k", str(tmp_path / "s")]
    p = subprocess.run(
        [*argv, gold.path],
        cwd=gold.cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 2 and "--client-overlays" in p.stderr and clash[0] in p.stderr, p.stderr


class _SlowToOpen(ClientOverlays):
    """Real overlays whose opening waits for the test: a client can be dropped meanwhile."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.opening, self.may_open, self.closed = threading.Event(), threading.Event(), threading.Event()

    def attach(self, name: str) -> Export:
        self.opening.set()
        assert self.may_open.wait(30)
        return super().attach(name)

    def detach(self, export: Export) -> None:
        super().detach(export)
        self.closed.set()


def test_an_overlay_opened_for_a_dropped_client_is_closed_again(tmp_path: Path, oracle_tools: None):
    """A client past the handshake limit while its kept overlay opens: once open, the overlay
    is closed again, not left "in use" by nobody until the server stops."""
    gold = _golden(Recipe(tmp_path / "img"))
    kept = tmp_path / "kept"
    kept.mkdir()
    base = qcow2.open_disk(str(gold.abspath), read_only=True)
    overlays = _SlowToOpen(str(gold.abspath), "qcow2", base, Export("", base), str(kept))
    sock = tmp_path / "s.sock"
    try:
        with in_process_server(
            lambda: Server({"": overlays.template}, handshake_limit=0.5, overlays=overlays), sock
        ):
            try:
                with RawClient(sock) as c:
                    c.greet()
                    c.send_option(7, struct_info("vm-1"))  # NBD_OPT_GO
                    assert overlays.opening.wait(10)
                    assert c.closed_by_server(), "the handshake limit drops the client"
                overlays.may_open.set()
                assert overlays.closed.wait(10), "the orphaned overlay was never closed"
                assert overlays.in_use == set()
                h = nbd.NBD()
                h.connect_uri(f"nbd+unix:///vm-1?socket={sock}")  # free again
                h.pwrite(b"\x42" * 512, 0)
                h.shutdown()
            finally:
                overlays.may_open.set()  # never leave the server's worker waiting
    finally:
        overlays.template.disk.close()
        overlays.close()
    assert run(["qemu-img", "check", str(kept / "vm-1.qcow2")], tmp_path).rc == 0


def struct_info(name: str) -> bytes:
    """NBD_OPT_INFO/GO data: the name, no information requests."""
    raw = name.encode()
    return len(raw).to_bytes(4, "big") + raw + (0).to_bytes(2, "big")
