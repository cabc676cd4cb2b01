"""A bootable BIOS disk for the VM-boot test, built from Debian packages without mounting anything.

Layout (MBR): syslinux's MBR code; partition 1, FAT, active: syslinux, the
kernel and a tiny initramfs; partition 2, ext4: the root, a static busybox and
``/sbin/init``, the guest side of the test.  The initramfs loads the virtio
modules (modules in Debian's cloud kernel), mounts the root and switches to it.

The kernel comes out of the ``.deb`` that ``scripts/setup.sh`` downloads into
``.cache/vm`` (never installed on the host); busybox, syslinux, mtools,
dosfstools and e2fsprogs are host packages.  FAT and ext4 are filled from
files (mcopy, syslinux through mtools, ``mke2fs -d``), so no loop device.

The guest writes ``pattern()`` to ``/pattern`` and announces each step on the
serial console as a line ``VMBOOT <step> ...`` (see ``GUEST_INIT``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

from images import Recipe

REPO = Path(__file__).resolve().parents[1]
KERNEL_DEBS = REPO / ".cache" / "vm"  # scripts/setup.sh downloads the guest kernel here
BUSYBOX = Path("/bin/busybox")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
HOST_PACKAGES = (
    "busybox-static",
    "syslinux",
    "syslinux-common",
    "mtools",
    "dosfstools",
    "e2fsprogs",
    "qemu-utils",
)

MiB = 1 << 20
SECTOR = 512
BOOT_START, BOOT_SIZE = 1 * MiB, 31 * MiB
ROOT_START, ROOT_SIZE = 32 * MiB, 128 * MiB
DISK_SIZE = ROOT_START + ROOT_SIZE
ROOT_DEVICE = "/dev/vda2"

# What the guest writes: 20 MiB, MiB i being the 1 MiB random /seed rotated left by i * ROTATE
# bytes (cheap under TCG, unlike any per-byte tool); ROTATE % 4096 * 19 < 4096, so no two
# 4 KiB blocks of the file are alike.
SEED_PATH, SEED_SIZE = "/seed", 1 * MiB
PATTERN_PATH, PATTERN_MIB, ROTATE = "/pattern", 20, 12345
SCRATCH_MIB = 16  # written, deleted and trimmed

MODULES = ("virtio_pci", "virtio_blk")  # and what they depend on, loaded first

INITRAMFS_INIT = f"""#!/bin/sh
# PID 1 of the initramfs: the virtio disk's drivers, then the ext4 root.
PATH=/bin
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules.order); do insmod /lib/$m.ko || echo "VMBOOT FAIL insmod $m"; done
n=0
while [ ! -b {ROOT_DEVICE} ]; do
    n=$((n + 1))
    [ $n -gt 200 ] && {{ echo "VMBOOT FAIL no {ROOT_DEVICE}"; poweroff -f; }}
    sleep 0.05
done
# no timed journal commits: the guest's writes depend on its steps only, never on timing
mount -t ext4 -o commit=3600 {ROOT_DEVICE} /root || {{ echo "VMBOOT FAIL mount {ROOT_DEVICE}"; poweroff -f; }}
mount --move /dev /root/dev
exec switch_root /root /sbin/init
"""

GUEST_INIT = f"""#!/bin/sh
# PID 1 on the ext4 root: the test's steps, each announced on the serial console.
PATH=/bin
mount -t proc proc /proc
# nor timed or background writeback: data reaches the disk at the syncs, whatever the timing
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 90 > /proc/sys/vm/dirty_ratio
echo 80 > /proc/sys/vm/dirty_background_ratio
echo "VMBOOT booted $(uname -r)"
for i in $(seq 0 {PATTERN_MIB - 1}); do
    r=$((i * {ROTATE}))
    tail -c +$((r + 1)) {SEED_PATH}
    head -c $r {SEED_PATH}
