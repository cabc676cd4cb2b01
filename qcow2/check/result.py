"""What a check returns: QEMU's counters, its failure, and the repair levels."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

FIX_LEAKS = 1  # QEMU's BDRV_FIX_LEAKS
FIX_ERRORS = 2  # QEMU's BDRV_FIX_ERRORS


class CheckFailed(Exception):
    """The check could not complete (QEMU returns -errno): no summary, exit code 1."""

    def __init__(self, err: int, result: CheckResult | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.errno = err
        self.result = result


@dataclass
class CheckResult:
    """QEMU's BdrvCheckResult (with its BlockFragInfo flattened in)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def assign(self, other: CheckResult) -> None:
        """Take every counter of ``other`` (QEMU copies whole results between passes)."""
        for f in fields(CheckResult):
            setattr(self, f.name, getattr(other, f.name))
