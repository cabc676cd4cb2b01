"""Opening: from a path to a layer (an image and its whole chain) or to a disk.

This is where a chain is assembled: the format probed, cluster 0 parsed, the
metadata read, the external data file and the backing chain opened (backing
files always read-only).  Opening for writing also repairs a dirty image
(what QEMU does: ``check -r all``) and attaches the writer.  The image
classes themselves only read.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .chain import ChainDisk, RawWriter, close_chain
from .errors import ImageError
from .format import layout as L
from .format.header import Header, parse_header
from .hostfile import HostFile
from .image import Qcow2Image
from .metadata.owner import ImageMetadata
from .status import Layer

MAX_CHAIN_DEPTH = 64
FileOpener = Callable[..., HostFile]  # (filename, writable) -> HostFile


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
    filename: str, fmt: str | None = None, writable: bool = False, opener: FileOpener = HostFile
) -> Layer:
    """One image as a layer, its backing chain under it.

    The format probe reads through the same file as the image, as QEMU's
    does, so the page cache sees QEMU's access pattern.
    """
    file = open_host_file(filename, writable, opener)
    if fmt is None:
        fmt = _probe(file)
    if fmt == "raw":
        return file
    if fmt == "qcow2":
        return open_qcow2(filename, file, writable, opener=opener)
    file.close()
    raise ValueError(f"unknown image format {fmt!r} (expected qcow2 or raw)")


def open_disk(
    filename: str, fmt: str | None = None, read_only: bool = True, opener: FileOpener = HostFile
) -> ChainDisk:
    """``filename`` with its whole backing chain as one disk, writable unless ``read_only``.

    ``opener`` makes the host files (tests pass one that records or delays I/O).
    """
    top = open_layer(filename, fmt, writable=not read_only, opener=opener)
    if read_only:
        return ChainDisk(top)
    try:
        if isinstance(top, HostFile):
            disk = ChainDisk(top, RawWriter(top, probed=fmt is None))
            if fmt is None:
                disk.min_block_size = 512  # QEMU's alignment for a probed raw image
            return disk
        if top.header.dirty:
            # QEMU's open of a dirty image: check -r all, then trust the (new) refcounts.
            from .check.dirty import repair_dirty_image  # only a writable, dirty image needs it

            repair_dirty_image(top.meta)
        from .write import Qcow2Writer  # read-only exports never load the write side

        return ChainDisk(top, Qcow2Writer(top))
    except BaseException:
        close_chain(top)
        raise


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
    filename: str, file: HostFile, writable: bool = False, depth: int = 0, opener: FileOpener = HostFile
) -> Qcow2Image:
    """A qcow2 image over ``file``, with its data file and backing chain.

    Reads happen in QEMU's order and sizes (header page, L1, refcount table,
    snapshots, bitmaps, then the backing file): the kernel's readahead then
    caches the same pages QEMU's would.
    """
    if depth > MAX_CHAIN_DEPTH:
        file.close()
        raise ImageError(f"{filename}: backing chain deeper than {MAX_CHAIN_DEPTH} (a loop?)")
    data_file = backing = None
    try:
        header = parse_header(read_cluster0(file), filename)
        if writable and header.corrupt:
            raise ImageError(f"{filename}: image is corrupt; cannot be opened read/write")
        meta = ImageMetadata(filename, file, header)
        data_file = _open_data_file(filename, header, writable, opener)
        meta.data_file = data_file
        backing = _open_backing(filename, header, depth, opener)
        return Qcow2Image(filename, meta, data_file, backing)
    except BaseException:
        for layer in (file, data_file):
            if layer is not None:
                layer.close()
        close_chain(backing)
        raise


def _open_data_file(filename: str, h: Header, writable: bool, opener: FileOpener) -> HostFile | None:
    if not h.has_data_file:
        return None
    if not h.data_file:
        raise ImageError(f"{filename}: the image needs an external data file but names none")
    path = os.path.join(os.path.dirname(filename), h.data_file)
    try:
        return opener(path, writable)
    except OSError as e:
        raise ImageError(f"{filename}: cannot open data file {path}: {e.strerror}") from None


def _open_backing(filename: str, h: Header, depth: int, opener: FileOpener) -> Layer | None:
    if not h.backing_file:
        return None
    name = h.backing_file
    path = os.path.join(os.path.dirname(filename), name)
    if ":" in name.split("/", 1)[0] and not os.path.exists(path):
        raise ImageError(f"{filename}: backing file {name!r} uses a protocol we do not support")
    if not os.path.exists(path):
        raise ImageError(f"{filename}: backing file {path} does not exist")
    try:
        file = opener(path, False)
    except OSError as e:
        raise ImageError(f"{filename}: cannot open backing file {path}: {e.strerror}") from None
    fmt = h.backing_format or _probe(file)
    if fmt == "raw":
        return file
    if fmt == "qcow2":
        return open_qcow2(path, file, depth=depth + 1, opener=opener)
    file.close()
    raise ImageError(f"{filename}: backing file format {fmt!r} is not supported")
