"""``qcow2-nbd``: serve one image over NBD, with qemu-nbd's options where they fit.

Start-up order matters for scripts: the image is opened and the socket bound
before anything reports success, so ``--fork`` returns (and ``--pid-file``
appears) only when clients can connect, and a bad image fails the command.
The event loop and the server (asyncio alone is a third of the start-up
time) are imported after that: clients that connect meanwhile wait in the
listen backlog, as they would for a busy accept loop.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import qcow2
from qcow2.hostfile import HostFile
from qcow2.opening import confined_opener

if TYPE_CHECKING:
    import asyncio

    from .overlays import ClientOverlays
    from .tls import TlsConfig

from .export import Export
from .exportspec import (
    ExportSpec,
    check_bitmap_name,
    check_exports,
    parse_export,
    parse_load_snapshot,
    unique,
)
from .systemd import inherited_listener, notify

log = logging.getLogger("nbdserver")

DEFAULT_PORT = 10809


PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions."
)


class StartupError(Exception):
    """Start-up failed for a reason the user can fix; printed as one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qcow2-nbd", description="Export a qcow2 or raw image over NBD.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-k", "--socket", metavar="PATH", help="listen on this Unix socket")
    p.add_argument("-b", "--bind", metavar="ADDR", help="TCP address to listen on (default 127.0.0.1)")
    where.add_argument("-p", "--port", type=int, metavar="PORT", help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", help="export name (default: empty)")
    p.add_argument("-D", "--description", default="", metavar="TEXT", help="export description")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only (default: read-write)")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), help="image format (default: probe)")
    p.add_argument(
        "-B",
        "--bitmap",
        action="append",
        default=[],
        metavar="NAME",
        help="export this persistent dirty bitmap as qemu:dirty-bitmap:NAME (repeatable)",
    )
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="with -r: serve even while another process writes the image (as qemu-img -U)",
    )
    p.add_argument(
        "-e",
        "--shared",
        type=int,
        default=0,
        metavar="N",
        help="serve at most N clients at once (default 0: unlimited)",
    )
    p.add_argument(
        "-t",
        "--persistent",
        action="store_true",
        help="accepted for qemu-nbd compatibility: the server always outlives its clients",
    )
    p.add_argument(
        "--confine",
        action="append",
        default=[],
        metavar="DIR",
        help="backing and data files must lie under DIR (repeatable; symlinks resolved)",
    )
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="require TLS; DIR holds ca-cert.pem, server-cert.pem, server-key.pem (as QEMU's tls-creds-x509)",
    )
    p.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="with --tls-creds: clients need a CA-signed certificate",
    )
    p.add_argument(
        "--tls-authz",
        action="append",
        default=[],
        metavar="DN",
        help="with --tls-creds: only clients whose certificate has this subject (CN=...,O=...); repeatable",
    )
    p.add_argument("--tls-psk", metavar="FILE", help="TLS with pre-shared keys (needs Python 3.13 or newer)")
    p.add_argument(
        "--handshake-limit",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="drop clients that have not finished negotiating after this long (default 10; 0: never)",
    )
    p.add_argument(
        "-A",
        "--allocation-depth",
        action="store_true",
        help="accepted for qemu-nbd compatibility: qemu:allocation-depth is always offered",
    )
    p.add_argument(
        "--discard",
        choices=("ignore", "unmap"),
        default="unmap",
        help="unmap (default): TRIM frees space; ignore (qemu-nbd's default): TRIM does nothing",
    )
    p.add_argument(
        "--detect-zeroes",
        choices=("off", "on", "unmap"),
        default="off",
        help="WRITEs of zeros become zero writes (on) or unmapping ones (unmap), as qemu-nbd's",
    )
    p.add_argument(
        "--cache", metavar="MODE", help="accepted for qemu-nbd compatibility (the page cache is used)"
    )
    p.add_argument("--aio", metavar="MODE", help="accepted for qemu-nbd compatibility (threads do the I/O)")
    p.add_argument(
        "-o",
        "--offset",
        type=int,
        default=0,
        metavar="BYTES",
        help="export the image from this byte on (a partition, say), as qemu-nbd -o",
    )
    p.add_argument(
        "-s",
        "--snapshot",
        action="store_true",
        help="writes go to a throwaway qcow2 overlay, dropped at exit (as qemu-nbd -s)",
    )
    p.add_argument(
        "--client-overlays",
        action="store_true",
        help="each client writes into a throwaway qcow2 overlay of its own over IMAGE (never written)",
    )
    p.add_argument(
        "--client-overlay-dir",
        metavar="DIR",
        help="as --client-overlays; other export names are overlays kept in DIR as NAME.qcow2",
    )
    p.add_argument(
        "-l",
        "--load-snapshot",
        metavar="SNAPSHOT",
        help="export this internal snapshot of IMAGE, read-only: an id or a name, or "
        "snapshot.id=ID,snapshot.name=NAME (as qemu-nbd -l)",
    )
    p.add_argument(
        "--exit-after-last",
        action="store_true",
        help="exit once the last client has gone (qemu-nbd's behaviour without -t)",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics over HTTP on HOST:PORT (requests, bytes, errors, latency, clients)",
    )
    p.add_argument("--pid-file", metavar="PATH", help="write the server's pid here once it listens")
    p.add_argument("--fork", action="store_true", help="run in the background once listening")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="SPEC",
        help="another export: name=NAME,file=PATH[,readonly=on|off][,description=TEXT][,format=F]"
        "[,bitmap=B]...[,snapshot=ID_OR_NAME] (repeatable; readonly defaults to -r)",
    )
    p.add_argument("image", nargs="?", help="image file to export (as -x NAME)")
    args = p.parse_args(argv)
    if args.socket and args.bind:
        p.error("-k cannot be combined with -b")
    if args.shared < 0:
        p.error("-e must be 0 or more")
    if (args.tls_verify_peer or args.tls_authz) and not args.tls_creds:
        p.error("--tls-verify-peer and --tls-authz need --tls-creds")
    if args.tls_psk:
        p.error(
            f"--tls-psk: TLS-PSK needs Python 3.13 or newer (this is {sys.version.split()[0]}); "
            "use --tls-creds with x509 certificates"
        )
    if args.detect_zeroes == "unmap" and args.discard != "unmap":
        p.error("--detect-zeroes=unmap needs --discard=unmap")
    if args.offset < 0:
        p.error("--offset must be 0 or more")
    if args.handshake_limit < 0:
        p.error("--handshake-limit must be 0 or more")
    specs = []
    snapshot = None
    if args.load_snapshot is not None:
        if args.image is None:
            p.error("-l names a snapshot of IMAGE; with --export, use snapshot=NAME")
        if args.snapshot:
            p.error("-l cannot be combined with -s (the throwaway overlay has no internal snapshots)")
        if args.bitmap:
            p.error("-l cannot be combined with -B (bitmaps follow the active state, not a snapshot)")
        try:
            snapshot = parse_load_snapshot(args.load_snapshot)
        except ValueError as e:
            p.error(f"{e}; failed in parsing snapshot param `{args.load_snapshot}'")
    if args.image is not None:
        try:
            # qemu-nbd lists its -B bitmaps last first (it prepends each to its list): so do we.
            bitmaps = unique([check_bitmap_name(name) for name in reversed(args.bitmap)])
        except ValueError as e:
            p.error(f"-B: {e}")
        read_only = args.read_only or snapshot is not None  # qemu-nbd: -l implies -r
        specs.append(
            ExportSpec(
                args.export_name, args.image, read_only, args.description, args.format, bitmaps, snapshot
            )
        )
    elif args.bitmap:
        p.error("-B names a bitmap of IMAGE; with --export, use bitmap=NAME")
    for text in args.export:
        try:
            specs.append(parse_export(text, read_only_default=args.read_only))
        except ValueError as e:
            p.error(f"--export {text}: {e}")
    if not specs:
        p.error("an IMAGE or at least one --export is needed")
    try:
        check_exports(specs)
    except ValueError as e:
        p.error(str(e))
    for option in ("cache", "aio"):
        if getattr(args, option):
            log.info(
                "--%s=%s accepted for qemu-nbd compatibility; it changes nothing here",
                option,
                getattr(args, option),
            )
    if args.offset and any(spec.bitmaps for spec in specs):
        p.error("--offset cannot be combined with exported bitmaps")
    if args.client_overlay_dir is not None:
        args.client_overlays = True
    if args.client_overlays:
        clash = [
            option
            for option, given in (
                ("--export", args.export),
                ("-l", args.load_snapshot),
                ("-r", args.read_only),
                ("-s", args.snapshot),
                ("-B", args.bitmap),
                ("--offset", args.offset),
                ("-U", args.force_share),
            )
            if given
        ]
        if clash:
            p.error(f"--client-overlays serves one IMAGE read-write through overlays; not with {clash[0]}")
    if args.force_share and not all(spec.read_only for spec in specs):
        p.error("--force-share needs read-only exports (-r, or readonly=on)")
    args.specs = specs
    args.overlays = None  # --client-overlays: set once the image is open
    return args


