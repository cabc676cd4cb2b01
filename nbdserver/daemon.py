"""Process matters of a server: going to the background, signals before the loop, the heap.

``--fork`` forks early; the parent waits on a pipe for the child's verdict
(ready, or the start-up error to print) and exits with it, so the command
returns only once clients can connect.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import sys

stop_requested: list[int] = []  # SIGTERM/SIGINT that came before the event loop took them over


def _stop_early(signum: int, frame: object) -> None:
    stop_requested.append(signum)


def catch_stop_signals() -> None:
    """From now on SIGTERM/SIGINT only ask the server to stop (:data:`stop_requested`):
    one that comes during start-up stops it as soon as it serves, cleanly (pid file and
    socket removed, images closed), instead of killing it outright."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_early)


def daemonize() -> int:
    """Fork; the parent waits for the child's start-up verdict and exits with it.

    Returns the write end of the pipe in the child.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            verdict = r.read()
        if verdict[:1] == b"\0":
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        msg = verdict.decode(errors="replace").strip() or f"server failed to start (status {status})"
        print(f"qcow2-nbd: {msg}", file=sys.stderr)
        os._exit(1)
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return wfd


def release_caller_stderr() -> None:
    """Once in the background: a pipe as stderr goes to /dev/null (as qemu-nbd's does).

    Otherwise a caller that captures the command's output (``$(qcow2-nbd
    --fork ...)``, subprocess with pipes) would wait for the server to exit.
    Files and terminals keep the log.
    """
    try:
        kind = stat.S_IFMT(os.fstat(2).st_mode)
    except OSError:
        return
    if kind in (stat.S_IFIFO, stat.S_IFSOCK):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def keep_buffers_on_the_heap() -> None:
    """Serve request buffers (up to 32 MiB) from the heap and keep freed memory.

    glibc hands out big blocks with mmap and returns them with munmap, so every
    READ/WRITE buffer would cost a map, a page fault per 4 KiB and an unmap;
    reusing heap memory avoids all three.  Best effort: other libcs lack mallopt.
    """
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (no ldconfig run)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_top_pad, 16 << 20)
