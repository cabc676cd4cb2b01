"""The ``qcow2`` command line: ``map``, ``info``, ``check``, ``create``, ``resize``, ``snapshot``,
``bitmap``."""

from __future__ import annotations

import argparse
import json
import sys

from ..chain import close_chain
from ..check import FIX_ERRORS, FIX_LEAKS, run_check_command
from ..create import parse_size, run_create
from ..errors import ImageError
from ..opening import open_disk, open_layer, probe_format
from . import bitmap
from .info import format_info, image_info
from .map import format_human, format_json, map_entries
from .snapshot import SnapshotCommandError, run_snapshot


def _cmd_map(args: argparse.Namespace) -> int:
    top = open_layer(args.image, args.format)
    try:
        if args.output == "json":
            sys.stdout.write(format_json(map_entries(top)))
        else:
            for line in format_human(map_entries(top, human=True)):
                sys.stdout.write(line)
    finally:
        close_chain(top)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    top = open_layer(args.image, args.format)
    try:
        chain = image_info(top)
    finally:
        close_chain(top)
    if args.output == "json":
        json.dump(chain if args.backing_chain else chain[0], sys.stdout, indent=4)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_info(chain if args.backing_chain else chain[:1]))
    return 0


def _size_arg(text: str) -> int:
    size = parse_size(text)
    if size is None:
        raise ValueError(f"invalid size {text!r}: a number with an optional k, M, G, T, P or E suffix")
    return size


def _cmd_resize(args: argparse.Namespace) -> int:
    disk = open_disk(args.image, args.format, read_only=False)
    try:
        text = args.size
        if text[0] in "+-":
            delta = _size_arg(text[1:])
            size = disk.size + delta if text[0] == "+" else disk.size - delta
        else:
            size = _size_arg(text)
        if size % 512:
            raise ValueError("The new size must be a multiple of 512")
        if size < disk.size and not args.shrink:
            raise ValueError("Use the --shrink option to perform a shrink operation.")
        disk.resize(size)
    finally:
        disk.close()
    print("Image resized.")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    if (args.format or probe_format(args.image)) != "qcow2":
        print("qcow2: This image format does not support checks", file=sys.stderr)
        return 63
    fix = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}[args.repair]
    return run_check_command(
        args.image,
        fix,
        args.output,
        out=sys.stdout.write,
        err=lambda line: print(line, file=sys.stderr, flush=True),
        quiet=args.quiet,
    )


def _cmd_snapshot(args: argparse.Namespace) -> int:
    action, name = next(
        ((a, getattr(args, a)) for a in ("create", "delete", "apply") if getattr(args, a) is not None),
        ("list", None),
    )
    try:
        run_snapshot(args.image, action, name, args.format, args.force_share, out=_write_bytes)
    except SnapshotCommandError as e:
        print(f"qcow2: {e}", file=sys.stderr)
        return 1
    return 0


def _write_bytes(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _cmd_create(args: argparse.Namespace) -> int:
    run_create(
        args.image,
        args.size,
        fmt=args.format,
        options=args.options,
        backing=args.backing,
        backing_fmt=args.backing_format,
        unsafe=args.unsafe,
        quiet=args.quiet,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcow2", description="Inspect qcow2 images the way qemu-img does.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("map", help="print the allocation map (same output as qemu-img map)")
    m.add_argument("--output", choices=("human", "json"), default="human")
    m.add_argument("-f", "--format", choices=("qcow2", "raw"))
    m.add_argument("image")
    m.set_defaults(func=_cmd_map)
    i = sub.add_parser("info", help="size, cluster size, version, features, backing chain, data file")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("-f", "--format", choices=("qcow2", "raw"))
    i.add_argument("--backing-chain", action="store_true", help="describe every image of the chain")
    i.add_argument("image")
    i.set_defaults(func=_cmd_info)
    c = sub.add_parser("create", help="create a qcow2 (or raw) image the way qemu-img create does")
    c.add_argument("-f", "--format", default="qcow2", help="qcow2 (default) or raw")
    c.add_argument("-o", dest="options", action="append", default=[], help="options, e.g. cluster_size=64k")
    c.add_argument("-b", "--backing", help="backing file (recorded as given)")
    c.add_argument("-F", "--backing-format", help="backing file format (required with -b)")
    c.add_argument("-u", "--unsafe", action="store_true", help="do not open the backing file")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("image")
    c.add_argument("size", nargs="?", help="virtual size, with optional k/M/G/T/P/E suffix")
    c.set_defaults(func=_cmd_create)
    c = sub.add_parser("check", help="check (and repair) the refcounts and metadata, like qemu-img check")
    c.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair leaks, or everything")
    c.add_argument("--output", choices=("human", "json"), default="human")
    c.add_argument("-f", "--format", choices=("qcow2", "raw"))
    c.add_argument("-q", "--quiet", action="store_true", help="no summary (human output)")
    c.add_argument("image")
    c.set_defaults(func=_cmd_check)
    r = sub.add_parser("resize", help="grow an image, or shrink it when nothing allocated is cut off")
    r.add_argument("-f", "--format", choices=("qcow2", "raw"))
    r.add_argument("--shrink", action="store_true", help="allow a smaller size (no data may be cut off)")
    r.add_argument("image")
    r.add_argument("size", help="new size, or +SIZE / -SIZE")
    r.set_defaults(func=_cmd_resize)
    s = sub.add_parser(
        "snapshot", help="list, create, delete or apply internal snapshots (as qemu-img snapshot)"
    )
    what = s.add_mutually_exclusive_group()
    what.add_argument("-l", dest="list", action="store_true", help="list the snapshots (the default)")
    what.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot of the current state")
    what.add_argument("-d", dest="delete", metavar="NAME", help="delete the (first) snapshot named NAME")
    what.add_argument(
        "-a", dest="apply", metavar="NAME", help="revert the image to a snapshot (an id or a name)"
    )
    s.add_argument("-f", "--format", choices=("qcow2", "raw"))
    s.add_argument(
        "-U", "--force-share", action="store_true", help="-l while another process writes the image"
    )
    s.add_argument("-q", "--quiet", action="store_true", help="accepted for qemu-img compatibility")
    s.add_argument("image")
    s.set_defaults(func=_cmd_snapshot)
    bitmap.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageError, OSError, ValueError) as e:
        message = e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else e
        print(f"qcow2: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
