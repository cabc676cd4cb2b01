"""Shared fixtures of the differential suite (images vs. the real qemu tools)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from images import Recipe, missing_tools  # noqa: E402


@pytest.fixture(scope="session")
def oracle_tools() -> None:
    """The qemu/libnbd tools are the oracle: without them the suite fails, never skips."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"oracle tools missing from PATH: {', '.join(missing)}", pytrace=False)


@pytest.fixture
def recipe(tmp_path: Path, oracle_tools: None) -> Recipe:
    return Recipe(tmp_path / "img")


@pytest.fixture(scope="session")
def case_image(tmp_path_factory: pytest.TempPathFactory, oracle_tools: None):
    """``case_image(name)`` builds ``images.CASES[name]`` once per session (every user only reads it)."""
    from images import CASES

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            rc = Recipe(tmp_path_factory.mktemp("case-" + name[:40]) / "img")
            cache[name] = CASES[name](rc)
        img = cache[name]
        img.check_premise()
        img.settle()
        return img

    return get


BIG_BYTES = 4096


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Large byte strings: say where they differ instead of a quadratic difflib report."""
    if op != "==" or not isinstance(left, bytes | bytearray | memoryview):
        return None
    if not isinstance(right, bytes | bytearray | memoryview):
        return None
    a, b = bytes(left), bytes(right)
    if max(len(a), len(b)) < BIG_BYTES:
        return None
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return [
        f"byte strings differ: lengths {len(a)} and {len(b)}, first difference at offset {first}",
        f"left  [{first}:{first + 16}] = {a[first : first + 16].hex()}",
        f"right [{first}:{first + 16}] = {b[first : first + 16].hex()}",
    ]
