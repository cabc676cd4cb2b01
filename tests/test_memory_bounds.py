"""What one client can make the server hold: measured as the server's RSS (issue 8 §3).

Clients that announce big WRITEs and stall, idle connections, clients that
never finish negotiating.  Each figure is read from /proc after a barrier
(a full request on another connection: the event loop has by then read what
the others sent), never after a sleep.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest
from nbd_wire import wait_pid_exit

MiB = 1 << 20
KiB = 1 << 10
REQUEST_MAGIC = 0x25609513
IHAVEOPT = 0x49484156454F5054


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed while we looked: the server is cleaning up
            pass
    return count


class Served:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.image = tmp / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), "1G"], check=True)
        subprocess.run(
            ["qemu-io", "-c", "write -P 7 0 32M", str(self.image)], check=True, capture_output=True
        )
        self.sock = tmp / "s.sock"
        pidfile = tmp / "s.pid"
        argv = [sys.executable, "-m", "nbdserver", "-f", "qcow2", "-k", str(self.sock), *extra]
        subprocess.run([*argv, "--fork", "--pid-file", str(pidfile), str(self.image)], check=True, timeout=60)
        self.pid = int(pidfile.read_text())
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        os.kill(self.pid, 15)
        wait_pid_exit(self.pid, 30)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(str(self.sock))
        return s

    def barrier(self) -> None:
        """A whole request on a new connection: what others sent before has been read by now."""
        h = nbd.NBD()
        h.connect_uri(self.uri)
        assert h.pread(4096, 0) == b"\x07" * 4096
        h.shutdown()

    def settled(self, sockets: int) -> None:
        """Wait (bounded) until the server holds ``sockets`` sockets: the others are cleaned up."""
        deadline = time.monotonic() + 30
        while open_sockets(self.pid) > sockets:
            assert time.monotonic() < deadline, f"{open_sockets(self.pid)} sockets still open"
            time.sleep(0.02)


def negotiate(s: socket.socket) -> None:
    """Old-style EXPORT_NAME negotiation of the default export, as the quickest way in."""
    assert len(s.recv(18, socket.MSG_WAITALL)) == 18
    s.sendall(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 1, 0))
    reply = s.recv(10 + 124, socket.MSG_WAITALL)
    assert len(reply) >= 10, reply


@pytest.fixture
def served(tmp_path: Path, oracle_tools: None):
    s = Served(tmp_path, "--handshake-limit", "60")
    s.barrier()
    subprocess.run(["nbdinfo", "--map", s.uri], check=True, capture_output=True)  # map code loaded
    yield s
    s.stop()


def test_stalled_big_writes_cost_what_arrived_and_go_back(served: Served) -> None:
    """16 clients each announce a 32 MiB WRITE and send one byte (qemu-nbd: +0.5 MiB for 32)."""
    h = nbd.NBD()
    h.connect_uri(served.uri)
    big_read = h.pread(32 * MiB, 0)  # once before the baseline: the heap keeps its reply buffer
    base, sockets = rss_kib(served.pid), open_sockets(served.pid)
    clients = []
    for i in range(16):
        s = served.connect()
        negotiate(s)
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, i, 0, 32 * MiB) + b"x")
        clients.append(s)
    served.barrier()
    held = rss_kib(served.pid) - base
    assert held < 16 * 64 + 4 * 1024, f"+{held} KiB for 16 stalled 32 MiB writes"
    assert h.pread(32 * MiB, 0) == big_read == b"\x07" * (32 * MiB), "a well-behaved client is served"
    h.shutdown()
    for s in clients:
        s.close()
    served.settled(sockets)
    served.barrier()
    after = rss_kib(served.pid) - base
    assert after < 4 * 1024, f"+{after} KiB after the stalled clients left"


def test_idle_connections_are_cheap(served: Served) -> None:
    base, sockets = rss_kib(served.pid), open_sockets(served.pid)
    clients = []
    for _ in range(200):
        s = served.connect()
        assert len(s.recv(18, socket.MSG_WAITALL)) == 18  # the server greeted: its side exists
        clients.append(s)
    per = (rss_kib(served.pid) - base) / len(clients)
    assert per <= 16, f"{per:.1f} KiB per idle connection"
    for s in clients:
        s.close()
    served.settled(sockets)


def test_clients_that_do_not_negotiate_are_dropped(tmp_path: Path, oracle_tools: None) -> None:
    s = Served(tmp_path, "--handshake-limit", "1")
    try:
        c = s.connect()
        c.settimeout(20)
        assert len(c.recv(18, socket.MSG_WAITALL)) == 18
        started = time.monotonic()
        assert c.recv(1) == b"", "the server hung up"
        assert time.monotonic() - started < 15
        s.barrier()  # and serves others as before
    finally:
        s.stop()
