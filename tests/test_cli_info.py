"""``python -m qcow2 info``: the robust facts agree with ``qemu-img info`` on every image.

The output format is our own; only facts that both tools state are compared:
format, virtual size, cluster size, backing file name/format and where it
resolves to, dirty flag, and the qcow2 specifics (compat, refcount bits,
extended L2, compression type, lazy refcounts, corrupt, data file, the
persistent bitmaps).  The bitmaps are also printed in qemu-img's own layout.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from images import CASES
from servers import PYTHON, run
from test_bitmaps import start, stop

TOP_KEYS = (
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "dirty-flag",
)
QCOW2_KEYS = (
    "compat",
    "refcount-bits",
    "extended-l2",
    "compression-type",
    "lazy-refcounts",
    "corrupt",
    "data-file",
    "data-file-raw",
    "bitmaps",
)


def _facts(info: dict, cwd) -> dict:
    out = {k: info[k] for k in TOP_KEYS if k in info}
    if "full-backing-filename" in info:
        out["full-backing-filename (resolved)"] = os.path.realpath(
            os.path.join(cwd, info["full-backing-filename"])
        )
    data = info.get("format-specific", {}).get("data", {})
    for k in QCOW2_KEYS:
        if k in data:
            out[f"format-specific.{k}"] = data[k]
    return out


def _ours_facts(info: dict, cwd) -> dict:
    # our own format: same key names where it states the fact (qemu-img's names)
    return _facts(info, cwd)


@pytest.mark.parametrize("name", list(CASES))
def test_info_json_facts_match_qemu_img_info(name, case_image):
    image = case_image(name)
    ref = run(["qemu-img", "info", "--backing-chain", "--output=json", image.path], image.cwd)
    ours = run([PYTHON, "-m", "qcow2", "info", "--backing-chain", "--output=json", image.path], image.cwd)
    assert ref.rc == 0, f"ORACLE FAILED: {ref.cmdline()}\n{ref.err}"
    assert ours.rc == 0, f"{ours.cmdline()} failed rc={ours.rc}\n{ours.err}\n{ours.out}"
    ref_chain = json.loads(ref.out)
    our_chain = json.loads(ours.out)
    if isinstance(our_chain, dict):
        our_chain = [our_chain]
    problems = []
    if len(our_chain) != len(ref_chain):
        problems.append(f"chain length: qemu {len(ref_chain)}, ours {len(our_chain)}")
    for depth, (r, o) in enumerate(zip(ref_chain, our_chain, strict=False)):
        rf, of = _facts(r, image.cwd), _ours_facts(o, image.cwd)
        for k, v in rf.items():
            if of.get(k, "<missing>") != v:
                problems.append(f"layer {depth} {k}: qemu={v!r} ours={of.get(k, '<missing>')!r}")
    assert not problems, (
        f"case {name}: qcow2 info vs qemu-img info\n"
        + "\n".join(problems)
        + f"\n--- qemu: {ref.cmdline()}\n{ref.out}\n--- ours: {ours.cmdline()}\n{ours.out}"
        + "\n--- recipe:\n"
        + image.recipe.script()
    )


HUMAN_CASES = ["chain-19.3", "data-file", "extl2-19.5-backing", "chain-relative-subdir", "mixed-v2-cs512"]


@pytest.mark.parametrize("name", HUMAN_CASES)
def test_info_human_states_the_facts(name, case_image):
    image = case_image(name)
    ref = run(["qemu-img", "info", "--output=json", image.path], image.cwd)
    ours = run([PYTHON, "-m", "qcow2", "info", image.path], image.cwd)
    assert ref.rc == 0, f"ORACLE FAILED: {ref.cmdline()}\n{ref.err}"
    assert ours.rc == 0, f"{ours.cmdline()} failed rc={ours.rc}\n{ours.err}"
    info = json.loads(ref.out)
    text = ours.out
    expected = [str(info["virtual-size"]), str(info["cluster-size"])]
    if "backing-filename" in info:
        expected.append(info["backing-filename"])
    data = info["format-specific"]["data"]
    if "data-file" in data:
        expected.append(data["data-file"])
    expected.append(data["compat"])
    missing = [e for e in expected if not re.search(r"(?<![\w.])" + re.escape(e) + r"(?![\w])", text)]
    assert not missing, f"ours does not state {missing}:\n{text}\n--- qemu-img info:\n{ref.out}"


def _bitmaps_block(text: str) -> list[str]:
    """The lines of the "bitmaps:" entry of a human info (up to the next entry of its level)."""
    lines = text.splitlines()
    start = lines.index("    bitmaps:")
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("        ")), len(lines))
    return lines[start:end]


def test_bitmaps_are_listed_as_qemu_img_lists_them(tmp_path, oracle_tools):
    """Enabled, disabled and in-use bitmaps of several granularities: the JSON list and
    the indented text, flags in QEMU's order."""
    image = tmp_path / "b.qcow2"
    cwd = tmp_path
    for argv in (
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"],
        ["qemu-img", "bitmap", "--add", str(image), "left-in-use"],
    ):
        assert run(argv, cwd).rc == 0
    _, pid = start("qemu", image)
    stop(pid, 9)  # killed while writable: the bitmap stays in use
    for argv in (
        ["qemu-img", "bitmap", "--add", "-g", "512", str(image), "fine"],
        ["qemu-img", "bitmap", "--add", "-g", "2M", "--disable", str(image), "off"],
    ):
        assert run(argv, cwd).rc == 0
    ref = run(["qemu-img", "info", "--output=json", str(image)], cwd)
    ours = run([PYTHON, "-m", "qcow2", "info", "--output=json", str(image)], cwd)
    listed = json.loads(ref.out)["format-specific"]["data"]["bitmaps"]
    assert [b["flags"] for b in listed] == [["in-use", "auto"], ["auto"], []]
    assert json.loads(ours.out)["format-specific"]["data"]["bitmaps"] == listed
    ref = run(["qemu-img", "info", str(image)], cwd)
    ours = run([PYTHON, "-m", "qcow2", "info", str(image)], cwd)
    assert _bitmaps_block(ours.out) == _bitmaps_block(ref.out), ours.out


def test_an_image_without_bitmaps_lists_none(tmp_path, oracle_tools):
    image = tmp_path / "n.qcow2"
    assert run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], tmp_path).rc == 0
    for argv in (["qemu-img", "info"], [PYTHON, "-m", "qcow2", "info"]):
        out = run([*argv, "--output=json", str(image)], tmp_path).out
        assert "bitmaps" not in json.loads(out)["format-specific"]["data"]
