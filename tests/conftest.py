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
