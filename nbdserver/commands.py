"""Command handlers: run one valid request against the disk, return the reply.

Handlers are plain blocking functions (the server runs them in worker
threads) that return the reply as a list of buffers for ``writelines``:
small headers plus memoryviews of the read buffer, never a concatenation of
bulk data.  They know nothing of sockets, so they are tested directly.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from . import wire
from .constants import Cmd, CmdFlag, Err, cmd_name
from .export import CONTEXTS, Export, block_status, read_plan
from .handshake import Negotiated
from .requests import Request

log = logging.getLogger("nbdserver")
_DF, _REQ_ONE, _FUA = int(CmdFlag.DF), int(CmdFlag.REQ_ONE), int(CmdFlag.FUA)
_NO_HOLE, _FAST_ZERO = int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)

Buffers = list[bytes | memoryview]
Handler = Callable[[Export, Request, Negotiated, "memoryview | None"], Buffers]


def error_reply(req: Request, structured: bool, error: int, message: str) -> Buffers:
    """A failed request: an ERROR chunk with a message, or a simple reply."""
    if structured:
        return [wire.error_chunk(req.cookie, error, message)]
    return [wire.simple_reply(req.cookie, error)]


def ok_reply(req: Request, structured: bool) -> Buffers:
    if structured:
        return [wire.none_chunk(req.cookie)]
    return [wire.simple_reply(req.cookie)]


# Host errno -> NBD error; anything else is EIO.  ENOTSUP is not here: only a
# FAST_ZERO request may answer it (see do_write_zeroes).
_ERRNO = {
    errno.EPERM: Err.EPERM,
    errno.EACCES: Err.EPERM,
    errno.EROFS: Err.EPERM,
    errno.EINVAL: Err.EINVAL,
    errno.ENOMEM: Err.ENOMEM,
    errno.ENOSPC: Err.ENOSPC,
    errno.EDQUOT: Err.ENOSPC,
    errno.EFBIG: Err.ENOSPC,
}


def error_for(exc: BaseException) -> Err:
    """Map a host exception onto NBD's closed set of error values."""
    if isinstance(exc, OSError) and exc.errno in _ERRNO:
        return _ERRNO[exc.errno]
    if isinstance(exc, MemoryError):
        return Err.ENOMEM
    return Err.EIO


def do_read(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    cookie, offset, length = req.cookie, req.offset, req.length
    structured = state.structured
    if length == 0:
        return ok_reply(req, structured)
    disk = export.disk
    if not structured or req.flags & _DF:
        data = _read(disk, offset, length)
        if structured:
            return [wire.data_chunk_header(cookie, offset, length, done=True), data]
        return [wire.simple_reply(cookie), data]
    runs = read_plan(disk.extents(offset, length), offset, length)
    out: Buffers = []
    last = len(runs) - 1
    for i, (start, size, zero) in enumerate(runs):
        if zero:
            out.append(wire.hole_chunk(cookie, start, size, done=i == last))
        else:
            out.append(wire.data_chunk_header(cookie, start, size, done=i == last))
            out.append(_read(disk, start, size))
    return out


def _read(disk, offset: int, length: int) -> bytes | bytearray | memoryview:
    """A buffer of the guest bytes: the disk's own read() when it has one.

    Disks that can (qcow2, raw) hand back a buffer the kernel filled directly,
    skipping the zero-fill of a fresh bytearray on every request.
    """
    read = getattr(disk, "read", None)
    if read is not None:
        return read(offset, length)
    buf = bytearray(length)
    disk.readinto(offset, memoryview(buf))
    return buf


def do_block_status(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    mappers = [CONTEXTS[name] for _, name in state.contexts]
    extents = export.disk.extents(req.offset, req.length)
    per_context = block_status(extents, req.length, mappers, req_one=bool(req.flags & _REQ_ONE))
    if any(not d for d in per_context):
        return error_reply(req, True, Err.EIO, "the disk returned no extents")
    last = len(per_context) - 1
    return [
        wire.block_status_chunk(req.cookie, context_id, descriptors, done=i == last)
        for i, ((context_id, _), descriptors) in enumerate(zip(state.contexts, per_context, strict=True))
    ]


def do_write(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    """The payload was read by the server into a buffer of the request's size; no copy here."""
    if req.length:
        export.disk.write(req.offset, payload, fua=bool(req.flags & _FUA))
    elif req.flags & _FUA:
        export.disk.flush()
    return ok_reply(req, state.structured)


def do_write_zeroes(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    """NO_HOLE keeps the range allocated; without it holes are allowed (may_unmap).

    FAST_ZERO: the disk raises ENOTSUP, before changing anything, when zeroing
    would mean writing zero bytes; that (and only that) becomes NBD_ENOTSUP.
    """
    fast = bool(req.flags & _FAST_ZERO)
    if req.length:
        try:
            export.disk.write_zeroes(
                req.offset,
                req.length,
                may_unmap=not req.flags & _NO_HOLE,
                fast=fast,
                fua=bool(req.flags & _FUA),
            )
        except OSError as e:
            if fast and e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return error_reply(req, state.structured, Err.ENOTSUP, "zeroing this range is not fast")
            raise
    elif req.flags & _FUA:
        export.disk.flush()
    return ok_reply(req, state.structured)


def do_trim(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    if req.length:
        export.disk.trim(req.offset, req.length, fua=bool(req.flags & _FUA))
    elif req.flags & _FUA:
        export.disk.flush()
    return ok_reply(req, state.structured)


def do_flush(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    export.disk.flush()
    return ok_reply(req, state.structured)


def do_cache(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    """A hint: disks that can prefetch offer ``cache(offset, length)``; success either way."""
    cache = getattr(export.disk, "cache", None)
    if cache is not None:
        cache(req.offset, req.length)
    return ok_reply(req, state.structured)


HANDLERS: dict[int, Handler] = {
    Cmd.READ: do_read,
    Cmd.WRITE: do_write,
    Cmd.WRITE_ZEROES: do_write_zeroes,
    Cmd.TRIM: do_trim,
    Cmd.FLUSH: do_flush,
    Cmd.CACHE: do_cache,
    Cmd.BLOCK_STATUS: do_block_status,
}


def run(export: Export, req: Request, state: Negotiated, payload: memoryview | None = None) -> Buffers:
    """Run a request that passed :func:`~nbdserver.requests.check`; errors become error replies."""
    handler = HANDLERS.get(req.cmd)
    if handler is None:
        return error_reply(req, state.structured, Err.EINVAL, "command not implemented")
    try:
        return handler(export, req, state, payload)
    except Exception as e:  # a disk failure fails this request only
        error = error_for(e)
        log.warning("%s at offset %d, length %d failed: %s", cmd_name(req.cmd), req.offset, req.length, e)
        return error_reply(req, state.structured, error, f"{type(e).__name__}: {e}")
