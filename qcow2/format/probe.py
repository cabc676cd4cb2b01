"""Which image format a first sector announces: the magics QEMU's format probes look for.

A raw image whose format was probed must never be written into something
that probes as another format: after a restart, the next probe would read a
header the guest wrote (a qcow2 header naming ``/etc/passwd`` as its backing
file, say).  QEMU's raw driver refuses such writes with EPERM; so do we,
for the formats QEMU can open.
"""

from __future__ import annotations

import struct

PROBE_SIZE = 512  # QEMU's BLOCK_PROBE_BUF_SIZE: what a probe reads, what writes are checked against

# (offset, magic, format): QEMU's probes (block/*.c, *_probe), those that read the first sector.
_MAGICS = (
    (0, b"QFI\xfb", "qcow2"),  # qcow (v1) shares it
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0", "cloop"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)
_VDI_SIGNATURE = 0xBEDA107F  # little-endian u32 at 0x40


def announced_format(sector: bytes | bytearray | memoryview) -> str | None:
    """The format a probe would take ``sector`` (the first bytes of a file) for; None for raw."""
    head = bytes(sector[:PROBE_SIZE])
    for offset, magic, name in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == _VDI_SIGNATURE:
        return "vdi"
    return None
