"""``qcow2 check``: qemu-img check's command around the engine: opening, passes, text, JSON, exit codes.

The stderr lines, the summary, the JSON object (keys in qemu-img's order) and
the exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks) are
qemu-img 7.2's, so the two tools can be compared on the same image.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable

from ..errors import ImageError
from ..format.header import parse_header
from ..hostfile import HostFile
from ..metadata.owner import ImageMetadata
from .engine import Checker
from .result import CheckFailed, CheckResult

# qemu-img prints the ImageCheck dict in its QDict's iteration order; keep it.
JSON_KEYS = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


def result_json(r: CheckResult, filename: str) -> dict:
    """The ImageCheck object of ``qemu-img check --output=json`` (zero counters omitted)."""
    values = {
        "image-end-offset": r.image_end_offset,
        "compressed-clusters": r.compressed_clusters,
        "total-clusters": r.total_clusters,
        "corruptions": r.corruptions,
        "corruptions-fixed": r.corruptions_fixed,
        "check-errors": r.check_errors,
        "leaks": r.leaks,
        "leaks-fixed": r.leaks_fixed,
        "allocated-clusters": r.allocated_clusters,
        "filename": filename,
        "format": "qcow2",
        "fragmented-clusters": r.fragmented_clusters,
    }
    always = ("check-errors", "filename", "format")
    return {k: values[k] for k in JSON_KEYS if k in always or values[k]}


def open_for_check(filename: str, writable: bool) -> ImageMetadata:
    """The image's metadata alone (no backing chain, no data file): all a check needs."""
    try:
        file = HostFile(filename, writable)
    except OSError as e:
        raise ImageError(f"Could not open '{filename}': {e.strerror}") from None
    try:
        cluster0 = bytearray(file.pread(0, 1 << 21)[: max(file.file_size, 0)])
        crypt_method = struct.unpack_from(">I", cluster0, 32)[0] if len(cluster0) >= 36 else 0
        if crypt_method:
            # Encryption changes nothing in the metadata a check walks.
            cluster0[32:36] = bytes(4)
        header = parse_header(bytes(cluster0), filename)
        header.crypt_method = crypt_method
        return ImageMetadata(filename, file, header)
    except BaseException:
        file.close()
        raise


def check_image(filename: str, fix: int = 0, report: Callable[[str], None] | None = None) -> CheckResult:
    """One check pass (with ``fix`` = FIX_LEAKS / FIX_LEAKS|FIX_ERRORS, one repair pass)."""
    meta = open_for_check(filename, writable=bool(fix))
    try:
        return Checker(meta, fix, report or _stderr).run()
    finally:
        meta.file.close()


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_check_command(
    filename: str,
    fix: int,
    output: str,
    out: Callable[[str], None],
    err: Callable[[str], None],
    quiet: bool = False,
) -> int:
    """``qemu-img check``: check (and repair), double-check after a repair, print, exit code."""
    try:
        result = check_image(filename, fix, err)
    except CheckFailed as e:
        err(f"qcow2: Check failed: {os.strerror(e.errno)}")
        return 1
    if result.corruptions_fixed or result.leaks_fixed:
        if output == "human" and not quiet:
            out(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {result.leaks_fixed} leaked clusters\n"
                f"    {result.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        fixed = (result.corruptions_fixed, result.leaks_fixed)
        try:
            result = check_image(filename, 0, err)
        except CheckFailed as e:
            err(f"qcow2: Check failed: {os.strerror(e.errno)}")
            return 1
        result.corruptions_fixed, result.leaks_fixed = fixed
    if quiet:
        pass
    elif output == "json":
        out(json.dumps(result_json(result, filename), indent=4) + "\n")
    else:
        out(format_human(result))
    if result.check_errors:
        err("qcow2: Check failed")
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def format_human(r: CheckResult) -> str:
    """qemu-img's human summary."""
    text = ""
    if not (r.corruptions or r.leaks or r.check_errors):
        text += "No errors were found on the image.\n"
    else:
        if r.corruptions:
            text += (
                f"\n{r.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if r.leaks:
            text += (
                f"\n{r.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if r.check_errors:
            text += f"\n{r.check_errors} internal errors have occurred during the check.\n"
    if r.total_clusters and r.allocated_clusters:
        text += (
            f"{r.allocated_clusters}/{r.total_clusters} = "
            f"{r.allocated_clusters * 100.0 / r.total_clusters:.2f}% allocated, "
            f"{r.fragmented_clusters * 100.0 / r.allocated_clusters:.2f}% fragmented, "
            f"{r.compressed_clusters * 100.0 / r.allocated_clusters:.2f}% compressed clusters\n"
        )
    if r.image_end_offset:
        text += f"Image end offset: {r.image_end_offset}\n"
    return text
