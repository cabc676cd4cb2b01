"""Opening: from a path to a layer (an image and its whole chain) or to a disk.

This is where a chain is assembled: the format probed, cluster 0 parsed, the
metadata read, the external data file and the backing chain opened (backing
files always read-only).  Opening for writing also repairs a dirty image
(what QEMU does: ``check -r all``) and attaches the writer.  The image
classes themselves only read.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .chain import ChainDisk, RawWriter, close_chain
from .errors import ImageError, shown
from .format import layout as L
from .format.header import Header, parse_header
from .format.snapshots import SnapshotRef
from .hostfile import PERM_READ, PERM_RESIZE, PERM_WRITE, HostFile
from .image import Qcow2Image
from .metadata import snapshots as snapshot_ops
from .metadata.owner import ImageMetadata
from .status import Layer

if TYPE_CHECKING:
    from .remote import NbdAddress

MAX_CHAIN_DEPTH = 64
FileOpener = Callable[..., HostFile]  # (filename, writable) -> HostFile


class ConfinedOpener:
    """An opener that opens only files under ``directories`` (symlinks resolved), and ``exempt`` ones.

    For servers of images they do not trust: an image names its backing and
    data files, and without this any host file (``/etc/shadow``, ``../..``)
    could be read through a backing file, or written through a data file.
    An NBD backing file is no file under any directory, and would let a hostile
    image make the server connect to any address it can reach: refused too.
    """

    def __init__(self, directories: list[str], *exempt: str) -> None:
        self.roots = [os.path.realpath(d) for d in directories]
        self.allowed = {os.path.realpath(e) for e in exempt}

    def __call__(self, filename: str, writable: bool = False) -> HostFile:
        real = os.path.realpath(filename)
        if real not in self.allowed and not any(os.path.commonpath([real, r]) == r for r in self.roots):
            raise PermissionError(
                errno.EACCES, f"outside the directories files are confined to ({', '.join(self.roots)})"
            )
        return HostFile(filename, writable)


def open_host_file(filename: str, writable: bool = False, opener: FileOpener = HostFile) -> HostFile:
    try:
        return opener(filename, writable)
    except OSError as e:
        raise ImageError(f"{filename}: cannot open: {e.strerror}") from None


def probe_format(filename: str) -> str:
    """'qcow2' or 'raw', by the magic (QEMU's probe, minus formats we do not serve)."""
    file = open_host_file(filename)
    try:
        return _probe(file)
    finally:
        file.close()


def _probe(file: HostFile) -> str:
    return "qcow2" if file.pread(0, 4) == L.MAGIC else "raw"


def open_layer(
    filename: str,
    fmt: str | None = None,
    writable: bool = False,
    opener: FileOpener = HostFile,
    *,
    backing: bool = True,
) -> Layer:
    """One image as a layer, its backing chain under it (none without ``backing``: QEMU's
    BDRV_O_NO_BACKING, for work on the image's own metadata).

    The format probe reads through the same file as the image, as QEMU's
    does, so the page cache sees QEMU's access pattern.
    """
    file = open_host_file(filename, writable, opener)
    if fmt is None:
        fmt = _probe(file)
    if fmt == "raw":
        return file
    if fmt == "qcow2":
        return open_qcow2(filename, file, writable, opener=opener, backing=backing)
    file.close()
    raise ValueError(f"unknown image format {fmt!r} (expected qcow2 or raw)")


def lock_chain(top: Layer, writable: bool, force_share: bool = False, shared: Layer | None = None) -> None:
    """QEMU's permission locks on every file of the chain, as qemu-nbd takes them.

    The writable top (and its data file): consistent read, write and resize,
    denying others write and resize.  Every other file: consistent read,
    denying write and resize (nobody may change what we serve), or denying
    nothing with ``force_share`` (qemu-img's ``-U``; read-only opens only).
    ``shared``: a layer opened (and locked) by someone else; it and what is under it are skipped.
    """
    layer: Layer | None = top
    while layer is not None and layer is not shared:
        files = [layer.file, layer.data_file] if isinstance(layer, Qcow2Image) else [layer]
        for file in files:
            if not isinstance(file, HostFile):
                continue  # none, or an NBD export: the locks are on host files (its server has its own)
            if writable:
                hold, deny = PERM_READ | PERM_WRITE | PERM_RESIZE, PERM_WRITE | PERM_RESIZE
            else:
                hold, deny = PERM_READ, 0 if force_share else PERM_WRITE | PERM_RESIZE
            try:
                file.lock(hold, deny)
            except OSError as e:
                raise ImageError(f"{shown(file.filename)}: {e.strerror}") from None
        writable = False
        layer = layer.backing


def open_disk(
    filename: str,
    fmt: str | None = None,
    read_only: bool = True,
    opener: FileOpener = HostFile,
    *,
    lock: bool = True,
    force_share: bool = False,
    snapshot: SnapshotRef | None = None,
) -> ChainDisk:
    """``filename`` with its whole backing chain as one disk, writable unless ``read_only``.

    ``opener`` makes the host files (tests pass one that records or delays I/O).
    ``lock``: take QEMU's file locks (:func:`lock_chain`), so QEMU and we
    never write an image the other uses.  ``snapshot``: the disk is that
    internal snapshot instead of the active state (read-only).
    """
    if force_share and not read_only:
        raise ValueError("force-share (-U) needs a read-only export")
    if snapshot is not None and not read_only:
        raise ValueError("an internal snapshot is exported read-only")
    top = open_layer(filename, fmt, writable=not read_only, opener=opener)
    try:
        if lock:
            lock_chain(top, writable=not read_only, force_share=force_share)
        if snapshot is not None:
            load_snapshot(top, snapshot)
    except BaseException:
        close_chain(top)
        raise
    if read_only:
        return ChainDisk(top)
    if isinstance(top, HostFile):
        disk = ChainDisk(top, RawWriter(top, probed=fmt is None))
        if fmt is None:
            disk.min_block_size = 512  # QEMU's alignment for a probed raw image
        return disk
    return _writable_qcow2(top)


def _writable_qcow2(top: Qcow2Image, shared: Layer | None = None) -> ChainDisk:
    """A qcow2 top opened for writing, as a disk: repaired first if dirty, then the writer attached."""
    try:
        if top.header.dirty:
            # QEMU's open of a dirty image: check -r all, then trust the (new) refcounts.
            from .check.dirty import repair_dirty_image  # only a writable, dirty image needs it

            repair_dirty_image(top.meta)
        from .write import Qcow2Writer  # read-only exports never load the write side

        return ChainDisk(top, Qcow2Writer(top), shared=shared)
    except BaseException:
        close_chain(top, shared)
        raise


def open_overlay(filename: str, backing: Layer, opener: FileOpener = HostFile) -> ChainDisk:
    """The qcow2 overlay ``filename`` for writing, over ``backing``: a layer already open and shared.

    Many overlays over one golden image (a VM farm) then share its one set of
    files, tables and cache, and closing an overlay leaves the image open.
    The overlay must name that image as its backing file (same file once
    paths are resolved); it is locked for writing, the image is not touched.
    """
    file = open_host_file(filename, True, opener)
    if _probe(file) != "qcow2":
        file.close()
        raise ImageError(f"{shown(filename)}: not a qcow2 image")
    top = open_qcow2(filename, file, writable=True, opener=opener, backing_layer=backing)
    try:
        named = os.path.join(os.path.dirname(filename), top.header.backing_file or "")
        if not top.header.backing_file or os.path.realpath(named) != os.path.realpath(backing.filename):
            raise ImageError(
                f"{shown(filename)}: its backing file is {shown(top.header.backing_file or 'none')}, "
                f"not {shown(backing.filename)}"
            )
        lock_chain(top, writable=True, shared=backing)
    except BaseException:
        close_chain(top, backing)
        raise
    return _writable_qcow2(top, shared=backing)


def load_snapshot(top: Layer, snapshot: SnapshotRef) -> None:
    """The image shows ``snapshot`` instead of its active state (QEMU's snapshot load_tmp):
    the snapshot's L1 table and disk size; its backing chain is the image's."""
    if isinstance(top, HostFile):
        raise ImageError(
            "Failed to load snapshot: Block format 'raw' used by device '' does not support "
            "temporarily loading internal snapshots"
        )
    index = snapshot.find(top.meta.snapshots)
    if index < 0:
        raise ImageError("Failed to load snapshot: Can't find snapshot")
    try:
        size = snapshot_ops.load(top.meta, index)
    except OSError as e:
        raise ImageError(f"Failed to load snapshot: {e.strerror}") from None
    top.size = size // 512 * 512


def read_cluster0(file: HostFile) -> bytes:
    """The header page; the rest of cluster 0 only when extensions or the backing name reach it."""
    first = file.pread(0, 4096)
    cluster_bits = int.from_bytes(first[20:24], "big")
    if first[:4] != L.MAGIC or not 9 <= cluster_bits <= 21:
        return first
    csize = 1 << cluster_bits
    if csize <= 4096:
        return first[:csize]
    version = int.from_bytes(first[4:8], "big")
    backing_end = int.from_bytes(first[8:16], "big") + int.from_bytes(first[16:20], "big")
    pos = int.from_bytes(first[100:104], "big") if version >= 3 else L.V2_HEADER_LENGTH
    while pos + 8 <= 4096:
        ext_type = int.from_bytes(first[pos : pos + 4], "big")
        if ext_type == L.EXT_END:
            break
        pos += 8 + ((int.from_bytes(first[pos + 4 : pos + 8], "big") + 7) & ~7)
    if pos + 8 > 4096 or backing_end > 4096:
        return file.pread(0, csize)
    return first


def open_qcow2(
    filename: str,
    file: HostFile,
    writable: bool = False,
    depth: int = 0,
    opener: FileOpener = HostFile,
    backing: bool = True,
    backing_layer: Layer | None = None,
) -> Qcow2Image:
    """A qcow2 image over ``file``, with its data file and backing chain.

    Reads happen in QEMU's order and sizes (header page, L1, refcount table,
    snapshots, bitmaps, then the backing file): the kernel's readahead then
    caches the same pages QEMU's would.  ``backing``: false leaves the chain
    closed (tools that change only this file); ``backing_layer``: an open layer
    to use as the backing chain instead of opening the one the header names
    (left open if this fails).
    """
    if depth > MAX_CHAIN_DEPTH:
        file.close()
        raise ImageError(f"{filename}: backing chain deeper than {MAX_CHAIN_DEPTH} (a loop?)")
    data_file = below = None
    try:
        header = parse_header(read_cluster0(file), filename)
        if writable and header.corrupt:
            raise ImageError(f"{filename}: image is corrupt; cannot be opened read/write")
        meta = ImageMetadata(filename, file, header)
        if meta.bitmaps.error:
            raise ImageError(f"{filename}: {meta.bitmaps.error}")
        remote = not isinstance(file, HostFile)
        data_file = _open_data_file(filename, header, writable, opener, remote)
        meta.data_file = data_file
        if backing_layer is not None:
            below = backing_layer
        elif backing:
            below = _open_backing(filename, header, depth, opener, remote)
        return Qcow2Image(filename, meta, data_file, below)
    except BaseException:
        for layer in (file, data_file):
            if layer is not None:
                layer.close()
        close_chain(below, backing_layer)
        raise


def _open_data_file(
    filename: str, h: Header, writable: bool, opener: FileOpener, remote: bool = False
) -> HostFile | None:
    if not h.has_data_file:
        return None
    if not h.data_file:
        raise ImageError(f"{filename}: the image needs an external data file but names none")
    if remote:
        raise ImageError(
            f"{shown(filename)}: an image read over NBD may not name a data file (not supported)"
        )
    path = os.path.join(os.path.dirname(filename), h.data_file)
    try:
        return opener(path, writable)
    except OSError as e:
        raise ImageError(f"{shown(filename)}: cannot open data file {shown(path)}: {e.strerror}") from None


def _open_backing(
    filename: str, h: Header, depth: int, opener: FileOpener, remote: bool = False
) -> Layer | None:
    """The backing layer: a host file (raw or qcow2), or an NBD export (see :mod:`qcow2.remote`).

    An image read over NBD may only name another NBD export: a remote image does
    not get to open host files.
    """
    if not h.backing_file:
        return None
    name = h.backing_file
    protocol = ":" in name.split("/", 1)[0]  # a protocol prefix: NBD, or one refused below
    if protocol:
        from .remote import parse_nbd_name  # only images with such a backing name load it

        try:
            found = parse_nbd_name(name)
        except ValueError as e:
            raise ImageError(f"{shown(filename)}: Could not open backing file: {e}") from None
        if found is not None:
            return _open_remote_backing(filename, h, *found, depth, opener)
    if remote and not os.path.isabs(name) and not protocol:
        raise ImageError(f"{shown(filename)}: Cannot generate a base directory for NBD nodes")  # QEMU's words
    if remote:  # QEMU would open it; a remote image does not get to name our host files
        raise ImageError(
            f"{shown(filename)}: an image read over NBD may only name an NBD export as its backing file, "
            f"not {name!r}"
        )
    path = os.path.join(os.path.dirname(filename), name)
    if protocol and not os.path.exists(path):
        raise ImageError(f"{shown(filename)}: backing file {name!r} uses a protocol we do not support")
    if not os.path.exists(path):
        raise ImageError(f"{shown(filename)}: backing file {shown(path)} does not exist")
    try:
        file = opener(path, False)
    except OSError as e:
        raise ImageError(f"{shown(filename)}: cannot open backing file {shown(path)}: {e.strerror}") from None
    fmt = h.backing_format or _probe(file)
    if fmt == "raw":
        return file
    if fmt == "qcow2":
        return open_qcow2(path, file, depth=depth + 1, opener=opener)
    file.close()
    raise ImageError(f"{filename}: backing file format {fmt!r} is not supported")


def _open_remote_backing(
    filename: str, h: Header, address: NbdAddress, json_fmt: str | None, depth: int, opener: FileOpener
) -> Layer:
    """An NBD export as the backing layer: raw guest data, or a qcow2 read over NBD."""
    if isinstance(opener, ConfinedOpener):
        raise ImageError(
            f"{shown(filename)}: backing file {h.backing_file!r} is an NBD export: "
            "refused when files are confined (--confine)"
        )
    from .remote import NbdLayer

    try:
        layer = NbdLayer(address)
    except OSError as e:
        raise ImageError(f"{shown(filename)}: Could not open backing file: {e.strerror}") from None
    try:
        fmt = h.backing_format or json_fmt or _probe(layer)
        if fmt == "raw":
            return layer
        if fmt == "qcow2":
            return open_qcow2(layer.filename, layer, depth=depth + 1, opener=opener)
    except OSError as e:
        layer.close()
        raise ImageError(f"{shown(filename)}: Could not open backing file: {e.strerror}") from None
    except BaseException:
        layer.close()
        raise
    layer.close()
    raise ImageError(f"{filename}: backing file format {fmt!r} is not supported")
