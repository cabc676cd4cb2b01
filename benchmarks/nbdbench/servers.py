"""The servers compared: how each is started, stopped and looked at from outside.

    qemu    qemu-nbd as people run it: -t -A -e N, qcow2, default AIO and caches
    tuned   qemu-nbd --aio=io_uring with a 128 MiB L2 cache on every layer
            (--image-opts): the best qemu-nbd we know how to start
    nbdkit  nbdkit's file plugin on the raw equivalent: C and no qcow2, a floor
    ours    qcow2-nbd
    before  qcow2-nbd at an earlier commit (``--before``)

Every server forks once it listens; the time that takes is its start-up time.
CPU time and memory are read from /proc of the server process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CLIENTS = 64  # -e for the servers that take it: room for the 32-client load
L2_CACHE = 128 << 20
TICK = os.sysconf("SC_CLK_TCK")


def qemu_argv(image: Path, writable: bool) -> tuple[list[str], list[str]]:
    argv = ["qemu-nbd", "-t", "-A", "-e", str(CLIENTS), "-f", "qcow2"]
    if writable:
        argv += ["--cache=writeback", "--discard=unmap"]
    return argv + ([] if writable else ["-r"]), [str(image)]


def tuned_argv(image: Path, layers: int) -> tuple[list[str], list[str]]:
    opts = f"driver=qcow2,file.driver=file,file.filename={image},file.aio=io_uring"
    for depth in range(layers):
        opts += f",{'backing.' * depth}l2-cache-size={L2_CACHE}"
    return ["qemu-nbd", "-r", "-t", "-A", "-e", str(CLIENTS)], ["--image-opts", opts]


def status_fields(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@dataclass
class Server:
    label: str
    image: Path  # qcow2 (or raw, for nbdkit)
    rundir: Path
    ours: list[str]  # our server's command (or the earlier commit's)
    writable: bool = False
    layers: int = 1  # of the chain under the image (for tuned's caches)
    pid: int = 0
    started_in: float = 0.0  # seconds from launch to listening
    socket: Path = field(init=False)

    def __post_init__(self) -> None:
        tag = f"{self.label}-{self.image.stem}"
        self.socket = self.rundir / f"{tag}.sock"
        self.pidfile = self.rundir / f"{tag}.pid"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def argv(self) -> list[str]:
        sock, pid = str(self.socket), str(self.pidfile)
        if self.label == "nbdkit":
            return [
                "nbdkit",
                *([] if self.writable else ["-r"]),
                "-U",
                sock,
                "-P",
                pid,
                "file",
                str(self.image),
            ]
        if self.label == "tuned":
            head, tail = tuned_argv(self.image, self.layers)
        elif self.label == "qemu":
            head, tail = qemu_argv(self.image, self.writable)
        else:
            head = [*self.ours, *([] if self.writable else ["-r"]), "-e", str(CLIENTS), "-f", "qcow2"]
            tail = [str(self.image)]
        return [*head, "--fork", "-k", sock, "--pid-file", pid, *tail]

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        t = time.perf_counter()
        # In the run directory: a ``python -m`` server must not pick up modules from our cwd.
        subprocess.run(self.argv(), check=True, timeout=60, stdin=subprocess.DEVNULL, cwd=self.rundir)
        self.started_in = time.perf_counter() - t
        # The parent returns once the socket listens; nbdkit's child writes its
        # pid file a moment later.
        deadline = time.monotonic() + 10
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: no pid in {self.pidfile} once started")
            time.sleep(0.005)
        self.pid = int(self.pidfile.read_text())
        if not self.socket.exists():
            raise RuntimeError(f"{self.label}: started but not listening on {self.socket}")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return status_fields(self.pid)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM: the server closes the image cleanly (and flushes it);
        ``kill``: SIGKILL at once, for an image that is thrown away anyway."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + 60  # closing may write back a lot of data
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid = 0
