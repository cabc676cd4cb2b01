"""Command handlers: run one valid request against the disk, return the reply.

Handlers are plain blocking functions that return the reply as a list of
buffers for ``writelines``: small headers plus the read buffers, never a
concatenation of bulk data.  :func:`run` admits each request through the
export's gate (the disk's thread model); the server calls it on the event
loop with ``wait=False`` for small requests and in a worker otherwise.
They know nothing of sockets, so they are tested directly.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import threading
import time
from collections.abc import Callable

from qcow2.contract import Access, WouldBlock, without_waiting

from . import wire
from .constants import MAX_EXTENTS, MAX_PAYLOAD, Cmd, CmdFlag, Err, cmd_name
from .export import Export
from .handshake import Negotiated
from .requests import Request

log = logging.getLogger("nbdserver")
_DF, _REQ_ONE, _FUA = int(CmdFlag.DF), int(CmdFlag.REQ_ONE), int(CmdFlag.FUA)
_NO_HOLE, _FAST_ZERO = int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)

Buffers = list[bytes | memoryview]
Handler = Callable[[Export, Request, Negotiated, "memoryview | None"], Buffers]
# Long block status is computed one map window at a time (a bounded amount of work: see
# qcow2.extentmap): each window one turn at the gate (writers get in between), after which
# the worker lets go of the GIL for YIELD_SECONDS if anyone else uses the export.  Without
# that pause, CPython's GIL convoy starves the event loop: every time the loop thread gives
# the GIL up for a system call, it waits a whole switch interval to get it back, and one
# 4 KiB read of another client took as long as the whole map.
YIELD_SECONDS = 0.0005
# One window at a time in the whole process, its pause included: they are CPU-bound Python, the
# GIL runs one of them anyway, and with several at once the event loop competed with all of
# them (16 pipelined whole-disk maps: another client's reads took 69 ms at the median).
_WINDOW_TURN = threading.Lock()


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
        data = disk.read(offset, length)
        if structured:
            return [wire.data_chunk_header(cookie, offset, length, done=True), data]
        return [wire.simple_reply(cookie), data]
    runs = disk.read_sparse(offset, length)
    out: Buffers = []
    last = len(runs) - 1
    for i, (start, size, data) in enumerate(runs):
        if data is None:
            out.append(wire.hole_chunk(cookie, start, size, done=i == last))
        else:
            out.append(wire.data_chunk_header(cookie, start, size, done=i == last))
            out.append(data)
    return out


def do_block_status(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    """Extents one map window at a time, each window one turn at the gate.

    The allocation contexts share the disk's extent maps; each dirty bitmap
    has maps of its own.  At most MAX_EXTENTS descriptors per context
    (qemu-nbd's cap): a client asks again from where the reply ended.
    Between windows, requests that were waiting (writes) get their turn;
    what the reply describes may then mix the states before and after them,
    as for any overlapping requests.
    """
    from .blockstatus import STATUS_OF, dirty_status  # numpy: loaded with the first map

    names = [name for _, name in state.contexts]
    req_one = bool(req.flags & _REQ_ONE)
    # (maps of a range, context indices, status per context)
    sources: list[tuple[Callable, list[int], list]] = []
    allocation = [i for i, name in enumerate(names) if name in STATUS_OF]
    if allocation:
        sources.append((export.disk.extent_map, allocation, [STATUS_OF[names[i]] for i in allocation]))
    for i, name in enumerate(names):
        if name in export.dirty_bitmaps:
            sources.append((export.dirty_bitmaps[name].dirty_map, [i], [dirty_status]))
    replies: list = [None] * len(names)
    for maps, indices, mappers in sources:
        reply = _describe(export, req, maps, mappers, req_one)
        if reply.done <= 0:
            return error_reply(req, True, Err.EIO, "the disk returned no extents")
        for k, i in enumerate(indices):
            replies[i] = reply.arrays(k)
    last = len(state.contexts) - 1
    chunks: Buffers = []
    for i, (context_id, _) in enumerate(state.contexts):
        lengths, statuses = replies[i]
        chunks.append(
            wire.block_status_chunk_arrays(req.cookie, context_id, lengths, statuses, done=i == last)
        )
    return chunks


def _describe(export: Export, req: Request, maps: Callable, mappers: list, req_one: bool):
    """One source's maps of the request's range, window by window, into a reply."""
    from .blockstatus import BlockStatusReply

    reply = BlockStatusReply(req.length, mappers, req_one=req_one, limit=MAX_EXTENTS)
    gate = export.gate
    start, end = req.offset, req.offset + req.length
    while not reply.complete:
        pos = start + reply.done
        if pos >= end:
            break
        with _WINDOW_TURN:
            with gate.entered(Access.READ):
                window = maps(pos, end - pos)
            reply.take_map(window)
            if not reply.complete and export.contended():
                time.sleep(YIELD_SECONDS)
        if window.end <= pos:
            break
    return reply


@functools.cache
def _zeros() -> memoryview:
    """MAX_PAYLOAD zero bytes that cost no memory: a read-only anonymous mapping (the zero page)."""
    return memoryview(mmap.mmap(-1, MAX_PAYLOAD, prot=mmap.PROT_READ))


def do_write(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    """The payload was read by the server into a buffer of the request's size; no copy here."""
    if req.length and export.detect_zeroes != "off" and payload == _zeros()[: req.length]:
        unmap = export.detect_zeroes == "unmap"
        export.disk.write_zeroes(req.offset, req.length, may_unmap=unmap, fua=bool(req.flags & _FUA))
    elif req.length:
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
    if req.length and export.unmap:
        export.disk.trim(req.offset, req.length, fua=bool(req.flags & _FUA))
    elif req.flags & _FUA:
        export.disk.flush()
    return ok_reply(req, state.structured)


def do_flush(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    export.disk.flush()
    return ok_reply(req, state.structured)


def do_cache(export: Export, req: Request, state: Negotiated, payload: memoryview | None) -> Buffers:
    """A hint: the disk may prefetch; success either way."""
    export.disk.cache(req.offset, req.length)
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


# The group each command belongs to for the disk's thread model.
# (Plain ints, as in requests.RULES: enum members on the per-request path cost lookups.)
ACCESS: dict[int, int] = {
    int(Cmd.READ): int(Access.READ),
    int(Cmd.CACHE): int(Access.READ),
    int(Cmd.BLOCK_STATUS): int(Access.READ),
    int(Cmd.FLUSH): int(Access.FLUSH),
    int(Cmd.WRITE): int(Access.WRITE),
    int(Cmd.WRITE_ZEROES): int(Access.WRITE),
    int(Cmd.TRIM): int(Access.WRITE),
}
SELF_GATED = frozenset({int(Cmd.BLOCK_STATUS)})  # takes its turns at the gate window by window
_READ_ACCESS = int(Access.READ)


def run(
    export: Export, req: Request, state: Negotiated, payload: memoryview | None = None, wait: bool = True
) -> Buffers | None:
    """Run a request that passed :func:`~nbdserver.requests.check`; errors become error replies.

    ``wait=False`` (the event loop): None instead of waiting, at the gate or
    for the device (a read that would leave the page cache), and for requests
    that take several turns at the gate; the caller then runs the request in
    a worker.  Writes are never refused halfway: only reads are tried without
    waiting for the device.
    """
    handler = HANDLERS.get(req.cmd)
    if handler is None:
        return error_reply(req, state.structured, Err.EINVAL, "command not implemented")
    access = ACCESS[req.cmd]
    gated = req.cmd not in SELF_GATED
    if not gated and not wait:
        return None
    if gated and not export.gate.enter(access, wait):
        return None
    try:
        if wait or access != _READ_ACCESS:
            return handler(export, req, state, payload)
        with without_waiting:
            return handler(export, req, state, payload)
    except Exception as e:  # a disk failure fails this request only
        if isinstance(e, WouldBlock) and not wait:
            return None  # not in memory: the caller runs it in a worker
        error = error_for(e)
        who = state.client or f"export {export.name!r}"
        log.warning(
            "%s: %s at offset %d, length %d failed: %s", who, cmd_name(req.cmd), req.offset, req.length, e
        )
        return error_reply(req, state.structured, error, f"{type(e).__name__}: {e}")
    finally:
        if gated:
            export.gate.leave(access)


def flush(export: Export) -> None:
    """A flush outside any request (a client that wrote and left), through the gate."""
    with export.gate.entered(Access.FLUSH):
        export.disk.flush()
