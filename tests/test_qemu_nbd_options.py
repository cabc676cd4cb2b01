"""qemu-nbd options scripts pass (issue 10 §3): accepted; where they mean something, the same effect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nbd_wire import wait_pid_exit


def sh(*argv: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120, cwd=cwd)


def start(kind: str, image: Path, *opts: str) -> tuple[str, int]:
    sock, pidfile = image.with_suffix(".sock"), image.with_suffix(".pid")
    if kind == "qemu":
        argv = ["qemu-nbd", "-t", "-f", "qcow2", *opts]
    else:
        argv = [sys.executable, "-m", "nbdserver", "-f", "qcow2", *opts]
    started = sh(*argv, "-k", str(sock), "--fork", "--pid-file", str(pidfile), str(image), check=False)
    assert pidfile.exists(), started.stderr
    return f"nbd+unix:///?socket={sock}", int(pidfile.read_text())


def stop(pid: int) -> None:
    os.kill(pid, 15)
    gone(pid)


def gone(pid: int, timeout: float = 30) -> bool:
    """The daemon has exited (a pidfd: an exited daemon that pid 1 has not reaped yet counts)."""
    return wait_pid_exit(pid, timeout)


def test_compatibility_options_are_accepted(tmp_path: Path, oracle_tools: None) -> None:
    img = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    uri, pid = start("ours", img, "-r", "-A", "--cache=writeback", "--aio=threads")
    try:
        assert sh("nbdinfo", "--size", uri).stdout.strip() == str(1 << 20)
    finally:
        stop(pid)


@pytest.mark.parametrize("mode", ["on", "unmap"])
def test_detect_zeroes_like_qemu_nbd(tmp_path: Path, oracle_tools: None, mode: str) -> None:
    """The same image, the same WRITEs of zeros (and of data), then qemu-img map of both files."""
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    sh("qemu-io", "-c", "write -P 1 0 4M", str(base))
    maps = {}
    for kind in ("qemu", "ours"):
        img = tmp_path / f"{kind}.qcow2"
        shutil.copy(base, img)
        opts = (["--discard=unmap"] if kind == "qemu" and mode == "unmap" else []) + ["--detect-zeroes", mode]
        uri, pid = start(kind, img, *opts)
        try:
            sh("qemu-io", "-f", "raw", "-c", "write -P 0 0 1M", "-c", "write -P 0 5M 128k",
               "-c", "write -P 2 2M 64k", "-c", "flush", uri)  # fmt: skip
        finally:
            stop(pid)
        maps[kind] = json.loads(sh("qemu-img", "map", "--output=json", str(img)).stdout)
        assert sh("qemu-img", "check", str(img)).returncode == 0
    assert maps["ours"] == maps["qemu"]
    assert any(e["zero"] for e in maps["ours"] if e["start"] == 0), "the zeros were detected"


def test_exit_after_last_client(tmp_path: Path, oracle_tools: None) -> None:
    img = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    uri, pid = start("ours", img, "--exit-after-last")
    try:
        assert sh("nbdinfo", "--size", uri).stdout.strip() == str(1 << 20)
        assert gone(pid, 15), "the server exits once its only client has gone"
        assert sh("qemu-img", "check", str(img)).returncode == 0
    finally:
        if not gone(pid, 0):
            stop(pid)


def test_snapshot_mode_writes_to_a_throwaway_overlay(tmp_path: Path, oracle_tools: None) -> None:
    """-s, as qemu-nbd -s: the client reads its own writes, the image never changes, nothing is left."""
    img = tmp_path / "golden.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
    sh("qemu-io", "-c", "write -P 1 0 4M", str(img))
    before = img.read_bytes()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    sock, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    argv = [sys.executable, "-m", "nbdserver", "-s", "-k", str(sock), "--fork", "--pid-file", str(pidfile)]
    subprocess.run([*argv, str(img)], check=True, timeout=60, env={**os.environ, "TMPDIR": str(scratch)})
    pid = int(pidfile.read_text())
    uri = f"nbd+unix:///?socket={sock}"
    try:
        assert list(scratch.iterdir()) == [], "the overlay is unlinked once open"
        sh("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", uri)
        seen = sh("qemu-io", "-f", "raw", "-c", "read -P 7 1M 64k", "-c", "read -P 1 0 1M", uri)
        assert "Pattern verification failed" not in seen.stdout, seen.stdout
        refused = sh("qemu-io", "-c", "write 0 4k", str(img), check=False)
        assert refused.returncode != 0 and "lock" in refused.stderr, "the image is locked against writers"
    finally:
        stop(pid)
    assert img.read_bytes() == before


def test_offset_like_qemu_nbd(tmp_path: Path, oracle_tools: None) -> None:
    """-o/--offset: a disk whose first MiB is not exported (a partition table, say)."""
    img = tmp_path / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", str(img), "8M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 9 0 1M", "-c", "write -P 5 2M 64k", str(img))
    answers = {}
    for kind in ("qemu", "ours"):
        sock, pidfile = tmp_path / f"{kind}.sock", tmp_path / f"{kind}.pid"
        if kind == "qemu":
            argv = ["qemu-nbd", "-t", "-r", "-f", "raw", "-o", str(1 << 20)]
        else:
            argv = [sys.executable, "-m", "nbdserver", "-r", "-f", "raw", "-o", str(1 << 20)]
        sh(*argv, "-k", str(sock), "--fork", "--pid-file", str(pidfile), str(img))
        uri = f"nbd+unix:///?socket={sock}"
        try:
            read = sh("qemu-io", "-f", "raw", "-r", "-c", "read -P 5 1M 64k", uri).stdout
            assert "Pattern verification failed" not in read, (kind, read)
            answers[kind] = (sh("nbdinfo", "--size", uri).stdout, sh("nbdinfo", "--map", uri).stdout)
        finally:
            stop(int(pidfile.read_text()))
    assert answers["ours"] == answers["qemu"]
    assert answers["ours"][0].strip() == str(7 << 20)


@pytest.mark.parametrize("mode", ["ignore", "unmap"])
def test_discard_like_qemu_nbd(tmp_path: Path, oracle_tools: None, mode: str) -> None:
    """--discard: the same TRIMs and zero writes through qemu-nbd and us, the same allocation after."""
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    sh("qemu-io", "-c", "write -P 1 0 6M", str(base))
    maps = {}
    for kind in ("qemu", "ours"):
        img = tmp_path / f"{kind}.qcow2"
        shutil.copy(base, img)
        uri, pid = start(kind, img, f"--discard={mode}")
        try:
            sh("qemu-io", "-f", "raw", "-c", "discard 0 1M", "-c", "write -z -u 2M 1M",
               "-c", "write -z 4M 64k", "-c", "flush", uri)  # fmt: skip
        finally:
            stop(pid)
        maps[kind] = json.loads(sh("qemu-img", "map", "--output=json", str(img)).stdout)
        assert sh("qemu-img", "check", str(img)).returncode == 0
    assert maps["ours"] == maps["qemu"]


def test_a_foreign_qcow2_module_on_pythonpath(tmp_path: Path, oracle_tools: None) -> None:
    """QEMU's iotests put their own qcow2.py on PYTHONPATH: the server must still use its driver."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "qcow2.py").write_text('raise SystemExit("the foreign qcow2.py was imported")\n')
    img = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    sock, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    argv = [sys.executable, "-m", "nbdserver", "-r", "-k", str(sock), "--fork", "--pid-file", str(pidfile)]
    repo = Path(__file__).resolve().parent.parent  # after the foreign one, as iotests' PYTHONPATH has it
    env = {**os.environ, "PYTHONPATH": f"{foreign}{os.pathsep}{repo}"}
    started = subprocess.run(  # not from the repository: the current directory would come first
        [*argv, str(img)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert started.returncode == 0, started.stderr
    try:
        assert sh("nbdinfo", "--size", f"nbd+unix:///?socket={sock}").stdout.strip() == str(1 << 20)
    finally:
        stop(int(pidfile.read_text()))


@pytest.mark.parametrize("opts", [[], ["-r"], ["-f", "raw"], ["-s"]], ids=["probed", "ro", "raw", "snapshot"])
def test_probed_raw_warning_like_qemu_nbd(tmp_path: Path, oracle_tools: None, opts: list[str]) -> None:
    """A raw image served writable without -f: QEMU's warning on stderr, word for word (iotest 241)."""
    img = tmp_path / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", str(img), "1M")
    said = {}
    for kind in ("qemu", "ours"):
        sock, pidfile = tmp_path / f"{kind}.sock", tmp_path / f"{kind}.pid"
        argv = ["qemu-nbd", "-t"] if kind == "qemu" else [sys.executable, "-m", "nbdserver"]
        started = sh(*argv, *opts, "-k", str(sock), "--fork", "--pid-file", str(pidfile), "disk.raw",
                     check=False, cwd=tmp_path)  # fmt: skip
        assert pidfile.exists(), started.stderr
        try:  # serving: qemu-nbd loses a SIGTERM that comes before its main loop
            sh("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
        finally:
            stop(int(pidfile.read_text()))
        said[kind] = started.stderr
    assert said["ours"] == said["qemu"]
    assert ("probing guessed raw" in said["ours"]) == (opts == [])
