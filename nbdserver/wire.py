"""Byte layouts of NBD messages.

Handshake structures are ``construct`` definitions written like the spec's
tables: they run a few times per connection, so readability wins.  The
per-request path uses precompiled :class:`struct.Struct` objects and builder
functions that return small headers; bulk data is never copied into them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from construct import (
    Const,
    GreedyString,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
    Terminated,
)

from .constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Info,
)

# --- Handshake (construct) -------------------------------------------------

Greeting = Struct(
    "magic" / Const(NBDMAGIC, Int64ub),
    "opt_magic" / Const(IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)

ClientFlags = Struct("client_flags" / Int32ub)

OptionRequestHeader = Struct(
    "magic" / Int64ub,  # checked by the state machine: a mismatch drops the client
    "option" / Int32ub,
    "length" / Int32ub,
)

OptionReplyHeader = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "reply_type" / Int32ub,
    "length" / Int32ub,
)

ExportNameReply = Struct(
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)

# NBD_OPT_INFO / NBD_OPT_GO data.
InfoRequest = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "requests" / PrefixedArray(Int16ub, Int16ub),
    Terminated,
)

# NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data.
MetaContextRequest = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "queries" / PrefixedArray(Int32ub, PascalString(Int32ub, "utf8")),
    Terminated,
)

RepServer = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "description" / GreedyString("utf8"),
)

RepMetaContext = Struct(
    "context_id" / Int32ub,
    "name" / GreedyString("utf8"),
)

InfoExport = Struct(
    "info" / Const(Info.EXPORT.value, Int16ub),
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)

InfoName = Struct(
    "info" / Const(Info.NAME.value, Int16ub),
    "name" / GreedyString("utf8"),
)

InfoDescription = Struct(
    "info" / Const(Info.DESCRIPTION.value, Int16ub),
    "description" / GreedyString("utf8"),
)

InfoBlockSize = Struct(
    "info" / Const(Info.BLOCK_SIZE.value, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One option reply: 20-byte header and its data."""
    header = OptionReplyHeader.build({"option": option, "reply_type": reply_type, "length": len(data)})
    return header + data


# --- Transmission hot path (struct) ---------------------------------------

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
DATA_CHUNK = struct.Struct(">IHHQIQ")  # CHUNK + offset; the data follows
HOLE_CHUNK = struct.Struct(">IHHQIQI")  # CHUNK + offset + hole size
ERROR_CHUNK = struct.Struct(">IHHQIIH")  # CHUNK + error + message length; the message follows
STATUS_CHUNK = struct.Struct(">IHHQII")  # CHUNK + context id; the descriptors follow

# Plain ints for the hot path (enum member access costs more than the packing).
_NONE, _DATA, _HOLE = int(Chunk.NONE), int(Chunk.OFFSET_DATA), int(Chunk.OFFSET_HOLE)
_STATUS, _ERROR = int(Chunk.BLOCK_STATUS), int(Chunk.ERROR)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def none_chunk(cookie: int) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, _NONE, cookie, 0)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; the caller sends ``length`` data bytes after it."""
    flags = REPLY_FLAG_DONE if done else 0
    return DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, _DATA, cookie, 8 + length, offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return HOLE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, _HOLE, cookie, 12, offset, length)


def error_chunk(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    text = message.encode("utf-8")[:4096]
    flags = REPLY_FLAG_DONE if done else 0
    header = ERROR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, _ERROR, cookie, 6 + len(text), error, len(text))
    return header + text


def block_status_chunk_arrays(cookie: int, context_id: int, lengths, statuses, done: bool) -> bytes:
    """A BLOCK_STATUS chunk from numpy arrays of lengths and statuses (at least one)."""
    import numpy as np  # only maps need numpy; start-up does not

    pairs = np.empty((len(lengths), 2), dtype=">u4")
    pairs[:, 0] = lengths
    pairs[:, 1] = statuses
    flags = REPLY_FLAG_DONE if done else 0
    header = STATUS_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, flags, _STATUS, cookie, 4 + 8 * len(lengths), context_id
    )
    return header + pairs.tobytes()


def block_status_chunk(cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool) -> bytes:
    """A BLOCK_STATUS chunk from (length, status) pairs, at least one."""
    lengths, statuses = zip(*extents, strict=True)
    return block_status_chunk_arrays(cookie, context_id, lengths, statuses, done)
