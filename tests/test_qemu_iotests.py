"""QEMU's own iotests against our server (issue 10 §2), with qemu-nbd as the baseline.

For each mode, every iotest that starts qemu-nbd and passes with it must pass
with our server in its place too, except the tests listed in
``qemu_iotests.EXPECTED`` with their reasons; a listed test that passes
fails the suite (the list is stale), unless it is listed as a race.  The iotests come from
Debian's source package of the installed QEMU, fetched at run time: if that
fails, this test fails.  See tests/qemu_iotests.py for how it runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import qemu_iotests as qi

MODES = qi.modes(os.environ.get("QCOW2_NBD_IOTESTS_MODES", ",".join(qi.DEFAULT_MODES)))


@pytest.fixture(scope="module")
def harness(oracle_tools: None) -> Iterator[qi.Harness]:
    if qi.missing_tools():
        pytest.fail(f"missing for QEMU's iotests: {', '.join(qi.missing_tools())}", pytrace=False)
    try:
        iotests = qi.fetch_source(qi.qemu_version())
    except qi.FetchError as e:
        pytest.fail(f"QEMU's iotests are needed: {e}", pytrace=False)
    h = qi.Harness(iotests)
    yield h
    h.close()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", MODES)
def test_iotests_qemu_nbd_passes_pass_with_ours(harness: qi.Harness, mode: str) -> None:
    report = qi.run_mode(harness, mode, say=lambda line: None)
    text = qi.summary([report])
    print(text)
    assert report.baseline, f"{mode}: no test started qemu-nbd: the harness is broken\n{text}"
    assert report.qemu_passed, f"{mode}: qemu-nbd passes no test: the harness is broken\n{text}"
    problems = report.problems()
    assert not problems, "\n".join(problems) + "\n" + text


def test_listed_differences_name_iotests_with_a_reason(harness: qi.Harness) -> None:
    names = {p.name for d in (harness.iotests, harness.iotests / "tests") for p in d.iterdir()}
    for name, (kind, reason) in qi.EXPECTED.items():
        assert name in names, f"{name} is not one of QEMU's iotests"
        assert kind in qi.KINDS, f"{name}: {kind} is not one of {qi.KINDS}"
        assert len(reason) > 20, f"{name}: say why it differs"
