"""QEMU-compatible image locks (issue 8 §5): QEMU's tools and we never write what the other uses.

The oracle is QEMU itself: the lock bytes qemu-nbd holds (read from
/proc/locks) must be the ones we hold, and qemu-io / qemu-nbd must refuse an
image we serve exactly as they refuse one qemu-nbd serves; in the other
direction we refuse what qemu-nbd serves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_wire import wait_pid_exit

PYTHON = sys.executable


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def lock_bytes(path: Path) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every lock on ``path``'s inode, sorted."""
    dev_ino = os.stat(path).st_ino
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "N: OFDLCK ADVISORY READ -1 MAJ:MIN:INODE START END"
        if len(fields) >= 8 and fields[5].rsplit(":", 1)[-1] == str(dev_ino):
            found.append((fields[3], int(fields[6]), int(fields[7])))
    return sorted(found)


@contextlib.contextmanager
def serving(kind: str, image: Path, *opts: str) -> Iterator[subprocess.CompletedProcess]:
    """qemu-nbd or our server on ``image`` (stopped on exit); yields how the start went."""
    sock = image.parent / f"{kind}-{len(opts)}-{time.monotonic_ns()}.sock"
    pidfile = Path(str(sock) + ".pid")
    if kind == "qemu":
        argv = ["qemu-nbd", "-t", "-f", "qcow2", *opts]
    else:
        argv = [PYTHON, "-m", "nbdserver", "-f", "qcow2", *opts]
    started = sh(*argv, "-k", str(sock), "--fork", "--pid-file", str(pidfile), str(image), check=False)
    try:
        yield started
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            wait_pid_exit(pid, 30)


@pytest.fixture
def image(tmp_path: Path, oracle_tools: None) -> Path:
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    return top


@pytest.mark.parametrize("opts", [(), ("-r",)], ids=["read-write", "read-only"])
def test_we_hold_the_lock_bytes_qemu_nbd_holds(image: Path, opts: tuple[str, ...]) -> None:
    base = image.parent / "base.qcow2"
    with serving("qemu", image, *opts):
        qemu_locks = (lock_bytes(image), lock_bytes(base))
    assert qemu_locks[0], "qemu-nbd took no locks: the oracle is broken"
    with serving("ours", image, *opts) as started:
        assert started.returncode == 0, started.stderr
        assert (lock_bytes(image), lock_bytes(base)) == qemu_locks


def test_qemu_tools_refuse_an_image_we_write(image: Path) -> None:
    with serving("ours", image) as started:
        assert started.returncode == 0, started.stderr
        rw = sh("qemu-io", "-c", "write 0 4k", str(image), check=False)
        assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr, rw.stderr
        ro = sh("qemu-io", "-r", "-c", "read 0 4k", str(image), check=False)
        assert ro.returncode != 0 and 'Failed to get shared "write" lock' in ro.stderr, ro.stderr
        backing = sh("qemu-io", "-c", "write 0 4k", str(image.parent / "base.qcow2"), check=False)
        assert backing.returncode != 0 and "lock" in backing.stderr, "nobody writes what we read"
        shared = sh("qemu-io", "-r", "-U", "-c", "read 0 4k", str(image), check=False)
        assert shared.returncode == 0, shared.stderr
        with serving("qemu", image, "-r") as second:  # nor serve it beside us
            assert second.returncode != 0 and 'shared "write" lock' in second.stderr, second
    after = sh("qemu-io", "-c", "write 0 4k", str(image), check=False)
    assert after.returncode == 0, "our locks go with the server: " + after.stderr


def test_we_refuse_an_image_qemu_writes(image: Path) -> None:
    with serving("qemu", image) as started:
        assert started.returncode == 0, started.stderr
        for opts, lock in (((), '"write" lock'), (("-r",), 'shared "write" lock')):
            with serving("ours", image, *opts) as ours:
                assert ours.returncode == 1, ours
                line = ours.stderr.strip()
                assert line.startswith("qcow2-nbd: cannot open") and lock in line, line
                assert "another process" in line, line
        with serving("ours", image, "-r", "-U") as ours:  # force-share, as qemu-img -U
            assert ours.returncode == 0, ours.stderr


def test_read_only_servers_share(image: Path) -> None:
    ours, qemu = serving("ours", image, "-r"), serving("qemu", image, "-r")
    with ours as a, serving("ours", image, "-r") as b, qemu as c:
        assert (a.returncode, b.returncode, c.returncode) == (0, 0, 0), (a.stderr, b.stderr, c.stderr)
