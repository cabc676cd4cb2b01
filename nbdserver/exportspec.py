"""``--export`` option values: which files a server exports, under which names.

``name=NAME,file=PATH[,readonly=on|off][,description=TEXT][,format=qcow2|raw][,bitmap=B]...
[,snapshot=ID_OR_NAME]``, QEMU's key=value syntax (a doubled comma is a literal comma);
``bitmap`` may repeat, one ``qemu:dirty-bitmap:B`` context each; ``snapshot`` exports an
internal snapshot, read-only.  Also ``-l`` values (qemu-nbd's ``--load-snapshot``).  Pure:
parsing and the rules a set of exports must follow, tested without files or sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qcow2 import SnapshotRef
from qcow2.qemuopts import split_option_list

_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
KEYS = ("name", "file", "readonly", "description", "format", "bitmap", "snapshot")
_SNAPSHOT_KEYS = ("snapshot.id", "snapshot.name")


@dataclass(frozen=True)
class ExportSpec:
    name: str
    file: str
    read_only: bool = False
    description: str = ""
    fmt: str | None = None
    bitmaps: tuple[str, ...] = ()  # exported as qemu:dirty-bitmap:NAME, in this order
    snapshot: SnapshotRef | None = None  # an internal snapshot instead of the active state


def parse_export(text: str, read_only_default: bool = False) -> ExportSpec:
    """One ``--export`` value; ValueError names what is wrong."""
    fields: dict[str, str] = {}
    bitmaps: list[str] = []
    for part in split_option_list(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not key=value (keys: {', '.join(KEYS)})")
        if key not in KEYS:
            raise ValueError(f"unknown key {key!r} (keys: {', '.join(KEYS)})")
        if key == "bitmap":
            bitmaps.append(check_bitmap_name(value))
            continue
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value
    if "file" not in fields or not fields["file"]:
        raise ValueError("file=PATH is required")
    snapshot = SnapshotRef(id_or_name=fields["snapshot"]) if "snapshot" in fields else None
    read_only = read_only_default or snapshot is not None
    if "readonly" in fields:
        if fields["readonly"] not in _BOOL:
            raise ValueError(f"readonly={fields['readonly']}: on or off")
        read_only = _BOOL[fields["readonly"]]
        if snapshot is not None and not read_only:
            raise ValueError("a snapshot= export is read-only")
    if snapshot is not None and bitmaps:
        raise ValueError("bitmap= cannot be combined with snapshot= (bitmaps follow the active state)")
    fmt = fields.get("format") or None
    if fmt not in (None, "qcow2", "raw"):
        raise ValueError(f"format={fmt}: qcow2 or raw")
    description = fields.get("description", "")
    return ExportSpec(
        fields.get("name", ""), fields["file"], read_only, description, fmt, unique(bitmaps), snapshot
    )


def parse_load_snapshot(text: str) -> SnapshotRef:
    """qemu-nbd's ``-l`` value: ``snapshot.id=ID,snapshot.name=NAME`` (either or both), or an
    id or name; ValueError with qemu-nbd's words."""
    if not text.startswith("snapshot."):
        return SnapshotRef(id_or_name=text)
    fields: dict[str, str] = {}
    for part in split_option_list(text):
        key, sep, value = part.partition("=")
        if key not in _SNAPSHOT_KEYS or not sep:
            raise ValueError(f"Invalid parameter '{key}'")
        fields[key] = value  # QEMU's options: the last one given counts
    return SnapshotRef(ident=fields.get("snapshot.id"), name=fields.get("snapshot.name"))


def check_bitmap_name(name: str) -> str:
    """A name a qcow2 bitmap can have (1 to 1023 bytes of UTF-8)."""
    if not name or len(name.encode("utf-8")) > 1023:
        raise ValueError(f"bitmap name {name!r}: 1 to 1023 bytes")
    return name


def unique(names: list[str]) -> tuple[str, ...]:
    """Each name once, first come first (qemu-nbd lists a twice-given bitmap twice; one context
    per bitmap is what a client can tell apart)."""
    return tuple(dict.fromkeys(names))


def check_exports(specs: list[ExportSpec]) -> None:
    """Names unique; a file written in one export only (one driver per image file: two writers of
    one qcow2 file in one process would each keep their own metadata and corrupt it).  Read-only
    exports may share a file (the active state beside its snapshots, say)."""
    names: set[str] = set()
    files: dict[tuple[int, int] | str, ExportSpec] = {}
    for spec in specs:
        if spec.name in names:
            raise ValueError(f"export name {spec.name!r} used twice")
        names.add(spec.name)
        for text, what in ((spec.name, "export name"), (spec.description, "description")):
            if len(text.encode()) > 4096:
                raise ValueError(f"{what} longer than 4096 bytes")
        try:
            st = os.stat(spec.file)
            key: tuple[int, int] | str = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.realpath(spec.file)  # opening will say what is wrong with it
        if key in files and not (spec.read_only and files[key].read_only):
            raise ValueError(
                f"{spec.file}: already exported as {files[key].name!r}; one image file, one export "
                "(unless every export of it is read-only)"
            )
        files[key] = spec
