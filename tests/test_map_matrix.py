"""``python -m qcow2 map`` must print exactly what ``qemu-img map`` prints (JSON and human)."""

from __future__ import annotations

import pytest
from images import CASES
from servers import assert_same, compare_image


@pytest.mark.parametrize("name", list(CASES))
def test_map_matches_qemu_img(name, case_image, tmp_path):
    image = case_image(name)
    cmp = compare_image(image, tmp_path / "cmp", map_=True, nbd=False)
    assert_same(cmp, f"case {name}: python -m qcow2 map vs qemu-img map")
