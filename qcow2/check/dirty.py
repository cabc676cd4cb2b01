"""The repair of a dirty image opened read-write, as QEMU makes it before the first write."""

from __future__ import annotations

import logging
import os

from ..errors import ImageError
from ..metadata.owner import ImageMetadata
from .engine import Checker
from .result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult

log = logging.getLogger("qcow2")


def repair_dirty_image(meta: ImageMetadata) -> CheckResult:
    """``check -r all``, quietly: rebuild or correct the refcounts, fix COPIED flags, clear the dirty bit.

    The owner's header, L1 table and caches follow.  Raises
    ImageError("Could not repair dirty image") when the repair fails.
    """
    filename = meta.filename

    def report(line: str) -> None:
        log.info("%s: %s", filename, line)

    log.info("%s: dirty image (not closed cleanly): repairing its refcounts", filename)
    try:
        result = Checker(meta, FIX_LEAKS | FIX_ERRORS, report).run()
    except CheckFailed as e:
        raise ImageError(f"{filename}: Could not repair dirty image: {os.strerror(e.errno)}") from None
    except OSError as e:
        raise ImageError(f"{filename}: Could not repair dirty image: {e}") from None
    if result.check_errors:
        raise ImageError(f"{filename}: Could not repair dirty image: Input/output error")
    meta.reload_refcounts()
    meta.l2_tables.clear()
    log.info(
        "%s: repaired %d corruptions and %d leaks", filename, result.corruptions_fixed, result.leaks_fixed
    )
    return result