done > {PATTERN_PATH}
sum=$(md5sum < {PATTERN_PATH})
sync
echo "VMBOOT wrote $sum"
echo 3 > /proc/sys/vm/drop_caches
echo "VMBOOT readback $(md5sum < {PATTERN_PATH})"
for i in $(seq {SCRATCH_MIB}); do cat {SEED_PATH}; done > /scratch
sync
rm /scratch
sync
echo "VMBOOT trimmed $(fstrim -v /)"
mount -o remount,ro /
echo "VMBOOT poweroff"
poweroff -f
"""

SYSLINUX_CFG = """DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet panic=-1
"""

# Lines the guest prints, in order (a FAIL line or a missing one fails the test).
STEPS = ("booted", "wrote", "readback", "trimmed", "poweroff")


def seed() -> bytes:
    return random.Random(SEED_PATH).randbytes(SEED_SIZE)


def pattern() -> bytes:
    """The bytes of ``/pattern`` as the guest writes them."""
    s = seed()
    return b"".join(s[i * ROTATE :] + s[: i * ROTATE] for i in range(PATTERN_MIB))


class DiskError(AssertionError):
    pass


def kernel_deb() -> Path:
    debs = sorted(KERNEL_DEBS.glob("linux-image-*_amd64.deb"))
    if not debs:
        raise DiskError(f"no guest kernel .deb in {KERNEL_DEBS}: run `bash scripts/setup.sh`")
    return debs[-1]


def _package_versions() -> list[str]:
    p = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}=${Version} ${db:Status-Abbrev}\n", *HOST_PACKAGES],
        capture_output=True,
        text=True,
    )
    lines = p.stdout.split("\n")
    missing = [
        pkg for pkg in HOST_PACKAGES if not any(x.startswith(pkg + "=") and x.endswith("ii ") for x in lines)
    ]
    if p.returncode != 0 or missing:
        raise DiskError(
            f"Debian packages missing for the VM-boot test: {' '.join(missing)}: run scripts/setup.sh"
        )
    return sorted(x.split()[0] for x in lines if x)


def cache_key() -> str:
    """Changes with the kernel .deb, the host packages used and this file."""
    h = hashlib.sha256()
    for part in (kernel_deb().name, *_package_versions(), Path(__file__).read_text()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def cached_base(cache: Path) -> tuple[Path, bool]:
    """``cache/<key>/base.qcow2``, built first if missing; True if it was built now."""
    key = cache_key()
    final = cache / key
    if (final / "base.qcow2").exists():
        return final / "base.qcow2", False
    for old in cache.glob("*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    work = cache / f"building-{key}"
    shutil.rmtree(work, ignore_errors=True)
    build(Recipe(work))
    (work / "base.qcow2").chmod(0o444)  # the tests only ever read it
    work.rename(final)
    return final / "base.qcow2", True


def build(rc: Recipe) -> None:
    """Build ``rc.root/base.qcow2``, leaving only it behind."""
    vmlinuz, modules = _kernel_files(kernel_deb())
    root = rc.root
    (root / "vmlinuz").write_bytes(vmlinuz)
    (root / "initrd.gz").write_bytes(gzip.compress(_initramfs(modules), mtime=0))
    (root / "syslinux.cfg").write_text(SYSLINUX_CFG)
    rc.note("vmlinuz: from the kernel .deb; initrd.gz: tests/vmdisk.py _initramfs")
    rc.run(
        "mkfs.fat", "-C", "-h", str(BOOT_START // SECTOR), "-n", "BOOT", "boot.fat", str(BOOT_SIZE // 1024)
    )
    rc.run("syslinux", "--install", "boot.fat")
    rc.run("mcopy", "-i", "boot.fat", "vmlinuz", "initrd.gz", "syslinux.cfg", "::/")
    _root_tree(root / "rootfs")
    rc.run(
        "mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", "rootfs",
        "-E", "lazy_itable_init=0,lazy_journal_init=0", "root.ext4", f"{ROOT_SIZE // 1024}k",
    )  # fmt: skip
    rc.note("disk.raw: syslinux mbr.bin + partition table, boot.fat and root.ext4 placed (tests/vmdisk.py)")
    with open(root / "disk.raw", "wb") as disk:
        disk.truncate(DISK_SIZE)
        disk.write(_mbr())
        for offset, name in ((BOOT_START, "boot.fat"), (ROOT_START, "root.ext4")):
            disk.seek(offset)
            with open(root / name, "rb") as part:
                shutil.copyfileobj(part, disk, MiB)
    rc.img("convert", "-f", "raw", "-O", "qcow2", "disk.raw", "base.qcow2")
    for p in root.iterdir():
        if p.name != "base.qcow2":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _kernel_files(deb: Path) -> tuple[bytes, dict[str, bytes]]:
    """vmlinuz and the virtio/block modules (by module name) streamed out of the .deb."""
    p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    vmlinuz, modules = b"", {}
    assert p.stdout is not None
    with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if re.fullmatch(r"\./boot/vmlinuz-.*", m.name):
                vmlinuz = tar.extractfile(m).read()
            elif re.fullmatch(
                r"\./lib/modules/[^/]+/kernel/(drivers/virtio|drivers/block|lib)/[^/]+\.ko", m.name
            ):
                modules[Path(m.name).stem.replace("-", "_")] = tar.extractfile(m).read()
    if p.wait() != 0 or not vmlinuz:
        raise DiskError(
            f"dpkg-deb --fsys-tarfile {deb}: rc={p.returncode}, vmlinuz {'found' if vmlinuz else 'missing'}"
        )
    return vmlinuz, modules


def _load_order(modules: dict[str, bytes]) -> list[str]:
    """MODULES and their dependencies (the ``depends=`` of each .modinfo), dependencies first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in modules:
            raise DiskError(f"kernel module {name} not found in the kernel .deb (built in? renamed?)")
        m = re.search(rb"\0depends=([^\0]*)\0", modules[name])
        for dep in m.group(1).decode().split(",") if m else []:
            if dep:
                visit(dep.replace("-", "_"))
        order.append(name)

    for name in MODULES:
        visit(name)
    return order