def open_exports(args: argparse.Namespace) -> dict[str, Export]:
    """Every export's disk, in order; on a failure the ones opened are closed again."""
    exports: dict[str, Export] = {}
    try:
        if args.client_overlays:
            spec = args.specs[0]
            try:
                args.overlays = open_client_overlays(spec, args)
            except Exception as e:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise StartupError(f"cannot open {spec.file}: {msg}") from None
            exports[spec.name] = args.overlays.template
            return exports
        for spec in args.specs:
            exports[spec.name] = open_export(spec, args)
    except BaseException:
        for export in exports.values():
            close_disk(export.disk, export.name)
        raise
    return exports


def open_client_overlays(spec: ExportSpec, args: argparse.Namespace) -> ClientOverlays:
    """--client-overlays: the image read-only, and a template export whose clients get overlays."""
    from .overlays import ClientOverlays

    fmt = spec.fmt or qcow2.probe_format(spec.file)
    opener = confined_opener(args.confine, spec.file) if args.confine else HostFile
    base = qcow2.open_disk(spec.file, fmt=fmt, read_only=True, opener=opener)
    template = Export(
        spec.name, base, spec.description, detect_zeroes=args.detect_zeroes, unmap=args.discard == "unmap"
    )
    try:
        return ClientOverlays(spec.file, fmt, base, template, args.client_overlay_dir, args.confine)
    except BaseException:
        base.close()
        raise


