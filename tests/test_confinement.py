"""--confine DIR (issue 8 §7): an image may only name backing and data files under DIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def sh(*argv: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, cwd=cwd)


def serve(image: Path, *opts: str) -> subprocess.CompletedProcess:
    sock = image.parent / "s.sock"
    argv = [sys.executable, "-m", "nbdserver", "-r", "-f", "qcow2", "-k", str(sock), *opts]
    started = sh(*argv, "--fork", "--pid-file", str(sock) + ".pid", str(image), check=False)
    if started.returncode == 0:
        info = sh("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
        os.kill(int(Path(str(sock) + ".pid").read_text()), 15)
        started.stdout = info.stdout
    return started


@pytest.mark.parametrize(
    "backing", ["/etc/passwd", "../outside.raw", "link-out.raw"], ids=["absolute", "dotdot", "symlink"]
)
def test_backing_files_outside_are_refused(tmp_path: Path, oracle_tools: None, backing: str) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    sh("qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "outside.raw"), "1M")
    (volume / "link-out.raw").symlink_to(tmp_path / "outside.raw")
    image = volume / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", "top.qcow2", "1M",
       cwd=volume)  # fmt: skip
    assert serve(image).returncode == 0, "without --confine the image opens (QEMU's default)"
    refused = serve(image, "--confine", str(volume))
    assert refused.returncode == 1, refused
    line = refused.stderr.strip()
    assert "confined to" in line and str(volume) in line and len(line.splitlines()) == 1, line


def test_files_inside_are_served(tmp_path: Path, oracle_tools: None) -> None:
    volume = tmp_path / "volume"
    (volume / "sub").mkdir(parents=True)
    sh("qemu-img", "create", "-q", "-f", "raw", "sub/base.raw", "1M", cwd=volume)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "mid.qcow2", "1M", cwd=volume)
    sh("qemu-img", "rebase", "-u", "-b", "sub/base.raw", "-F", "raw", "mid.qcow2", cwd=volume)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", cwd=volume)
    served = serve(volume / "top.qcow2", "--confine", str(volume))
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip() == str(1 << 20)