def _initramfs(modules: dict[str, bytes]) -> bytes:
    """A newc cpio archive: busybox, ``/init`` and the modules in their load order."""
    order = _load_order(modules)
    members: list[tuple[str, int, bytes, tuple[int, int]]] = [
        *((d, 0o40755, b"", (0, 0)) for d in ("bin", "dev", "lib", "proc", "root", "sys")),
        ("dev/console", 0o20600, b"", (5, 1)),
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes(), (0, 0)),
        *((f"bin/{a}", 0o120777, b"busybox", (0, 0)) for a in ("sh", "cat", "insmod", "mount", "poweroff")),
        *((f"bin/{a}", 0o120777, b"busybox", (0, 0)) for a in ("sleep", "switch_root")),
        ("init", 0o100755, INITRAMFS_INIT.encode(), (0, 0)),
        ("lib/modules.order", 0o100644, " ".join(order).encode(), (0, 0)),
        *((f"lib/{name}.ko", 0o100644, modules[name], (0, 0)) for name in order),
        ("TRAILER!!!", 0, b"", (0, 0)),
    ]
    out = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate(members, 1):
        nlink = 2 if mode & 0o40000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.write(b"\0" * (-out.tell() % 4) + data + b"\0" * (-len(data) % 4))
    return out.getvalue()


def _root_tree(top: Path) -> None:
    """The ext4 root's files: busybox and every applet, /sbin/init, mount points."""
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp"):
        (top / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, top / "bin" / "busybox")
    (top / SEED_PATH.lstrip("/")).write_bytes(seed())
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for a in applets:
        if a != "busybox":
            (top / "bin" / a).symlink_to("busybox")
    init = top / "sbin" / "init"
    init.write_text(GUEST_INIT)
    init.chmod(0o755)


def _mbr() -> bytes:
    """syslinux's MBR code and a table of two LBA partitions: FAT (active) and Linux."""
    code = SYSLINUX_MBR.read_bytes()[:440]
    table = b"".join(
        struct.pack(
            "<B3sB3sII", active, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", start // SECTOR, size // SECTOR
        )
        for active, ptype, start, size in (
            (0x80, 0x0E, BOOT_START, BOOT_SIZE),
            (0, 0x83, ROOT_START, ROOT_SIZE),
        )
    )
    return code.ljust(446, b"\0") + table.ljust(64, b"\0") + b"\x55\xaa"
