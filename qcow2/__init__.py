"""qcow2 driver: qcow2 v2/v3 images and their backing chains, read and written.

Knows nothing of the network.  :func:`open_disk` returns a
:class:`~qcow2.contract.Disk` (the contract every exported disk follows);
:func:`open_layer` one image with its chain, for tools that walk layers.
"""

from __future__ import annotations

from .contract import Bitmap, BitmapError, Disk, Extent, ThreadModel
from .format.snapshots import SnapshotRef
from .opening import open_disk, open_layer, probe_format

__all__ = [
    "Bitmap",
    "BitmapError",
    "Disk",
    "Extent",
    "SnapshotRef",
    "ThreadModel",
    "open_disk",
    "open_layer",
    "probe_format",
]
