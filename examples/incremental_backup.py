#!/usr/bin/python3
"""Full and incremental backups of a qcow2-nbd export, and their restore, with libnbd.

    # the disk not in use: a bitmap that records every write from now on
    incremental_backup.py rotate vm.qcow2 b1
    qcow2-nbd --fork -k /run/vm.sock --pid-file /run/vm.pid -B b1 vm.qcow2
    incremental_backup.py full 'nbd+unix:///?socket=/run/vm.sock' 0-full.qcow2

    # later, for each incremental: a short stop to start the next bitmap (and drop
    # the one before last), then the backup of what the current one recorded
    kill $(cat /run/vm.pid)
    incremental_backup.py rotate vm.qcow2 b2 [b0]
    qcow2-nbd --fork -k /run/vm.sock --pid-file /run/vm.pid -B b1 vm.qcow2
    incremental_backup.py incremental 'nbd+unix:///?socket=/run/vm.sock' b1 0-full.qcow2 1-inc.qcow2

    # a new disk from the backups, applied in order
    incremental_backup.py restore restored.qcow2 0-full.qcow2 1-inc.qcow2 ...

The full backup asks for ``base:allocation`` and copies only what holds
data: what reads as zero is neither read nor written.  An incremental asks
for ``qemu:dirty-bitmap:NAME`` (exported by ``qcow2-nbd -B NAME``; flag 1 =
dirty) beside it and copies only the dirty extents, again skipping what
reads as zero.  The bitmap must have been started before the backup it
follows began to read, so nothing written meanwhile is missed: ``rotate``
adds the next bitmap while the server is stopped, before the backup of the
current one (writes during a backup land in both; the next incremental
copies them again, which is safe).  Each command prints one JSON line of
byte counts: ``scope`` (bytes the backup looked at: the disk, or the dirty
extents), ``read`` (bytes read from the export) and ``zero`` (bytes that
read as zero, recorded without reading).

Backups are qcow2 files, each incremental backed by the backup before it.
That is what backup tools write (oVirt's imageio, virtnbdbackup's
restores, libvirt's pull-mode clients) because an incremental must tell
three things apart per range: new data, now zero, unchanged.  A raw sparse
file can only say data or zero (a hole reads as zero), so it cannot hold an
incremental without a side table of extents; a qcow2 overlay says all
three natively (data clusters, zero clusters, unallocated = see the backup
before), and the chain of backups is itself an image of the latest state
(``qemu-img convert 2-inc.qcow2 disk.raw``).  The files are created with
``qcow2 create`` and written through our own server over NBD, the protocol
the data is read with, so this script never parses qcow2.

``restore`` applies the backups in order onto a new image: of each one,
what its own layer holds (``qemu:allocation-depth`` 1), data copied, zeros
written as zeros -- what a tool does when the backups are kept apart or
only some of them are applied (a restore to an earlier point).

Needs Debian's python3-libnbd (``import nbd``): run it with /usr/bin/python3
or the project's venv.  The servers and ``qcow2`` commands it starts run
from this checkout, with its ``.venv`` python when there is one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
from map_remote import walk

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4 << 20  # bytes per read and write request
ZERO_CHUNK = 1 << 30  # bytes per write-zeroes request (NBD lengths are 32-bit)
DEPTH = "qemu:allocation-depth"
ALLOCATION = "base:allocation"


# -- the project's tools, from this checkout ----------------------------------------------


def _module(name: str) -> list[str]:
    venv = REPO / ".venv" / "bin" / "python"
    return [str(venv) if venv.exists() else sys.executable, "-m", name]


def _run(argv: list[str]) -> None:
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    done = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr.strip() or f"{argv[:3]} failed")


@contextmanager
def served(image: str, *opts: str) -> Iterator[str]:
    """``image`` served by qcow2-nbd on a private socket, for as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix="backup-") as d:
        sock, pidfile = os.path.join(d, "nbd.sock"), os.path.join(d, "pid")
        _run([*_module("nbdserver"), *opts, "-f", "qcow2", "-k", sock, "--fork", "--pid-file", pidfile,
              image])  # fmt: skip
        pid = int(Path(pidfile).read_text())
        try:
            yield f"nbd+unix:///?socket={sock}"
        finally:
            _stop(pid)


def _stop(pid: int) -> None:
    """SIGTERM, then wait for the exit (the server writes everything back and closes the file
    first): a pidfd, readable once the process has exited, reaped or not."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        select.select([fd], [], [])
    finally:
        os.close(fd)


def connect(uri: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    for c in contexts:
        if not h.can_meta_context(c):
            h.shutdown()
            hint = " (serve the image with -B NAME)" if "dirty" in c else ""
            raise SystemExit(f"{uri} does not offer {c}{hint}")
    return h


# -- extents ---------------------------------------------------------------------------


def pieces(size: int, *runs: list[list[int]]) -> Iterator[tuple[int, int, list[int]]]:
    """(offset, length, one value per context) over the boundaries of every context's runs."""
    at = [0] * len(runs)
    pos = 0
    while pos < size:
        values, end = [], size
        for k, r in enumerate(runs):
            while r[at[k]][0] + r[at[k]][1] <= pos:
                at[k] += 1
            values.append(r[at[k]][2])
            end = min(end, r[at[k]][0] + r[at[k]][1])
        yield pos, end - pos, values
        pos = end


