"""Consistency check and repair: what ``qemu-img check [-r leaks|all]`` does.

``counting`` counts every reference in memory, ``engine`` compares the counts
with the refcounts on disk and finds what is wrong, ``repair`` writes the
fixes, ``tool`` is the command (text, JSON, exit codes), ``dirty`` the
repair a dirty image gets when it is opened read-write.
"""

from __future__ import annotations

from .dirty import repair_dirty_image
from .result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult
from .tool import check_image, run_check_command

__all__ = [
    "FIX_ERRORS",
    "FIX_LEAKS",
    "CheckFailed",
    "CheckResult",
    "check_image",
    "repair_dirty_image",
    "run_check_command",
]
