"""``qcow2 bitmap``: qemu-img bitmap's command line, over :class:`qcow2.bitmapedit.BitmapEditor`.

``qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP``: the
operations run on BITMAP in the order given, as qemu-img runs them (a ``--disable``
anywhere makes ``--add`` add a disabled bitmap, as there); its checks and messages
are qemu-img's.  The file is written only once every operation has succeeded.
"""

from __future__ import annotations

import argparse

from ..bitmapedit import BitmapEditor, BitmapRefused
from ..create import parse_size

_SIMPLE = ("add", "remove", "clear", "enable", "disable")


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bitmap", help="add, remove, clear, enable, disable or merge a persistent bitmap")
    for kind in _SIMPLE:
        b.add_argument(f"--{kind}", dest="actions", action="append_const", const=(kind, None))
    b.add_argument(
        "--merge",
        dest="actions",
        action="append",
        type=lambda source: ("merge", source),
        metavar="SOURCE",
        help="merge bitmap SOURCE (of this image, or of -b SOURCE_FILE) into BITMAP",
    )
    b.add_argument("-g", dest="granularity", help="granularity for --add (default: the cluster size, min 4k)")
    b.add_argument("-b", dest="source_file", help="the image --merge reads SOURCE from")
    b.add_argument("-F", dest="source_format", choices=("qcow2", "raw"))
    b.add_argument("-f", "--format", choices=("qcow2", "raw"))
    b.add_argument("args", nargs="*", metavar="FILENAME BITMAP")
    b.set_defaults(func=run_bitmap)


def _granularity(text: str | None) -> int:
    if text is None:
        return 0
    value = parse_size(text)
    if value is None:
        raise ValueError(
            "Invalid granularity specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    return value


def run_bitmap(args: argparse.Namespace) -> int:
    """qemu-img's img_bitmap: the command line checked in its order, then the operations."""
    actions: list[tuple[str, str | None]] = args.actions or []
    kinds = {kind for kind, _ in actions}
    granularity = _granularity(args.granularity)  # parsed with the options, before any check
    if not actions:
        raise ValueError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if granularity and "add" not in kinds:
        raise ValueError("granularity only supported with --add")
    if args.source_format and not args.source_file:
        raise ValueError("-F only supported with -b")
    if args.source_file and "merge" not in kinds:
        raise ValueError("Merge bitmap source file only supported with --merge")
    if len(args.args) != 2:
        raise ValueError("Expecting filename and bitmap name")
    filename, name = args.args
    editor = BitmapEditor(filename, args.format)
    source = None
    try:
        if args.source_file:
            source = BitmapEditor(args.source_file, args.source_format, writable=False)
        for kind, operand in actions:
            try:
                if kind == "add":
                    editor.add(name, granularity, enabled="disable" not in kinds)
                elif kind == "merge":
                    editor.merge(name, operand, source)
                else:
                    getattr(editor, kind)(name)
            except BitmapRefused as e:
                raise ValueError(f"Operation {kind} on bitmap {name} failed: {e}") from None
        editor.commit()
    finally:
        if source is not None:
            source.close()
        editor.close()
    return 0