def open_snapshot(spec: ExportSpec, confine: list[str]) -> qcow2.Disk:
    """qemu-nbd -s: a temporary qcow2 overlay over the image, unlinked once open (gone at exit).

    The image itself is opened read-only under it, and locked so (nobody may write it meanwhile).
    """
    import tempfile

    from qcow2.create import run_create

    fmt = spec.fmt or qcow2.probe_format(spec.file)
    fd, overlay = tempfile.mkstemp(prefix="qcow2-nbd-snapshot-", suffix=".qcow2")
    os.close(fd)
    try:
        run_create(overlay, None, backing=os.path.abspath(spec.file), backing_fmt=fmt, quiet=True)
        opener = confined_opener(confine, spec.file, overlay) if confine else HostFile
        return qcow2.open_disk(overlay, fmt="qcow2", read_only=False, opener=opener)
    finally:
        os.unlink(overlay)


def open_export(spec: ExportSpec, args: argparse.Namespace) -> Export:
    try:
        opener = confined_opener(args.confine, spec.file) if args.confine else HostFile
        if args.snapshot and not spec.read_only:
            disk = open_snapshot(spec, args.confine)
        else:
            disk = qcow2.open_disk(
                spec.file,
                fmt=spec.fmt,
                read_only=spec.read_only,
                opener=opener,
                force_share=args.force_share,
                snapshot=spec.snapshot,
            )
    except Exception as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StartupError(f"cannot open {spec.file}: {msg}") from None
    if spec.fmt is None and not spec.read_only and isinstance(getattr(disk, "top", None), HostFile):
        # QEMU's raw driver says this whenever it opens a probed raw image writable; so do we.
        print(PROBED_RAW_WARNING.format(file=spec.file), file=sys.stderr, flush=True)
    if args.offset:
        from qcow2.window import DiskWindow

        try:
            disk = DiskWindow(disk, args.offset)
        except ValueError as e:
            disk.close()
            raise StartupError(f"{spec.file}: --offset: {e}") from None
    try:
        bitmaps = [disk.bitmap(name) for name in spec.bitmaps]
    except qcow2.BitmapError as e:
        disk.close()
        raise StartupError(f"{spec.file}: {e}") from None
    return Export(
        spec.name,
        disk,
        spec.description,
        multi_conn=args.shared != 1,
        detect_zeroes=args.detect_zeroes,
        unmap=args.discard == "unmap",
        bitmaps=bitmaps,
    )


def start_metrics(address: str | None) -> object:
    """The metrics HTTP server, listening before we report that we do (or None without --metrics)."""
    if not address:
        return None
    from .metrics import PrometheusMetrics, parse_address

    try:
        host, port = parse_address(address)
        return PrometheusMetrics(host, port)
    except (ValueError, OSError) as e:
        raise StartupError(f"--metrics {address}: {e}") from None


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS settings, their certificates loaded once now so that a bad file fails the start."""
    if not args.tls_creds:
        return None
    from pathlib import Path  # not at start-up: it costs more than the rest of the command line

    from .tls import TlsConfig, TlsSetupError  # ssl: loaded only when TLS is asked for

    try:
        config = TlsConfig(Path(args.tls_creds), verify_peer=args.tls_verify_peer, authz=list(args.tls_authz))
        config.context()
    except TlsSetupError as e:
        raise StartupError(str(e)) from None
    return config


def listen(args: argparse.Namespace) -> socket.socket:
    try:
        if args.socket:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(args.socket).st_mode):
                    os.unlink(args.socket)  # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(args.socket)
        else:
            host = args.bind or "127.0.0.1"
            port = DEFAULT_PORT if args.port is None else args.port
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        where = args.socket or f"{args.bind or '127.0.0.1'}:{args.port or DEFAULT_PORT}"
        raise StartupError(f"cannot listen on {where}: {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock


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
    if _early_stop:
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


_early_stop: list[int] = []


def _stop_early(signum: int, frame: object) -> None:
    _early_stop.append(signum)


def _daemonize() -> int:
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


def _release_caller_stderr() -> None:
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
    ready_fd = _daemonize() if args.fork else -1
    # SIGTERM/SIGINT during start-up stop the server as soon as it serves, cleanly (pid
    # file and socket removed, images closed), before the event loop takes them over.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_early)
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
            _release_caller_stderr()
        notify(f"READY=1\nMAINPID={os.getpid()}")  # Type=notify services: clients can connect
        keep_buffers_on_the_heap()
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


def close_disk(disk: object, image: str) -> bool:
    """Flush and close (clears the dirty bit of lazy-refcount images); False if that failed."""
    try:
        disk.close()
    except Exception as e:
        log.error("closing %s failed: %s", image, e)
        return False
    return True
