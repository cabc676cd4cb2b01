"""Host files: raw images, data files and the file under a qcow2 image.

The host-file layer is where bytes meet descriptors: every read, write,
sync, hole punch and truncate of the driver goes through :class:`HostFile`
(the qcow2 metadata owner decides *when*, this layer only *does*).  A host
file is also a layer of a chain: block status comes from SEEK_DATA/SEEK_HOLE,
as in QEMU's file-posix driver, so holes in sparse files read as zeros and
say so.  Its calls may come from several threads at once (positioned I/O).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct

from .contract import WouldBlock, without_waiting
from .status import DATA, OFFSET_VALID, ZERO, Status

SECTOR = 512
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE  # deallocate, keep the file's size
_ZEROS = bytes(1 << 20)
MAX_OFFSET = (1 << 63) - 1  # off_t: no file reaches beyond


# QEMU's permission locks (block/file-posix.c): OFD read locks on single bytes.  Byte
# LOCK_PERM_BASE + i: "I use permission i"; byte LOCK_SHARED_BASE + i: "nobody else may".
# Being compatible byte for byte is what lets QEMU's tools and us see each other.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_READ = 1 << 0  # BLK_PERM_CONSISTENT_READ
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
_PERM_NAMES = ((PERM_READ, "consistent read"), (PERM_WRITE, "write"),
               (PERM_WRITE_UNCHANGED, "write unchanged"), (PERM_RESIZE, "resize"))  # fmt: skip
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


_OTHER = "another process (QEMU, or another server) has the image open"


class LockConflict(OSError):
    """Another process holds a permission lock we need (or uses what we would deny)."""


def _unreachable(filename: str, offset: int) -> OSError:
    return OSError(errno.EIO, f"{filename}: offset {offset:#x} is beyond what any file can hold")


_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's (find_library runs ldconfig)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode; Python's os module only offers mode 0."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def zero_fill(part: memoryview) -> None:
    """Fill a buffer with zeros (in slices of one shared zero block, no allocation)."""
    n = len(part)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        part[pos : pos + k] = _ZEROS[:k]
        pos += k


class HostFile:
    """A plain file; its size is rounded up to 512 bytes as QEMU sees it."""

    supports_backing = False
    backing = None
    map_window = 1 << 30  # bytes of SEEK_DATA / SEEK_HOLE per block-status window

    def __init__(self, filename: str, writable: bool = False, *, create: bool = False) -> None:
        self.filename = filename
        flags = os.O_RDWR if writable or create else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        # O_NONBLOCK: a FIFO would block open() until a writer came; it is refused instead.
        self.fd = os.open(filename, flags | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        kind = stat.S_IFMT(os.fstat(self.fd).st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFBLK):
            os.close(self.fd)
            what = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device"}
            raise OSError(
                errno.EINVAL, f"{what.get(kind, 'a socket')}, not a regular file or block device", filename
            )
        os.set_blocking(self.fd, True)
        self.can_nowait = hasattr(os, "RWF_NOWAIT")  # until the filesystem says otherwise
        self._unsupported: set[int] = set()  # fallocate modes the filesystem refused, likewise
        self.refresh_size()

    def lock(self, hold: int, deny: int) -> None:
        """Take QEMU's locks for permissions ``hold`` that we deny others ``deny``; or fail.

        As QEMU does, the locks are set first and the conflicts tested after
        (an OFD lock never conflicts with its own descriptor); on a conflict
        every lock of ours is dropped again and LockConflict names what the
        other process holds.
        """
        try:
            for bit, _ in _PERM_NAMES:
                if hold & bit:
                    self._set_lock(LOCK_PERM_BASE + bit.bit_length() - 1, fcntl.F_RDLCK)
                if deny & bit:
                    self._set_lock(LOCK_SHARED_BASE + bit.bit_length() - 1, fcntl.F_RDLCK)
            for bit, name in _PERM_NAMES:
                index = bit.bit_length() - 1
                # A permission we take clashes with a "shared" byte of theirs, and a permission we
                # deny with their use of it: QEMU's raw_check_lock_bytes.
                if hold & bit and self._locked_by_other(LOCK_SHARED_BASE + index):
                    why = f'"{name}" lock: {_OTHER} and does not allow {name} access'
                elif deny & bit and self._locked_by_other(LOCK_PERM_BASE + index):
                    why = f'shared "{name}" lock: {_OTHER} for {name} access'
                else:
                    continue
                raise LockConflict(errno.EAGAIN, f"Failed to get {why}", self.filename)
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        with contextlib.suppress(OSError):
            self._set_lock(LOCK_PERM_BASE, fcntl.F_UNLCK, 200)

    def _set_lock(self, byte: int, kind: int, length: int = 1) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, length, 0))

    def _locked_by_other(self, byte: int) -> bool:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        kind = _FLOCK.unpack(fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, probe))[0]
        return kind != fcntl.F_UNLCK

    def refresh_size(self) -> None:
        self.file_size = os.fstat(self.fd).st_size
        self.size = -(-self.file_size // SECTOR) * SECTOR

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def driver_status(self, offset: int, length: int, want_zero: bool) -> Status:
        if not want_zero:
            return Status(DATA | OFFSET_VALID, length, offset, self)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # trailing hole
                return Status(ZERO | OFFSET_VALID, length, offset, self)
            return Status(DATA | OFFSET_VALID, length, offset, self)
        if data > offset:
            return Status(ZERO | OFFSET_VALID, data - offset, offset, self)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        if hole <= offset:
            return Status(DATA | OFFSET_VALID, length, offset, self)
        return Status(DATA | OFFSET_VALID, hole - offset, offset, self)

    def status_runs(self, start: int, end: int):
        """Holes and data by SEEK_HOLE / SEEK_DATA, as arrays (see :mod:`qcow2.extentmap`)."""
        from .extentmap import generic_runs  # numpy: loaded with the first map, not at start-up

        return generic_runs(self, start, end)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes; bytes past the end of the file read as zeros."""
        if offset + len(buf) > MAX_OFFSET:
            raise _unreachable(self.filename, offset)
        want = len(buf)
        done = 0
        if without_waiting.depth:
            done = self._read_cached(offset, buf)
        while done < want:
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(want - done)
                return
            done += n

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (zeros past the end of the file).

        os.pread hands the kernel a fresh, uninitialised buffer: no zero-fill
        and no copy on the common path of a full read.
        """
        if offset + length > MAX_OFFSET:  # an offset from a corrupt table: EIO, as QEMU answers
            raise _unreachable(self.filename, offset)
        if without_waiting.depth:
            buf = bytearray(length)
            view = memoryview(buf)
            done = self._read_cached(offset, view)
            if done < length:
                self.readinto(offset + done, view[done:])  # past the end of the file, or cannot tell
            return buf
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        view = memoryview(buf)
        view[: len(data)] = data
        self.readinto(offset + len(data), view[len(data) :])
        return bytes(buf)

    read = pread  # the layer surface's name for it

    def _read_cached(self, offset: int, buf: memoryview) -> int:
        """What the page cache holds of the range (RWF_NOWAIT); WouldBlock where it stops short.

        Returns the bytes read: all of them, or where the file ends (the caller
        zero-fills), or 0 when the filesystem cannot tell (the caller reads).
        """
        if not self.can_nowait:
            return 0
        want, done = len(buf), 0
        while done < want:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done, os.RWF_NOWAIT)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    raise WouldBlock(errno.EAGAIN, f"{self.filename}: not in the page cache") from None
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.can_nowait = False
                    return done
                raise
            if n == 0:
                return done  # end of file
            done += n
        return done

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset + len(data) > MAX_OFFSET:
            raise _unreachable(self.filename, offset)
        done = 0
        view = memoryview(data)
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        if offset + done > self.file_size:  # the write made the file this long
            self.file_size = offset + done
            self.size = -(-self.file_size // SECTOR) * SECTOR

    def zero_range(self, offset: int, length: int) -> bool:
        """Zero without writing data; False if the filesystem can't.

        QEMU's order (file-posix, handle_aiocb_write_zeroes): FALLOC_FL_ZERO_RANGE
        (unwritten extents); else punch a hole and allocate it again (tmpfs has
        no ZERO_RANGE); else, past the end of the file, plain allocation (what
        lies there reads as zeros already).  What the filesystem refuses once is
        not asked again.  Past the end of the file the last step comes first: the
        same blocks end up allocated (QEMU's maps of an image depend on that),
        for one system call instead of two.
        """
        done = offset >= self.file_size and self._fallocate(0, offset, length)  # one call, past EOF
        if not done:
            done = self._fallocate(FALLOC_FL_ZERO_RANGE, offset, length)
        if not done:
            done = self._fallocate(_PUNCH_HOLE, offset, length) and self._fallocate(0, offset, length)
        if done and offset + length > self.file_size:
            self.refresh_size()
        return done

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate; False if the filesystem refuses.  A mode it cannot do at all is not
        asked again."""
        if mode in self._unsupported:
            return False
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._unsupported.add(mode)
                return False
            if e.errno == errno.EINVAL:
                return False
            raise
        return True

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False, fast: bool = False) -> None:
        """A raw disk: punch a hole when allowed, else zero the range in place."""
        if may_unmap and self._fallocate(_PUNCH_HOLE, offset, length):
            return
        if self.zero_range(offset, length):
            return
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing this range needs data writes")
        self.write_zero_bytes(offset, length)

    def write_zero_bytes(self, offset: int, length: int) -> None:
        """Zeros written as data (where zero_range cannot, or the blocks must be allocated)."""
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZEROS))
            self.write(offset, memoryview(_ZEROS)[:n])
            offset += n

    def preallocate(self, offset: int, length: int) -> None:
        """Reserve blocks (posix_fallocate): later writes there cannot fail with ENOSPC."""
        os.posix_fallocate(self.fd, offset, length)
        self.refresh_size()

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.refresh_size()

    def trim(self, offset: int, length: int) -> None:
        self._fallocate(_PUNCH_HOLE, offset, length)  # a hint: a filesystem may refuse

    def flush(self) -> None:
        os.fsync(self.fd)

    def resize(self, size: int) -> None:
        """A raw disk's new size (QEMU rounds raw sizes to whole sectors too)."""
        self.truncate(size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
