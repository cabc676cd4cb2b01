"""Our NBD server and qemu-nbd export the same image: same maps, same bytes, same info."""

from __future__ import annotations

import pytest
from images import CASES
from servers import assert_same, compare_image


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_qemu_nbd(name, case_image, tmp_path):
    image = case_image(name)
    cmp = compare_image(image, tmp_path / "cmp", map_=False, nbd=True)
    assert_same(cmp, f"case {name}: python -m nbdserver vs qemu-nbd")
