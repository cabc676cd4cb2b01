"""Errors the driver raises; each message names the problem."""

from __future__ import annotations

import errno


class ImageError(Exception):
    """The image cannot be opened (bad header, unsupported feature, missing file)."""


class CorruptImageError(OSError):
    """Metadata found broken while serving a request; the request fails with EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def shown(name: str) -> str:
    """A file name as a message may show it: escaped if it holds control or undecodable characters
    (an image names its own backing file, and a newline in it must not make a second line)."""
    return name if name.isprintable() else ascii(name)
