"""Start-up: the exports opened, TLS and metrics set up, the socket bound.

Everything here runs before the server reports that it is ready, so every
failure is a :class:`StartupError`: one line for the user, and ``--fork``
returns with it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import stat
import sys
from typing import TYPE_CHECKING

import qcow2
from qcow2.hostfile import HostFile
from qcow2.opening import ConfinedOpener

from .cmdline import DEFAULT_PORT
from .export import Export
from .exportspec import ExportSpec

if TYPE_CHECKING:
    from .overlays import ClientOverlays
    from .tls import TlsConfig

log = logging.getLogger("nbdserver")

PROBED_RAW_WARNING = (
    "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions."
)


class StartupError(Exception):
    """Start-up failed for a reason the user can fix; printed as one line."""


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
    opener = ConfinedOpener(args.confine, spec.file) if args.confine else HostFile
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
        opener = ConfinedOpener(confine, spec.file, overlay) if confine else HostFile
        return qcow2.open_disk(overlay, fmt="qcow2", read_only=False, opener=opener)
    finally:
        os.unlink(overlay)


def open_export(spec: ExportSpec, args: argparse.Namespace) -> Export:
    try:
        opener = ConfinedOpener(args.confine, spec.file) if args.confine else HostFile
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
    writable_top = not (spec.fmt or spec.read_only or args.snapshot)  # -s: the top is the overlay
    if writable_top and qcow2.probe_format(spec.file) == "raw":
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


def close_disk(disk: object, image: str) -> bool:
    """Flush and close (clears the dirty bit of lazy-refcount images); False if that failed."""
    try:
        disk.close()
    except Exception as e:
        log.error("closing %s failed: %s", image, e)
        return False
    return True
