"""``qcow2-nbd``: serve one image over NBD, with qemu-nbd's options where they fit.

Start-up order matters for scripts: the image is opened and the socket bound
before anything reports success, so ``--fork`` returns (and ``--pid-file``
appears) only when clients can connect, and a bad image fails the command.
The event loop and the server (asyncio alone is a third of the start-up
time) are imported after that: clients that connect meanwhile wait in the
listen backlog, as they would for a busy accept loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import daemon
from .cmdline import parse_args
from .export import Export
from .startup import StartupError, close_disk, listen, open_exports, start_metrics, tls_config
from .systemd import inherited_listener, notify

if TYPE_CHECKING:
    import asyncio

    from .overlays import ClientOverlays
    from .tls import TlsConfig

log = logging.getLogger("nbdserver")


def new_event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it imports (faster transports), the standard loop otherwise."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        log.info("event loop: asyncio")
        return asyncio.new_event_loop
    log.info("event loop: uvloop")
    return uvloop.new_event_loop


async def serve(
    exports: dict[str, Export],
    listener: socket.socket,
    max_clients: int,
    handshake_limit: float = 10.0,
    tls: TlsConfig | None = None,
    exit_after_last: bool = False,
    metrics: object = None,
    overlays: ClientOverlays | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or the last client gone), then finish the requests in flight."""
    import asyncio

    from .server import Server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if daemon.stop_requested:
        stop.set()  # a signal came during start-up
    server = Server(
        exports,
        max_clients=max_clients,
        handshake_limit=handshake_limit,
        tls=tls,
        metrics=metrics,
        overlays=overlays,
    )
    if exit_after_last:
        server.on_last_client_gone = stop.set
    accepting = asyncio.create_task(server.accept_loop(listener))
    await stop.wait()
    log.info("shutting down")
    accepting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await accepting
    listener.close()
    await server.shutdown()


def _load_map_code() -> None:
    """Import the block-status code (numpy) once listening: start-up does not wait for it,
    and the first map does not pay for it unless it comes within a tenth of a second."""
    import qcow2.extentmap  # noqa: F401

    from . import blockstatus  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="qcow2-nbd[%(process)d]: %(levelname)s: %(message)s")
    for option, value in (("cache", args.cache), ("aio", args.aio)):
        if value:
            log.info("--%s=%s accepted for qemu-nbd compatibility; it changes nothing here", option, value)
    ready_fd = daemon.daemonize() if args.fork else -1
    daemon.catch_stop_signals()
    listener = None
    activated = False
    exports: dict[str, Export] = {}
    pid_written = False
    try:
        try:
            exports = open_exports(args)
            tls = tls_config(args)
            metrics = start_metrics(args.metrics)
            listener = inherited_listener()  # systemd socket activation
            activated = listener is not None
            if listener is None:
                listener = listen(args)
            if args.pid_file:
                try:
                    with open(args.pid_file, "w") as f:
                        f.write(f"{os.getpid()}\n")
                except OSError as e:
                    raise StartupError(f"cannot write {args.pid_file}: {e.strerror}") from None
                pid_written = True
        except StartupError as e:
            if ready_fd >= 0:
                os.write(ready_fd, str(e).encode())
            else:
                print(f"qcow2-nbd: {e}", file=sys.stderr)
            return 1
        if listener.family == socket.AF_UNIX:
            where = listener.getsockname() or args.socket or "a Unix socket"
        else:
            host, port = listener.getsockname()[:2]
            where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if activated:
            where += " (from systemd)"
        for spec in args.specs:
            what = spec.file if spec.snapshot is None else f"{spec.file} (snapshot {spec.snapshot})"
            log.info("serving %s (%d bytes) as %r on %s", what, exports[spec.name].size, spec.name, where)
        if ready_fd >= 0:
            os.write(ready_fd, b"\0")
            os.close(ready_fd)
            ready_fd = -1
            daemon.release_caller_stderr()
        notify(f"READY=1\nMAINPID={os.getpid()}")  # Type=notify services: clients can connect
        daemon.keep_buffers_on_the_heap()
        if any(export.disk.can_extents for export in exports.values()):
            threading.Thread(target=_load_map_code, name="nbd-warm-up", daemon=True).start()
        import asyncio  # only now: see the module's docstring

        with asyncio.Runner(loop_factory=new_event_loop_factory()) as runner:
            runner.run(
                serve(
                    exports,
                    listener,
                    args.shared,
                    args.handshake_limit,
                    tls,
                    args.exit_after_last,
                    metrics,
                    args.overlays,
                )
            )
        # Every request has finished: flush and mark the images clean before
        # the pid file goes, so "pid file gone" means "image safe to open".
        closing, exports = exports, {}
        ok = True
        for spec in args.specs:
            ok = close_disk(closing[spec.name].disk, spec.file) and ok
            log.info("closed %s", spec.file)
        if args.overlays is not None:
            overlays, args.overlays = args.overlays, None
            ok = close_disk(overlays, args.specs[0].file) and ok
        return 0 if ok else 1
    finally:
        if ready_fd >= 0:
            os.close(ready_fd)
        if listener is not None:
            listener.close()
            if args.socket and not activated:  # systemd's socket is systemd's to remove
                with contextlib.suppress(OSError):
                    os.unlink(args.socket)
        for export in exports.values():
            close_disk(export.disk, export.name)
        if args.overlays is not None:
            close_disk(args.overlays, args.specs[0].file)
        if pid_written:
            with contextlib.suppress(OSError):
                os.unlink(args.pid_file)

