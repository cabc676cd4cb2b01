"""Images qemu refuses to open: ``python -m qcow2`` must refuse them too, cleanly.

* Unknown incompatible feature bits: non-zero exit and a message naming the bit.
* Damaged headers / missing files: non-zero exit, a one-line message, no traceback.

qemu-img is asked first each time; if it opens the image the case is wrong
(reported as an oracle problem).
"""

from __future__ import annotations

import re

import pytest
from images import Recipe
from servers import PYTHON, Result, run


def mentions_bit(text: str, bit: int) -> bool:
    """A message names incompatible bit ``bit`` as "bit N", or by its mask in hex."""
    mask = 1 << bit
    pats = [rf"\bbit\s*#?\s*{bit}\b", rf"\b0x0*{mask:x}\b", rf"feature:?\s*{mask:x}\b"]
    return any(re.search(p, text, re.IGNORECASE) for p in pats)


def _base(rc: Recipe) -> str:
    rc.create("x.qcow2", "1M")
    rc.io("x.qcow2", "write -P 1 0 64k")
    return "x.qcow2"


UNKNOWN_BITS = {"bit5": [5], "bit6": [6], "bit63": [63], "bits5+7": [5, 7]}


def build_unknown(rc: Recipe, bits: list[int]) -> str:
    name = _base(rc)
    mask = sum(1 << b for b in bits)
    rc.tool("set-incompat", name, hex(mask))
    return name


def _qemu_refuses(rc: Recipe, name: str) -> Result:
    ref = run(["qemu-img", "map", "--output=json", name], rc.root)
    assert ref.rc not in (0, None), f"ORACLE: qemu-img opened the image, the case is wrong\n{rc.script()}"
    return ref


def _no_traceback(r: Result) -> None:
    assert "Traceback" not in r.err, f"{r.cmdline()} crashed instead of refusing:\n{r.err}"


@pytest.mark.parametrize("case", list(UNKNOWN_BITS))
@pytest.mark.parametrize("argv", [["map", "--output=json"], ["map", "--output=human"], ["info"]])
def test_unknown_incompatible_bit_refused(case, argv, recipe):
    bits = UNKNOWN_BITS[case]
    name = build_unknown(recipe, bits)
    ref = _qemu_refuses(recipe, name)
    ours = run([PYTHON, "-m", "qcow2", *argv, name], recipe.root)
    assert ours.rc not in (0, None), (
        f"ours opened an image with unknown incompatible bits {bits}:\n{ours.out}"
    )
    _no_traceback(ours)
    assert not ours.out.strip(), f"ours printed a map/info although it refused:\n{ours.out}"
    for b in bits:
        assert mentions_bit(ours.err, b), (
            f"message does not name incompatible bit {b}: {ours.err!r} (qemu says {ref.err.strip()!r})"
        )


def _damage(rc: Recipe, kind: str) -> str:
    if kind == "truncated-header":
        rc.create("big.qcow2", "1M")
        rc.run("truncate", "-s", "50", "big.qcow2")
        return "big.qcow2"
    if kind == "missing-backing":
        rc.create("base.qcow2", "1M")
        rc.create("top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2")
        rc.run("rm", "base.qcow2")
        return "top.qcow2"
    if kind == "missing-data-file":
        rc.create("d.qcow2", "1M", data_file="d.raw")
        rc.run("rm", "d.raw")
        return "d.qcow2"
    name = _base(rc)
    field = {
        "version-4": (4, ">I", 4),
        "version-1": (4, ">I", 1),
        "cluster-bits-8": (20, ">I", 8),
        "cluster-bits-22": (20, ">I", 22),
        "l1-too-small": (24, ">Q", 1 << 40),  # 1 TiB disk, L1 still 1 entry
        "refcount-order-7": (96, ">I", 7),
        "header-length-beyond-cluster": (100, ">I", 0x20000),
        "compression-bit-without-type": (72, ">Q", 0x8),
        "bad-magic": (0, ">I", 0x514649FA),
    }[kind]
    rc.tool("poke", name, str(field[0]), field[1], str(field[2]))
    return name


DAMAGE = [
    "truncated-header",
    "missing-backing",
    "missing-data-file",
    "version-4",
    "version-1",
    "cluster-bits-8",
    "cluster-bits-22",
    "l1-too-small",
    "refcount-order-7",
    "header-length-beyond-cluster",
    "compression-bit-without-type",
    "bad-magic",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_image_refused_cleanly(kind, recipe):
    name = _damage(recipe, kind)
    ref = run(["qemu-img", "map", "-f", "qcow2", "--output=json", name], recipe.root)
    assert ref.rc not in (0, None), f"ORACLE: qemu-img opened the image, the case is wrong\n{recipe.script()}"
    ours = run([PYTHON, "-m", "qcow2", "map", "-f", "qcow2", "--output=json", name], recipe.root)
    assert ours.rc not in (0, None), (
        f"ours opened a damaged image ({kind}); qemu says {ref.err.strip()!r}\n"
        f"{ours.out[:2000]}\n{recipe.script()}"
    )
    _no_traceback(ours)
    assert ours.err.strip(), "refused without saying why"
