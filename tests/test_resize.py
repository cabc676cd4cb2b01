"""`qcow2 resize` against `qemu-img resize` on twin copies of the same images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KiB, MiB = 1 << 10, 1 << 20


def run(*argv: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=check, timeout=120)


def build(d: Path, cluster_size: int, backing: bool, extra: str) -> None:
    """base (if any) longer than the image, with data past the image's end."""
    d.mkdir()
    args = []
    if backing:
        run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "6M", cwd=d)
        run("qemu-io", "-c", "write -P 0x11 0 6M", "base.qcow2", cwd=d)
        args = ["-b", "base.qcow2", "-F", "qcow2"]
    opts = f"cluster_size={cluster_size}" + extra
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *args, "x.qcow2", str(3 * MiB + 1536), cwd=d)
    run("qemu-io", "-c", "write -P 0x22 64k 100k", "-c", "write -z 1M 64k", "x.qcow2", cwd=d)


def shape(d: Path) -> tuple[dict, list]:
    info = json.loads(run("qemu-img", "info", "--output=json", "x.qcow2", cwd=d).stdout)
    entries = json.loads(run("qemu-img", "map", "--output=json", "x.qcow2", cwd=d).stdout)
    merged: list = []
    for e in entries:  # host offsets may differ; what the guest sees may not
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if merged and merged[-1][1] == key:
            merged[-1][0] += e["length"]
        else:
            merged.append([e["length"], key])
    return info["virtual-size"], merged


@pytest.mark.parametrize(
    ("cluster_size", "backing", "extra", "steps"),
    [
        (65536, False, "", ["5M", "+1G"]),
        (512, False, "", ["40M"]),  # the L1 table outgrows its cluster and moves
        (65536, True, "", ["8M"]),  # grown over a longer backing file: the new area reads zeros
        (16384, True, ",extended_l2=on", ["5000192"]),  # growth to a partial cluster over the backing
        (65536, False, "", ["5000000"]),  # not a multiple of 512: both refuse
        (65536, False, ",compat=0.10", ["12M", "-2M"]),
        (65536, True, "", ["-1M"]),  # shrink: only unallocated clusters are cut off
    ],
)
def test_resize_like_qemu_img(tmp_path: Path, cluster_size: int, backing: bool, extra: str, steps) -> None:
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    build(ours, cluster_size, backing, extra)
    shutil.copytree(ours, ref)
    for step in steps:
        size = ["--shrink", "--", step] if step.startswith("-") else [step]
        r = run("qemu-img", "resize", "-q", "-f", "qcow2", "x.qcow2", *size, cwd=ref, check=False)
        o = run(sys.executable, "-m", "qcow2", "resize", "x.qcow2", *size, cwd=ours, check=False)
        assert (o.returncode == 0) == (r.returncode == 0), (step, o.stderr, r.stderr)
    assert shape(ours) == shape(ref)
    compare = run("qemu-img", "compare", "x.qcow2", str(ref / "x.qcow2"), cwd=ours, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    check = run("qemu-img", "check", "x.qcow2", cwd=ours, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_shrink_refuses_to_cut_data(tmp_path: Path) -> None:
    build(tmp_path / "d", 65536, False, "")
    d = tmp_path / "d"
    before = (d / "x.qcow2").read_bytes()
    o = run(sys.executable, "-m", "qcow2", "resize", "--shrink", "x.qcow2", "128K", cwd=d, check=False)
    assert o.returncode == 1 and "cut off allocated data" in o.stderr, o.stderr
    assert (d / "x.qcow2").read_bytes() == before
