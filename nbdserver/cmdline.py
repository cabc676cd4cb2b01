"""The ``qcow2-nbd`` command line: qemu-nbd's options where they fit, and the rules between them.

Pure: argv in, a namespace out (``specs``: the exports); a bad combination
ends the command with argparse's usage message, before any file is opened.
"""

from __future__ import annotations

import argparse
import sys

from .exportspec import (
    ExportSpec,
    check_bitmap_name,
    check_exports,
    parse_export,
    parse_load_snapshot,
    unique,
)

DEFAULT_PORT = 10809


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
