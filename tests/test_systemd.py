"""systemd (issue 10 §5): socket activation with systemd-socket-activate, readiness by sd_notify."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture
def image(tmp_path: Path, oracle_tools: None) -> Path:
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
    sh("qemu-io", "-c", "write -P 3 1M 64k", str(img))
    return img


def test_socket_activation(tmp_path: Path, image: Path) -> None:
    """systemd-socket-activate listens and starts us on the first connection, handing the socket over."""
    sock = tmp_path / "act.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), sys.executable, "-m", "nbdserver", "-r", str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():  # systemd-socket-activate's own socket, before any server runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        uri = f"nbd+unix:///?socket={sock}"
        assert sh("nbdinfo", "--size", uri).stdout.strip() == str(4 << 20)
        seen = sh("qemu-io", "-f", "raw", "-r", "-c", "read -P 3 1M 64k", uri).stdout
        assert "Pattern verification failed" not in seen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert sock.exists(), "the socket is systemd's: the server does not remove it"


def test_readiness_is_notified(tmp_path: Path, image: Path) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    sock = tmp_path / "s.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    proc = subprocess.Popen([sys.executable, "-m", "nbdserver", "-r", "-k", str(sock), str(image)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message and f"MAINPID={proc.pid}" in message, message
        assert sh("nbdinfo", "--size", f"nbd+unix:///?socket={sock}").stdout.strip() == str(4 << 20)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        listener.close()


def test_unit_files() -> None:
    """The units in the repository: a socket unit and a notify service that uses it."""
    units = {}
    for name in ("qcow2-nbd.socket", "qcow2-nbd.service"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(REPO / "systemd" / name)
        units[name] = parser
    assert units["qcow2-nbd.socket"]["Socket"]["ListenStream"]
    service = units["qcow2-nbd.service"]
    assert service["Service"]["Type"] == "notify"
    assert service["Service"]["ExecStart"].split()[0].endswith("qcow2-nbd")
    assert "qcow2-nbd.socket" in service["Unit"]["Requires"]
    verify = sh(
        "systemd-analyze", "verify", "--man=no", str(REPO / "systemd" / "qcow2-nbd.socket"), check=False
    )
    assert "Invalid" not in verify.stderr and "Unknown" not in verify.stderr, verify.stderr
