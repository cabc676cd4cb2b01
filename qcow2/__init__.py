"""qcow2 driver: read qcow2 v2/v3 images and their backing chains.

Knows nothing of the network; :func:`open_disk` returns a
:class:`~qcow2.device.Disk` that the NBD server exports.
"""

from __future__ import annotations

from .device import Disk, Extent
from .disk import ChainDisk
from .errors import ImageError
from .hostfile import HostFile

__all__ = ["Disk", "Extent", "open_disk", "open_layer"]

QCOW2_MAGIC = b"QFI\xfb"


def probe_format(filename: str) -> str:
    try:
        with open(filename, "rb") as f:
            return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    except OSError as e:
        raise ImageError(f"{filename}: cannot open: {e.strerror}") from None


def open_layer(filename: str, fmt: str | None = None, writable: bool = False):
    """Open one image (and, for qcow2, its backing chain) as a layer."""
    fmt = fmt or probe_format(filename)
    if fmt == "raw":
        try:
            return HostFile(filename, writable)
        except OSError as e:
            raise ImageError(f"{filename}: cannot open: {e.strerror}") from None
    if fmt == "qcow2":
        from .image import Qcow2Image

        return Qcow2Image.open(filename, writable)
    raise ValueError(f"unknown image format {fmt!r} (expected qcow2 or raw)")


def open_disk(filename: str, fmt: str | None = None, read_only: bool = True) -> Disk:
    """Open ``filename`` with its whole backing chain as one disk."""
    return ChainDisk(open_layer(filename, fmt, writable=not read_only), read_only=read_only)
