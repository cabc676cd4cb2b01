"""Helpers for the NBD server tests: the server as a subprocess, a raw-socket client, images.

The raw client speaks the protocol byte by byte with ``struct`` (not the
server's own code), so it can send what libnbd refuses to: bad magics,
unknown commands and flags, truncated requests.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdsh", "nbdcopy")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


def tool(name: str) -> str:
    """Path of a required external tool; a missing tool fails the test (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed", pytrace=False)
    return path


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    """Run a tool, fail the test with its stderr if it fails, return stdout."""
    argv = (tool(str(argv[0])), *map(str, argv[1:]))
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}", pytrace=False)
    return p.stdout


def python_first_env() -> dict[str, str]:
    """Environment whose ``python3`` is this interpreter: nbdsh runs ``python3 -m nbd``."""
    here = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": here + os.pathsep + os.environ.get("PATH", "")}


def wait_pid_exit(pid: int, timeout: float = 10.0) -> bool:
    """Block until ``pid`` exits (a pidfd becomes readable): no polling sleeps.

    Also right for daemons that pid 1 reaps late: an exited process left as a zombie
    still has its /proc entry and answers kill(pid, 0), but its pidfd is readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@dataclass
class Server:
    """``python -m nbdserver --fork``: started and listening when the constructor returns."""

    image: Path
    workdir: Path
    extra: tuple[str, ...] = ()
    sock: Path = field(init=False)
    pidfile: Path = field(init=False)
    log: Path = field(init=False)
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock = self.workdir / "nbd.sock"
        self.pidfile = self.workdir / "nbd.pid"
        self.log = self.workdir / "server.log"
        argv = [sys.executable, "-m", "nbdserver", "--fork", "--pid-file", str(self.pidfile)]
        argv += ["-k", str(self.sock), *self.extra, str(self.image)]
        with open(self.log, "ab") as log:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=30)
        if p.returncode != 0:
            pytest.fail(f"server did not start: {self.log.read_text()}", pytrace=False)
        self.pid = int(self.pidfile.read_text())

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            if not wait_pid_exit(self.pid):
                os.kill(self.pid, signal.SIGKILL)
                wait_pid_exit(self.pid)


def make_raw_image(path: Path, size: str = "8M", writes: tuple[str, ...] = ()) -> Path:
    """A raw image with ``qemu-io`` write commands applied (holes stay sparse)."""
    run("qemu-img", "create", "-q", "-f", "raw", path, size)
    if writes:
        args = []
        for w in writes:
            args += ["-c", w]
        run("qemu-io", "-f", "raw", *args, path)
    return path


# --- raw-socket client ------------------------------------------------------


class RawClient:
    """A deliberately dumb NBD client over a Unix socket."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (reads EOF or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # handshake
    def greet(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exactly(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rep, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == REPLY_MAGIC
        return option, rep, self.recv_exactly(length)

    def replies_until_final(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _, rep, data = self.option_reply()
            out.append((rep, data))
            if rep == 1 or rep & 0x80000000:
                return out

    def go(self, name: str = "", structured: bool = True, contexts: tuple[str, ...] = ()) -> int:
        """Negotiate and enter transmission; returns the transmission flags."""
        self.greet()
        if structured:
            self.send_option(8)
            assert self.replies_until_final() == [(1, b"")]
        if contexts:
            self.send_option(10, meta_context_data(name, contexts))
            assert self.replies_until_final()[-1][0] == 1
        self.send_option(7, info_data(name))
        tflags = None
        for rep, data in self.replies_until_final():
            if rep == 3 and struct.unpack(">H", data[:2])[0] == 0:
                tflags = struct.unpack(">QH", data[2:])[1]
            assert rep in (1, 3), hex(rep)
        return tflags

    # transmission
    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        cookie: int = 1,
        payload: bytes = b"",
        magic: int = REQUEST_MAGIC,
    ) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        return error, cookie

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", self.recv_exactly(20))
        assert magic == STRUCTURED_MAGIC, hex(magic)
        return flags, kind, cookie, self.recv_exactly(length)

    def structured_reply(self) -> list[tuple[int, int, bytes]]:
        """Chunks (type, cookie, payload) up to and including the DONE one."""
        out = []
        while True:
            flags, kind, cookie, payload = self.chunk()
            out.append((kind, cookie, payload))
            if flags & 1:
                return out

    def error_of(self, chunks: list[tuple[int, int, bytes]]) -> int:
        """The error of a one-chunk structured reply (0 for NONE)."""
        ((kind, _, payload),) = chunks
        if kind == 0:
            return 0
        assert kind == 0x8001, kind
        error, msglen = struct.unpack(">IH", payload[:6])
        assert len(payload) == 6 + msglen
        return error


def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_context_data(name: str, queries: tuple[str, ...]) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out
