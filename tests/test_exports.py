"""Several exports from one server (issue 9 §5): --export name=...,file=...,readonly=...,description=..."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nbd_wire import wait_pid_exit

from nbdserver.exportspec import ExportSpec, check_exports, parse_export


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)


# -- the option's syntax (no server) -------------------------------------------------------


def test_parse_export() -> None:
    assert parse_export("name=a,file=x.qcow2") == ExportSpec("a", "x.qcow2")
    spec = parse_export("file=x,readonly=on,description=one,, two,format=raw")
    assert spec == ExportSpec("", "x", True, "one, two", "raw")
    assert parse_export("name=b,file=y", read_only_default=True).read_only
    assert not parse_export("name=b,file=y,readonly=off", read_only_default=True).read_only


@pytest.mark.parametrize(
    "text, why",
    [("name=a", "file=PATH is required"), ("file=x,color=red", "unknown key 'color'"),
     ("file=x,file=y", "file given twice"), ("file=x,readonly=maybe", "on or off"),
     ("file=x,format=vmdk", "qcow2 or raw"), ("file=x,oops", "not key=value")],
)  # fmt: skip
def test_parse_export_errors(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_export(text)


def test_one_export_per_name_and_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(b"")
    (tmp_path / "link.img").symlink_to(tmp_path / "a.img")
    with pytest.raises(ValueError, match="used twice"):
        check_exports([ExportSpec("x", str(tmp_path / "a.img")), ExportSpec("x", str(tmp_path / "b.img"))])
    with pytest.raises(ValueError, match="one image file, one export"):
        check_exports([ExportSpec("x", str(tmp_path / "a.img")), ExportSpec("y", str(tmp_path / "link.img"))])


# -- a server with several exports -------------------------------------------------------------


def test_several_exports(tmp_path: Path, oracle_tools: None) -> None:
    rw, ro = tmp_path / "vm.qcow2", tmp_path / "golden.raw"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(rw), "32M")
    sh("qemu-io", "-c", "write -P 1 0 1M", str(rw))
    sh("qemu-img", "create", "-q", "-f", "raw", str(ro), "16M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 2 4M 1M", str(ro))
    sock, pidfile = tmp_path / "s.sock", tmp_path / "s.pid"
    argv = [sys.executable, "-m", "nbdserver", "-k", str(sock), "--fork", "--pid-file", str(pidfile)]
    argv += ["--export", f"name=vm,file={rw},description=a VM,, read-write"]
    argv += ["--export", f"name=golden,file={ro},readonly=on,format=raw,description=the base"]
    sh(*argv)
    uri = lambda name: f"nbd+unix:///{name}?socket={sock}"  # noqa: E731
    try:
        listing = json.loads(sh("nbdinfo", "--list", "--json", uri("")).stdout)
        found = {e["export-name"]: (e["description"], e["is_read_only"]) for e in listing["exports"]}
        assert found == {"vm": ("a VM, read-write", False), "golden": ("the base", True)}
        for name, path, fmt in (("vm", rw, "qcow2"), ("golden", ro, "raw")):  # -U: we hold the locks
            sh("qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, uri(name), str(path))  # raises if not
        refused = sh("qemu-io", "-f", "raw", "-c", "write 0 4k", uri("golden"), check=False)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, "a read-only export"
        sh("qemu-io", "-f", "raw", "-c", "write -P 3 2M 64k", uri("vm"))
        # The read-only export shares its file: qemu-nbd -r maps it beside us, the same answer.
        qsock = tmp_path / "q.sock"
        sh("qemu-nbd", "-r", "-t", "-A", "-f", "raw", "-k", str(qsock), "--fork", "--pid-file",
           str(tmp_path / "q.pid"), str(ro))  # fmt: skip
        try:
            ref = sh("nbdinfo", "--map", f"nbd+unix:///?socket={qsock}").stdout
            assert sh("nbdinfo", "--map", uri("golden")).stdout == ref
        finally:
            os.kill(int((tmp_path / "q.pid").read_text()), 15)
        missing = sh("nbdinfo", uri("nope"), check=False)
        assert missing.returncode != 0
    finally:
        pid = int(pidfile.read_text())
        os.kill(pid, 15)
        wait_pid_exit(pid, 30)
    assert sh("qemu-img", "check", str(rw)).returncode == 0
    assert "Pattern verification failed" not in sh("qemu-io", "-c", "read -P 3 2M 64k", str(rw)).stdout


def test_the_same_file_twice_is_refused(tmp_path: Path, oracle_tools: None) -> None:
    img = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    argv = [sys.executable, "-m", "nbdserver", "-k", str(tmp_path / "s.sock"), str(img)]
    refused = sh(*argv, "--export", f"name=again,file={img}", check=False)
    assert refused.returncode == 2 and "one image file, one export" in refused.stderr, refused.stderr
