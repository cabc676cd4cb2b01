"""The ``qcow2`` command: look at and look after an image without serving it.

``main`` parses the command line, ``map`` is qemu-img map's walk and output,
``info`` qemu-img info's fields.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
