"""A window of a disk: the bytes from ``offset`` on, as a disk of its own (qemu-nbd ``--offset``).

For a raw image with a partition table in front, say: the export starts
where the partition does.  Every call of the contract is passed on, moved
by ``offset``; extents and sparse runs come back moved the other way.
"""

from __future__ import annotations

from .contract import Buffer, Disk, ExtentMap, SparseRun


class DiskWindow(Disk):
    def __init__(self, disk: Disk, offset: int) -> None:
        if not 0 <= offset <= disk.size:
            raise ValueError(f"offset {offset} is outside the {disk.size}-byte image")
        self.disk = disk
        self.offset = offset
        for name in ("thread_model", "can_write", "can_trim", "can_zero", "can_fast_zero", "can_flush",
                     "can_fua", "can_cache", "can_multi_conn", "can_extents", "min_block_size"):  # fmt: skip
            setattr(self, name, getattr(disk, name))

    @property
    def size(self) -> int:
        return self.disk.size - self.offset

    def read(self, offset: int, length: int) -> Buffer:
        return self.disk.read(self.offset + offset, length)

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.disk.readinto(self.offset + offset, buf)

    def extents(self, offset: int, length: int):
        return self.disk.extents(self.offset + offset, length)

    def extent_map(self, offset: int, length: int) -> ExtentMap:
        m = self.disk.extent_map(self.offset + offset, length)
        return ExtentMap(m.bounds - self.offset, m.flags, m.depth)

    def read_sparse(self, offset: int, length: int) -> list[SparseRun]:
        return [
            (start - self.offset, n, data)
            for start, n, data in self.disk.read_sparse(self.offset + offset, length)
        ]

    def cache(self, offset: int, length: int) -> None:
        self.disk.cache(self.offset + offset, length)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.disk.write(self.offset + offset, data, fua=fua)

    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self.disk.write_zeroes(self.offset + offset, length, may_unmap=may_unmap, fast=fast, fua=fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.disk.trim(self.offset + offset, length, fua=fua)

    def flush(self) -> None:
        self.disk.flush()

    def close(self) -> None:
        self.disk.close()