def zero(dst: nbd.NBD, offset: int, length: int) -> None:
    for o in range(offset, offset + length, ZERO_CHUNK):
        dst.zero(min(ZERO_CHUNK, offset + length - o), o)


def copy(src: nbd.NBD, dst: nbd.NBD, offset: int, length: int, over_backing: bool) -> None:
    """Data from ``src`` to ``dst``; a chunk that reads all zero is written as zeros only when it
    must hide what a backing file has there, else left out (the new file reads zero)."""
    for o in range(offset, offset + length, CHUNK):
        buf = src.pread(min(CHUNK, offset + length - o), o)
        if buf.count(0) != len(buf):
            dst.pwrite(buf, o)
        elif over_backing:
            zero(dst, o, len(buf))


# -- the commands ------------------------------------------------------------------------


def backup(uri: str, target: str, bitmap: str | None = None, previous: str | None = None) -> dict:
    """A full backup (no bitmap) or the dirty extents of ``bitmap`` over ``previous``."""
    contexts = [ALLOCATION] + ([f"qemu:dirty-bitmap:{bitmap}"] if bitmap else [])
    src = connect(uri, *contexts)
    counts = {"backup": target, "scope": 0, "read": 0, "zero": 0}
    try:
        size = src.get_size()
        runs = walk(src, size, contexts)
        backing = []
        if previous:  # named relative to the new backup, so that the backups can move together
            backing = ["-b", os.path.relpath(previous, os.path.dirname(target) or "."), "-F", "qcow2"]
        _run([*_module("qcow2"), "create", "-q", "-f", "qcow2", *backing, target, str(size)])
        with served(target) as target_uri:
            dst = connect(target_uri)
            for offset, length, (allocation, *dirty) in pieces(size, *(runs[c] for c in contexts)):
                if dirty and not dirty[0] & 1:
                    continue  # clean: the backup before has it
                counts["scope"] += length
                if allocation & nbd.STATE_ZERO:
                    counts["zero"] += length
                    if previous:
                        zero(dst, offset, length)
                    continue
                counts["read"] += length
                copy(src, dst, offset, length, over_backing=previous is not None)
            dst.flush()
            dst.shutdown()
    finally:
        src.shutdown()
    return counts


def restore(target: str, backups: list[str]) -> dict:
    """A new image holding what the backups hold, each applied over the ones before."""
    counts = {"restore": target, "read": 0, "zero": 0}
    with served(backups[0], "-r") as uri:
        h = connect(uri)
        size = h.get_size()
        h.shutdown()
    _run([*_module("qcow2"), "create", "-q", "-f", "qcow2", target, str(size)])
    with served(target) as target_uri:
        dst = connect(target_uri)
        for index, image in enumerate(backups):
            with served(image, "-r") as uri:
                src = connect(uri, ALLOCATION, DEPTH)
                try:
                    runs = walk(src, size, [ALLOCATION, DEPTH])
                    for offset, length, (allocation, depth) in pieces(size, runs[ALLOCATION], runs[DEPTH]):
                        if depth != 1:
                            continue  # not in this backup: the ones before have it
                        if allocation & nbd.STATE_ZERO:
                            counts["zero"] += length
                            if index:  # over what the backups before wrote
                                zero(dst, offset, length)
                        else:
                            counts["read"] += length
                            copy(src, dst, offset, length, over_backing=index > 0)
                finally:
                    src.shutdown()
        dst.flush()
        dst.shutdown()
    return counts


def rotate(image: str, new: str, old: str | None = None) -> dict:
    """The server stopped: bitmap ``new`` starts recording, ``old`` (used up) goes."""
    _run([*_module("qcow2"), "bitmap", "--add", image, new])
    if old:
        _run([*_module("qcow2"), "bitmap", "--remove", image, old])
    return {"image": image, "added": new, "removed": old}


USAGE = """usage:
  incremental_backup.py full URI BACKUP
  incremental_backup.py incremental URI BITMAP PREVIOUS_BACKUP BACKUP
  incremental_backup.py rotate IMAGE NEW_BITMAP [OLD_BITMAP]
  incremental_backup.py restore NEW_IMAGE FULL_BACKUP [INCREMENTAL...]"""


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "full" and len(args) == 2:
        result = backup(args[0], args[1])
    elif command == "incremental" and len(args) == 4:
        result = backup(args[0], args[3], bitmap=args[1], previous=args[2])
    elif command == "rotate" and len(args) in (2, 3):
        result = rotate(*args)
    elif command == "restore" and len(args) >= 2:
        result = restore(args[0], args[1:])
    else:
        print(USAGE, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
