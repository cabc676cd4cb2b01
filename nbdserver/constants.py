"""Numbers of the NBD protocol (fixed newstyle, structured replies).

Names follow the spec without the ``NBD_`` prefix, grouped in IntEnum/IntFlag
classes so logs and test failures print names instead of bare integers.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": greeting and every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Size limits.
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept; advertised in NBD_INFO_BLOCK_SIZE
MAX_STRING = 4096  # spec: names, descriptions, messages must not be longer
MAX_OPTION_LENGTH = 64 * 1024  # option data above this is abuse: drop the client
# Descriptors per BLOCK_STATUS chunk: 1 MiB of them, qemu-nbd's cap (the spec's ceiling is 2^20).
# A client asks again from where a reply ended, so a whole-disk query on a fragmented image comes
# back in pieces instead of one reply that ties up the server for seconds.
MAX_EXTENTS = (1 << 20) // 8
EXPORT_NAME_PADDING = 124  # zero bytes after the EXPORT_NAME reply unless NO_ZEROES


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


def _name(kind: type[IntEnum], code: int, what: str) -> str:
    """The constant's name for logs, or ``what`` and the number when unknown."""
    try:
        return kind(code).name
    except ValueError:
        return f"{what} {code}"


def opt_name(code: int) -> str:
    return _name(Opt, code, "option")


REP_ERROR_BIT = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(IntFlag):
    """Transmission flags (per export, per connection)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


def cmd_name(code: int) -> str:
    return _name(Cmd, code, "command")


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


REPLY_FLAG_DONE = 1 << 0


class Chunk(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


class Err(IntEnum):
    """Error values of the transmission phase (a closed set, not host errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation status bits.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

CTX_BASE_ALLOCATION = "base:allocation"
CTX_ALLOCATION_DEPTH = "qemu:allocation-depth"
CTX_DIRTY_BITMAP = "qemu:dirty-bitmap:"  # + the bitmap's name: one context per exported bitmap
