"""Errors the driver raises; each message names the problem."""

from __future__ import annotations

import errno


class ImageError(Exception):
    """The image cannot be opened (bad header, unsupported feature, missing file)."""


class CorruptImageError(OSError):
    """Metadata found broken while serving a request; the request fails with EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)
