"""The ``qcow2-nbd`` command: start-up, --fork, pid file, -e, TCP, errors, signals."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import nbd
import pytest
from nbd_wire import RawClient, Server, make_raw_image, run, wait_pid_exit

MiB = 1 << 20
SERVER = [sys.executable, "-m", "nbdserver"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_raw_image(tmp_path_factory.mktemp("cli") / "disk.raw", "16M", ("write -P 0x42 0 16M",))


def start_foreground(*args: str) -> tuple[subprocess.Popen, str]:
    """Start without --fork; returns once the server logged that it listens (and that log line)."""
    p = subprocess.Popen([*SERVER, "-v", *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "serving" in line:
            return p, line
    p.wait()
    pytest.fail(f"server exited with {p.returncode} before listening")


def test_fork_returns_once_listening_and_sigterm_cleans_up(image, tmp_path):
    s = Server(image, tmp_path, ("-r",))
    assert s.alive() and s.sock.exists()
    assert nbd.NBD().connect_uri(s.uri) is None  # connectable right away, no retry loop
    os.kill(s.pid, signal.SIGTERM)
    assert wait_pid_exit(s.pid)
    assert not s.sock.exists() and not s.pidfile.exists()


def test_sigterm_right_after_fork_returns_still_cleans_up(tmp_path):
    """Scripts stop a server as soon as it is up; a signal before the event loop runs still
    closes the image and removes the pid file and the socket (it once killed the process outright)."""
    qcow2 = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", qcow2, "64M")
    for i in range(5):
        s = Server(qcow2, tmp_path / str(i), ("-r",))
        os.kill(s.pid, signal.SIGTERM)
        assert wait_pid_exit(s.pid)
        assert not s.sock.exists() and not s.pidfile.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0_and_removes_files(image, tmp_path, sig):
    sock, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    p, _ = start_foreground("--pid-file", str(pidfile), "-k", str(sock), str(image))
    assert int(pidfile.read_text()) == p.pid
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    assert h.pread(512, 0) == b"B" * 512  # a probed raw image: 512-byte blocks, as qemu-nbd
    p.send_signal(sig)
    assert p.wait(timeout=10) == 0
    p.stderr.close()
    assert not sock.exists() and not pidfile.exists()


def test_sigterm_lets_requests_in_flight_finish(image, tmp_path):
    sock = tmp_path / "s.sock"
    p, _ = start_foreground("-k", str(sock), str(image))
    with RawClient(sock) as c:
        c.go()
        for cookie in range(8):
            c.request(0, offset=cookie * MiB, length=4 * MiB, cookie=cookie)
        first = c.chunk()  # the server is busy with the batch
        p.send_signal(signal.SIGTERM)
        data = {first[2]: first[3][8:]} if first[1] == 1 else {}
        while len(data) < 8 or any(len(v) < 4 * MiB for v in data.values()):
            flags, kind, cookie, payload = c.chunk()
            assert kind == 1, "every request in flight is answered with data"
            data[cookie] = data.get(cookie, b"") + payload[8:]
        assert all(v == b"\x42" * (4 * MiB) for v in data.values())
        assert c.closed_by_server()
    assert p.wait(timeout=10) == 0
    p.stderr.close()


@pytest.mark.parametrize("fork", [False, True])
@pytest.mark.parametrize("kind", ["missing", "corrupt", "directory"])
def test_bad_image_is_a_one_line_error(tmp_path, kind, fork):
    path = tmp_path / "img"
    if kind == "corrupt":
        path.write_bytes(b"QFI\xfb" + b"\xff" * 100)
    elif kind == "directory":
        path.mkdir()
    sock, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    args = [*SERVER, "-k", str(sock), "--pid-file", str(pidfile), *(["--fork"] if fork else []), str(path)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr and str(path) in lines[0], p.stderr
    assert not sock.exists() and not pidfile.exists()


def test_bad_socket_path_fails_cleanly(image, tmp_path):
    p = subprocess.run(
        [*SERVER, "-k", str(tmp_path / "no" / "dir" / "s.sock"), str(image)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1 and "cannot listen" in p.stderr and "Traceback" not in p.stderr


def test_tcp_listener(image, tmp_path):
    p, line = start_foreground("-b", "127.0.0.1", "-p", "0", "-x", "tcp", str(image))
    port = int(re.search(r" on 127\.0\.0\.1:(\d+)$", line.strip()).group(1))
    try:
        out = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/tcp")
        assert int(out) == 16 * MiB
        with socket.create_connection(("127.0.0.1", port)) as s:
            assert s.recv(18, socket.MSG_WAITALL)[:16] == b"NBDMAGICIHAVEOPT"
    finally:
        p.terminate()
        assert p.wait(timeout=10) == 0
        p.stderr.close()


def test_max_clients_pauses_accepting(image, tmp_path):
    s = Server(image, tmp_path, ("-e", "1"))
    try:
        first = RawClient(s.sock)
        assert first.recv_exactly(18)[:8] == b"NBDMAGIC"
        second = RawClient(s.sock)  # queued in the listen backlog, not served yet
        readable, _, _ = select.select([second.sock], [], [], 0.3)
        assert readable == []
        first.close()  # frees the slot
        assert second.recv_exactly(18)[:8] == b"NBDMAGIC"
        second.sock.sendall(struct.pack(">I", 3))
        second.send_option(2)
        assert second.option_reply() == (2, 1, b"")
        second.close()
    finally:
        s.stop()


def test_serves_again_after_a_client_leaves(image, tmp_path):
    s = Server(image, tmp_path)
    try:
        for _ in range(3):
            h = nbd.NBD()
            h.connect_uri(s.uri)
            assert h.pread(512, 16 * MiB - 512) == b"B" * 512
            h.shutdown()
        assert s.alive()
    finally:
        s.stop()


def test_plain_asyncio_without_uvloop(image, tmp_path):
    """uvloop is optional: the same server runs on the standard event loop."""
    code = "import sys; sys.modules['uvloop'] = None; from nbdserver.cli import main; sys.exit(main())"
    sock, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    argv = [
        sys.executable,
        "-c",
        code,
        "-v",
        "--fork",
        "--pid-file",
        str(pidfile),
        "-k",
        str(sock),
        str(image),
    ]
    with open(tmp_path / "log", "w") as log:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, timeout=30)
    assert p.returncode == 0
    pid = int(pidfile.read_text())
    try:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        bufs = [nbd.Buffer(MiB) for _ in range(16)]
        for i, b in enumerate(bufs):
            h.aio_pread(b, i * MiB)
        while h.aio_in_flight():
            h.poll(-1)
        assert all(b.to_bytearray() == b"\x42" * MiB for b in bufs)
        h.shutdown()
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_pid_exit(pid)
    assert not sock.exists()
    assert "event loop: asyncio" in (tmp_path / "log").read_text()
