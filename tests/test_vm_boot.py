"""A Debian guest boots from the server and uses its disk, under QEMU's TCG.

The disk (tests/vmdisk.py) is built from Debian packages: syslinux on a FAT
partition, the cloud kernel, a busybox initramfs and an ext4 root; the guest
writes a 20 MiB file it also hashes, reads it back through the disk, writes
and deletes 16 MiB, runs fstrim and powers off, announcing each step on the
serial console.  SeaBIOS, syslinux, the kernel and ext4 all read and write
through the NBD export as a real VM does.

- Read-write export: the same boot against ours and against
  ``qemu-nbd --discard=unmap``, each on an overlay of the same base.  Ours
  must stay up, leave an overlay that ``qemu-img check`` finds clean with the
  guest's file in it byte for byte, the base untouched, and the same
  allocation after the trim as qemu-nbd's: the same ``qemu-img map`` runs
  and the same disk size (the guest's writes do not depend on timing, see
  vmdisk, and measured run after run they are equal).
- Read-only export: two guests boot at once from one ``-r`` export, each
  through a local qcow2 overlay whose backing file is the NBD URL.

The base image is cached under the pytest cache, keyed by the package
versions and tests/vmdisk.py (a fresh checkout builds it).  Boot times are
printed (``pytest -s``) and written to ``.pytest_cache/d/vm-boot/times.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import vmdisk
from images import Image, Recipe
from servers import Mismatch, Result, Server, allocation_map, check_problems, our_nbd, qemu_nbd, run

QEMU_SYSTEM = "qemu-system-x86_64"
BOOT_TIMEOUT = 180  # a boot takes about 6 s alone under TCG; generous for a loaded machine
GUEST_TOOLS = (QEMU_SYSTEM, "debugfs", "mke2fs", "mkfs.fat", "mcopy", "syslinux", "dpkg-deb")
# Kernel lines that mean the disk misbehaved (quiet still prints errors).
GUEST_ERRORS = re.compile(r"I/O error|EXT4-fs error|EXT4-fs warning|blk_update_request|Kernel panic|Oops")


@pytest.fixture(scope="session")
def times(request: pytest.FixtureRequest):
    """Lines about boot times, printed and kept in the pytest cache for the record."""
    lines: list[str] = []
    yield lines
    if lines:
        path = request.config.cache.mkdir("vm-boot") / "times.txt"
        path.write_text("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def vm_base(request: pytest.FixtureRequest, oracle_tools: None, times: list[str]) -> Path:
    missing = [t for t in GUEST_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"VM-boot tools missing from PATH: {', '.join(missing)}", pytrace=False)
    t0 = time.monotonic()
    try:
        path, built = vmdisk.cached_base(request.config.cache.mkdir("vm-boot"))
    except vmdisk.DiskError as e:
        pytest.fail(str(e), pytrace=False)
    times.append(f"base image {'built' if built else 'from the cache'} in {time.monotonic() - t0:.1f} s")
    return path


def file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Guest:
    """One qemu-system-x86_64 run and what its serial console said."""

    name: str
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    output: bytearray = field(default_factory=bytearray)
    steps: list[tuple[str, str, float]] = field(default_factory=list)  # (step, rest of line, seconds)
    ended: float | None = None
    killed_after: float | None = None  # seconds, if it had to be killed

    def console(self) -> str:
        return self.output.decode(errors="replace")

    def step(self, name: str) -> str | None:
        return next((rest for s, rest, _ in self.steps if s == name), None)

    def at(self, name: str) -> float | None:
        return next((t for s, _, t in self.steps if s == name), None)


def start_guest(name: str, drive: str, cwd: Path) -> Guest:
    argv = [
        QEMU_SYSTEM, "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-nic", "none", "-serial", "stdio", "-drive", f"{drive},if=virtio,discard=unmap",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return Guest(name, proc)


def watch(guests: list[Guest], timeout: float = BOOT_TIMEOUT) -> None:
    """Read every console until each qemu has exited, or kill what is left at ``timeout``."""
    deadline = time.monotonic() + timeout
    open_ = {g.proc.stdout.fileno(): g for g in guests}
    try:
        while open_:
            left = deadline - time.monotonic()
            ready = select.select(list(open_), [], [], left)[0] if left > 0 else []
            if not ready:
                for g in open_.values():
                    g.killed_after = timeout
                break
            for fd in ready:
                g = open_[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    del open_[fd]
                    g.proc.wait(timeout=30)
                    g.ended = time.monotonic() - g.started
                    continue
                start = g.output.rfind(b"\n") + 1  # the first line not yet parsed
                g.output += chunk
                for line in g.output[start:].split(b"\n")[:-1]:
                    m = re.match(rb"\s*VMBOOT (\S+) ?(.*?)\s*$", line)
                    if m:
                        step = (m[1].decode(), m[2].decode(errors="replace"), time.monotonic() - g.started)
                        g.steps.append(step)
    finally:
        for g in guests:  # killed if still running: timed out, or the test is being interrupted
            if g.proc.poll() is None:
                g.proc.kill()
                g.proc.wait()
            g.proc.stdout.close()


def guest_problems(g: Guest, want_sum: str) -> list[str]:
    """What went wrong inside ``g``, judged from its console and exit."""
    problems = []
    if g.killed_after is not None:
        problems.append(f"did not power off within {g.killed_after:g} s (killed)")
    elif g.proc.returncode != 0:
        problems.append(f"qemu exited with {g.proc.returncode}")
    seen = tuple(s for s, _, _ in g.steps)
    if seen != vmdisk.STEPS:
        problems.append(f"console steps {seen}, expected {vmdisk.STEPS}")
    for step in ("wrote", "readback"):
        got = (g.step(step) or "").split(" ")[0]
        if got and got != want_sum:
            problems.append(f"{step}: md5 {got}, the host computes {want_sum}")
    trimmed = re.search(r"(\d+) bytes trimmed", g.step("trimmed") or "")
    if g.step("trimmed") is not None and not (trimmed and int(trimmed[1]) > 0):
        problems.append(f"fstrim trimmed nothing: {g.step('trimmed')!r}")
    problems += [f"kernel: {line.strip()}" for line in g.console().splitlines() if GUEST_ERRORS.search(line)]
    return problems


def fail_report(g: Guest, problems: list[str], server: Server | None = None) -> str:
    parts = [f"guest {g.name}: " + "; ".join(problems), f"--- console of {g.name}:", g.console()[-6000:]]
    if server is not None:
        parts += [f"--- {server.describe()}", f"--- its stderr:\n{server.stderr()[-4000:]}"]
    return "\n".join(parts)


def boot_line(g: Guest) -> str:
    steps = ", ".join(f"{s} {t:.1f}" for s, _, t in g.steps)
    return f"{g.name}: {steps}, qemu exited {g.ended or 0:.1f} s after its start"


def allocation(image: Image) -> tuple[list[tuple], Result, dict[str, int]]:
    """``allocation_map(image)``, and in bytes: the top layer's data and zero runs, the file's size
    on disk (``qemu-img info``'s actual-size)."""
    runs, r = allocation_map(image)
    sizes = {"data": 0, "zero": 0}
    for _start, length, depth, _present, zero, _data, _mapped in runs:
        if depth == 0:
            sizes["zero" if zero else "data"] += length
    info = run(["qemu-img", "info", "--output=json", image.path], image.cwd)
    assert info.rc == 0, f"{info.cmdline()}: {info.err}"
    sizes["disk"] = json.loads(info.out)["actual-size"]
    return runs, r, sizes


def guest_file(image: Image, scratch: Path, path: str) -> bytes:
    """A file of the guest's ext4 root, read by debugfs from the image's raw conversion."""
    r = run(["qemu-img", "convert", "-O", "raw", image.path, str(scratch)], image.cwd, timeout=60)
    assert r.rc == 0, f"{r.cmdline()}: {r.err}"
    out = scratch.with_suffix(".file")
    r = run(["debugfs", "-R", f"dump {path} {out}", f"{scratch}?offset={vmdisk.ROOT_START}"], scratch.parent)
    assert r.rc == 0 and out.exists(), f"{r.cmdline()}: {r.out}{r.err}"
    scratch.unlink()
    data = out.read_bytes()
    out.unlink()
    return data


def boot_on_export(name: str, serve, base: Path, where: Path) -> tuple[Guest, Server, Image]:
    """One guest booted from ``serve``'s read-write export of a fresh overlay of ``base``."""
    rc = Recipe(where)
    rc.create("overlay.qcow2", vmdisk.DISK_SIZE, backing=str(base), backing_fmt="qcow2")
    overlay = rc.image("overlay.qcow2")
    with serve(overlay, where / "srv", writable=True, options=["--discard=unmap"]) as srv:
        g = start_guest(name, f"file={srv.uri},format=raw", where)
        watch([g])
    (where / "console.txt").write_bytes(g.output)
    return g, srv, overlay


def server_problems(srv: Server) -> list[str]:
    """After its teardown: did the server outlive its client and stop cleanly at SIGTERM?"""
    problems = [f"server: {srv.exit_problem}"] if srv.exit_problem else []
    if "Traceback" in srv.stderr():
        problems.append("the server logged a traceback")
    return problems


def test_boot_from_read_write_export(vm_base: Path, tmp_path: Path, times: list[str]) -> None:
    base_sum = file_sha(vm_base)
    want = vmdisk.pattern()
    want_sum = hashlib.md5(want).hexdigest()

    g, srv, overlay = boot_on_export("ours", our_nbd, vm_base, tmp_path / "ours")
    times.append(boot_line(g))
    problems = guest_problems(g, want_sum) + server_problems(srv)
    assert not problems, fail_report(g, problems, srv)
    bad = check_problems(overlay)
    assert bad is None, bad
    got = guest_file(overlay, tmp_path / "ours.raw", vmdisk.PATTERN_PATH)
    assert got == want, "the guest's /pattern read back from our overlay differs from what it wrote"

    ref, ref_srv, ref_overlay = boot_on_export("qemu-nbd", qemu_nbd, vm_base, tmp_path / "qemu")
    times.append(boot_line(ref))
    ref_problems = guest_problems(ref, want_sum) + server_problems(ref_srv)
    assert not ref_problems, "ORACLE FAILED: " + fail_report(ref, ref_problems, ref_srv)

    # Exactly equal: the guest's writes do not depend on timing (see vmdisk), and measured run
    # after run both servers leave the same runs and the same file size behind.
    ours_map, ours_r, ours_size = allocation(overlay)
    ref_map, ref_r, ref_size = allocation(ref_overlay)
    times.append(f"overlay after fstrim, bytes: ours {ours_size}, qemu-nbd {ref_size}")
    what = "qemu-img map of the overlay after the boot"
    assert ours_map == ref_map, Mismatch(what, "allocations differ", ref_r, ours_r).render()
    assert ours_size == ref_size, f"{what}: ours {ours_size}, qemu-nbd {ref_size}"
    bad = check_problems(ref_overlay)
    assert bad is None, "ORACLE FAILED: " + bad
    assert file_sha(vm_base) == base_sum, "the base image changed"


def test_two_guests_from_one_read_only_export(vm_base: Path, tmp_path: Path, times: list[str]) -> None:
    base_sum = file_sha(vm_base)
    want_sum = hashlib.md5(vmdisk.pattern()).hexdigest()
    base = Image(vm_base.name, vm_base.parent, "qcow2", Recipe(tmp_path / "base"))
    rc = Recipe(tmp_path / "guests")
    with our_nbd(base, tmp_path / "srv") as srv:
        names = ("vm1", "vm2")
        for name in names:
            rc.create(f"{name}.qcow2", vmdisk.DISK_SIZE, backing=srv.uri, backing_fmt="raw")
        guests = [start_guest(name, f"file={name}.qcow2,format=qcow2", rc.root) for name in names]
        watch(guests)
        for g in guests:
            (rc.root / f"{g.name}.console.txt").write_bytes(g.output)
            times.append(boot_line(g))
            problems = guest_problems(g, want_sum)
            assert not problems, fail_report(g, problems, srv)
        for name in names:  # checked while the backing file, the export, is still there
            bad = check_problems(rc.image(f"{name}.qcow2"))
            assert bad is None, bad
    problems = server_problems(srv)
    assert not problems, f"{srv.describe()}: {'; '.join(problems)}\n{srv.stderr()}"
    assert file_sha(vm_base) == base_sum, "the base image changed"
