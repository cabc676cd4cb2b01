"""``qcow2 snapshot``: list, create, delete and apply internal snapshots, as ``qemu-img snapshot``.

The listing is qemu-img's table byte for byte (QEMU pads by bytes, so it
is built as bytes); refusals use qemu-img's words.  The work itself is the
metadata owner's (:mod:`qcow2.metadata.snapshots`).
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable, Sequence

from ..format.snapshots import NO_ICOUNT, Snapshot, SnapshotRef, c_string
from ..hostfile import HostFile
from ..metadata import snapshots as snapshot_ops
from ..opening import open_disk
from ..write import Qcow2Writer

NAME_MAX = 255  # qemu-img copies the name into QEMUSnapshotInfo.name[256]
_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


class SnapshotCommandError(Exception):
    """Refused or failed, with the line qemu-img prints (after its ``qemu-img: ``)."""


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits, a binary suffix from 1000 on."""
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    i = int((exponent - 1) / 10)  # C's division: towards zero
    return f"{value / (1 << (i * 10)):.3g} {_SUFFIXES[i]}B"


def _row(sn: Snapshot) -> bytes:
    """One line of QEMU's bdrv_snapshot_dump."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec)).encode()
    nsec = sn.vm_clock_nsec
    secs = nsec // 1_000_000_000
    clock = b"%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60, nsec // 1_000_000 % 1000)
    icount = b""
    if sn.icount != NO_ICOUNT:
        icount = b"%d" % (sn.icount - (1 << 64) if sn.icount >= 1 << 63 else sn.icount)
    ident, name = c_string(sn.raw_id), c_string(sn.raw_name)
    size = size_to_str(sn.vm_state_size).encode()
    return b"%-9s %-16s %8s%20s%13s%11s" % (ident, name, size, date, clock, icount)


def format_list(snapshots: Sequence[Snapshot]) -> bytes:
    """qemu-img snapshot -l's output (nothing at all without snapshots)."""
    if not snapshots:
        return b""
    head = b"%-10s%-17s%8s%20s%13s%11s" % (b"ID", b"TAG", b"VM SIZE", b"DATE", b"VM CLOCK", b"ICOUNT")
    return b"Snapshot list:\n" + head + b"\n" + b"".join(_row(sn) + b"\n" for sn in snapshots)


def _message(action: str, name: str, e: OSError | None) -> str:
    """qemu-img's words for a refused action (``e`` None: the image format has no snapshots)."""
    code = errno.ENOTSUP if e is None else e.errno or errno.EIO
    if action == "create":
        return f"Could not create snapshot '{name}': {-code} ({os.strerror(code)})"
    if action == "delete":
        # qemu-img looks the name up itself first: what is missing is "not found", whatever the driver
        why = "snapshot not found" if e is None or code == errno.ENOENT else e.strerror
        return f"Could not delete snapshot '{name}': {why}"
    if e is None:
        why = "Block driver does not support snapshots"
    else:  # the driver's errno; the block layer's refusal (bitmaps) has its own words
        why = e.strerror if code == errno.EBUSY else f"Failed to load snapshot: {os.strerror(code)}"
    return f"Could not apply snapshot '{name}': {why}"


def _ref(action: str, name: str) -> SnapshotRef | None:
    """qemu-img deletes by name only (bdrv_snapshot_find); apply takes an id or a name."""
    return {"create": None, "delete": SnapshotRef(name=name), "apply": SnapshotRef(id_or_name=name)}[action]


def _act(writer: Qcow2Writer, action: str, name: str) -> None:
    if action == "create":
        now = time.time_ns()  # qemu-img's gettimeofday: microseconds
        writer.create_snapshot(os.fsencode(name)[:NAME_MAX], now // 10**9, now % 10**9 // 1000 * 1000)
    elif action == "delete":
        writer.delete_snapshot(_ref(action, name))
    else:
        writer.apply_snapshot(_ref(action, name))


def run_snapshot(
    image: str,
    action: str,
    name: str | None,
    fmt: str | None = None,
    force_share: bool = False,
    out: Callable[[bytes], object] | None = None,
) -> None:
    """One qemu-img snapshot action on ``image``: ``list`` (written to ``out``), or
    ``create``/``delete``/``apply`` of ``name``.  SnapshotCommandError says why not."""
    if action == "list":
        disk = open_disk(image, fmt, read_only=True, force_share=force_share)
        try:
            top = disk.top
            snapshots = [] if isinstance(top, HostFile) else top.meta.snapshots
            if out is not None:
                out(format_list(snapshots))
        finally:
            disk.close()
        return
    if force_share:
        raise SnapshotCommandError(
            f"Could not open '{image}': force-share=on can only be used with read-only images"
        )
    # A look first, read-only: an image the action refuses is never opened for writing (which
    # would mark its bitmaps in use and store them back).
    disk = open_disk(image, fmt, read_only=True, force_share=True)
    try:
        top = disk.top
        if isinstance(top, HostFile):
            raise SnapshotCommandError(_message(action, name, None))
        snapshot_ops.check(top.meta, action, _ref(action, name))
    except OSError as e:
        raise SnapshotCommandError(_message(action, name, e)) from None
    finally:
        disk.close()
    disk = open_disk(image, fmt, read_only=False)
    try:
        _act(disk.writer, action, name)
    except OSError as e:
        raise SnapshotCommandError(_message(action, name, e)) from None
    finally:
        disk.close()
