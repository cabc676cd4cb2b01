"""New images, laid out byte for byte as ``qemu-img create`` lays them out.

``options`` (what may be asked, qemu's checks and syntax), ``plan`` (where
every structure goes, by replaying QEMU's allocation), ``command`` (the
``qcow2 create`` front end, and writing the files).
"""

from __future__ import annotations

from .command import create_image, create_raw, run_create
from .options import CreateError, CreateOptions, parse_size

__all__ = ["CreateError", "CreateOptions", "create_image", "create_raw", "parse_size", "run_create"]
