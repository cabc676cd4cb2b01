"""What ``qemu-img create -f qcow2`` accepts: the options, their defaults and qemu's checks.

Also qemu's syntax for what a user types: sizes with binary suffixes
(``qemu_strtosz``), ``-o a=1,b=2`` strings and on/off values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ImageError
from ..format.header import MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS
from ..qemuopts import split_option_list

DEFAULT_CLUSTER_SIZE = 65536
EXTL2_SUBCLUSTERS = 32
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}


class CreateError(ImageError):
    """The requested image cannot be created; the text is qemu-img's where it has one."""


class ImageTooLarge(CreateError):
    """QEMU's EFBIG: the metadata for this size would exceed a format limit."""

    def __init__(self) -> None:
        super().__init__("The image size is too large for file format 'qcow2'")


@dataclass(frozen=True)
class CreateOptions:
    """``qemu-img create -o`` for qcow2, with qemu's defaults."""

    cluster_size: int = DEFAULT_CLUSTER_SIZE
    version: int = 3
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    refcount_bits: int = 16
    data_file: str | None = None
    data_file_raw: bool = False
    preallocation: str = "off"
    backing_file: str | None = None
    backing_format: str | None = None


def validate(
    size: int,
    o: CreateOptions,
) -> str:
    """qcow2_co_create's checks, in its order and with its messages; returns the effective prealloc."""
    preallocation = o.preallocation
    if size < 0 or size > (1 << 63) - 1:
        raise CreateError(f"Invalid image size specified. Must be between 0 and {(1 << 63) - 1}.")
    if o.version not in (2, 3):
        raise CreateError(f"Parameter 'o.version' does not accept value '{o.version}'")
    if preallocation not in PREALLOC_MODES:
        raise CreateError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if o.compression_type not in COMPRESSION_TYPES:
        raise CreateError(f"Parameter 'compression-type' does not accept value '{o.compression_type}'")
    if o.extended_l2 and o.version < 3:
        raise CreateError(
            "Extended L2 entries are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    bits = o.cluster_size.bit_length() - 1
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS or o.cluster_size != 1 << bits:
        raise CreateError(
            f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and "
            f"{1 << (MAX_CLUSTER_BITS - 10)}k"
        )
    if o.extended_l2 and o.cluster_size < (1 << MIN_CLUSTER_BITS) * EXTL2_SUBCLUSTERS:
        raise CreateError(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"{(1 << MIN_CLUSTER_BITS) * EXTL2_SUBCLUSTERS} bytes"
        )
    if o.backing_file is not None and preallocation != "off" and not o.extended_l2:
        raise CreateError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if o.backing_format is not None and o.backing_file is None:
        raise CreateError("Backing format cannot be used without backing file")
    if o.version < 3 and o.lazy_refcounts:
        raise CreateError(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        )
    if o.refcount_bits <= 0 or o.refcount_bits > 64 or o.refcount_bits & (o.refcount_bits - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    if o.version < 3 and o.refcount_bits != 16:
        raise CreateError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)"
        )
    if o.data_file_raw and o.data_file is None:
        raise CreateError("data-file-raw requires data-file")
    if o.data_file_raw and o.backing_file is not None:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if o.data_file_raw and preallocation == "off":
        preallocation = "metadata"  # the L2 tables must map the raw file 1:1
    if o.data_file is not None and o.version < 3:
        raise CreateError(
            "External data files are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    if o.compression_type != "zlib" and o.version < 3:
        raise CreateError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    if o.backing_file is not None and len(os.fsencode(o.backing_file)) > MAX_BACKING_NAME:
        raise CreateError(
            f"Could not assign backing file '{o.backing_file}' with format '{o.backing_format}': "
            "Invalid argument"
        )
    return preallocation


# -- what users type ----------------------------------------------------------

_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_BOOL = {
    "on": True,
    "yes": True,
    "true": True,
    "y": True,
    "off": False,
    "no": False,
    "false": False,
    "n": False,
}
# qemu-img's option order in the "Formatting ..." line
_PRINT_ORDER = (
    "encryption",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
)
_DEFAULTS = {
    "cluster_size": str(DEFAULT_CLUSTER_SIZE),
    "extended_l2": "off",
    "compression_type": "zlib",
    "lazy_refcounts": "off",
    "refcount_bits": "16",
}
_QCOW2_OPTIONS = set(_PRINT_ORDER) | {"encrypt.format"}
_RAW_OPTIONS = {"size", "preallocation"}
_SIZE_HINT = (
    "You may use k, M, G, T, P or E suffixes for\n"
    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


def parse_size(text: str) -> int | None:
    """qemu_strtosz: a number with an optional binary suffix (fractions only with one); None if bad."""
    t = text.strip()
    unit = t[-1:].lower() if t[-1:].isalpha() else ""
    num = t[: len(t) - len(unit)]
    if unit not in _SUFFIXES or not num or num[0] in "+-":
        return None
    try:
        if "." in num:
            if not _SUFFIXES[unit]:
                return None
            whole, _, frac = num.partition(".")
            if not (whole or frac) or not (whole + frac).isdigit():
                return None
            return int(
                (int(whole or "0") * 10 ** len(frac) + int(frac or "0"))
                * (1 << _SUFFIXES[unit])
                // 10 ** len(frac)
            )
        return int(num, 10) << _SUFFIXES[unit]
    except ValueError:
        return None


def parse_option_string(text: str) -> list[tuple[str, str]]:
    """``-o a=1,b=2``, as in QEMU's option parser."""
    out = []
    for item in split_option_list(text):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise CreateError(
                f"Invalid parameter '{key}'" if key != "help" else "option help is not supported"
            )
        out.append((key, value))
    return out
