"""qcow2 driver: read qcow2 v2/v3 images and their backing chains.

Knows nothing of the network; :func:`open_disk` returns a
:class:`~qcow2.device.Disk` that the NBD server exports.
"""

from __future__ import annotations

from .device import Disk, Extent
from .disk import ChainDisk

__all__ = ["Disk", "Extent", "open_disk", "open_layer"]

QCOW2_MAGIC = b"QFI\xfb"


def probe_format(filename: str) -> str:
    from .image import open_host_file

    file = open_host_file(filename)
    try:
        return "qcow2" if file.pread(0, 4) == QCOW2_MAGIC else "raw"
    finally:
        file.close()


def open_layer(filename: str, fmt: str | None = None, writable: bool = False):
    """Open one image (and, for qcow2, its backing chain) as a layer.

    The format probe reads through the same file as the image, as QEMU's
    does, so the page cache sees QEMU's access pattern.
    """
    from .image import Qcow2Image, open_host_file

    file = open_host_file(filename, writable)
    if fmt is None:
        fmt = "qcow2" if file.pread(0, 4) == QCOW2_MAGIC else "raw"
    if fmt == "raw":
        return file
    if fmt == "qcow2":
        return Qcow2Image.open(filename, writable, file=file)
    file.close()
    raise ValueError(f"unknown image format {fmt!r} (expected qcow2 or raw)")


def open_disk(filename: str, fmt: str | None = None, read_only: bool = True) -> Disk:
    """Open ``filename`` with its whole backing chain as one disk."""
    return ChainDisk(open_layer(filename, fmt, writable=not read_only), read_only=read_only)
