"""One connection's byte stream: reads straight into the caller's buffers.

asyncio's StreamReader hands out fresh ``bytes`` (copied out of a growing
internal buffer); a WRITE payload would then be copied again into a buffer of
the request's size.  :class:`Stream` is a :class:`asyncio.BufferedProtocol`:
small messages (request headers, handshake options) land in a fixed staging
buffer, and a big payload is received by the kernel directly into the
request's own buffer (:meth:`Stream.readinto`).  The write side offers what
the server used from StreamWriter: ``writelines``, ``drain``, ``close``.
"""

from __future__ import annotations

import asyncio
import collections

# Bytes buffered ahead of the reader (headers, small payloads): a connection starts with a
# small buffer (an idle client costs little) that grows while data arrives faster than it
# is read, up to STAGING_MAX, and shrinks again when the connection goes idle.
STAGING_MIN = 8 * 1024
STAGING_MAX = 256 * 1024
STAGING_SIZE = STAGING_MAX  # kept for callers that size things by it
SHRINK_DELAY = 1.0  # seconds after the reader first found nothing to read
PARTIAL_KEPT = 64  # bytes of a cut message kept in IncompleteReadError (not a whole payload)
COALESCE_MAX = 1024 * 1024  # replies held back to share one writev, at most this many bytes
DIRECT_MIN = 16 * 1024  # a read still missing this much goes straight into the caller's buffer


class Stream(asyncio.BufferedProtocol):
    """Protocol and reader/writer in one; a single task reads, any task may write."""

    def __init__(self, staging_size: int = STAGING_MIN, staging_max: int = STAGING_MAX) -> None:
        self._min = staging_size
        self._max = max(staging_max, staging_size)
        self._buf = bytearray(staging_size)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._target: memoryview | None = None  # the reader's buffer while filled directly
        self._filled = 0  # bytes received into _target
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._paused_reading = False
        self._paused_writing = False
        self._drainers: collections.deque[asyncio.Future] = collections.deque()
        self._lost = False
        self._closed: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set with the transport
        self._pending: list | None = None  # replies written in this loop iteration, not yet sent
        self._pending_bytes = 0
        self._shrink_timer: asyncio.TimerHandle | None = None
        self.tls = False  # set once STARTTLS has wrapped the transport

    # --- protocol callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Kept: asyncio.get_running_loop() costs a getpid() system call per call in 3.11.
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # move the unread tail to the front
            n = self._end - self._start
            self._view[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf) and len(self._buf) < self._max:
            self._resize(min(self._max, 4 * len(self._buf)))  # full of unread bytes: grow
        return self._view[self._end :]

    def _resize(self, size: int) -> None:
        n = self._end - self._start
        buf = bytearray(size)
        buf[:n] = self._view[self._start : self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, n

    def shrink(self) -> None:
        """The reader is idle: if the buffer has grown, go back to the small one in a moment.

        Not at once: a client with many requests in flight empties the buffer
        between every two bursts, and would make it grow again each time.
        """
        if len(self._buf) > self._min and self._shrink_timer is None and self._loop is not None:
            self._shrink_timer = self._loop.call_later(SHRINK_DELAY, self._shrink_if_idle)

    def _shrink_if_idle(self) -> None:
        self._shrink_timer = None
        if self._start == self._end and len(self._buf) > self._min and self._target is None:
            self._start = self._end = 0
            self._resize(self._min)

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start == self._max and not self._paused_reading:
            self._paused_reading = True  # the reader is behind: let TCP push back
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep the write side open: requests in flight still get their replies.  (TLS has no
        # half-close: the peer's close_notify ends the session, and asyncio ignores the answer.)
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        if self._shrink_timer is not None:
            self._shrink_timer.cancel()
            self._shrink_timer = None
        self._eof = True
        self._lost = True
        self._wake()
        while self._drainers:
            fut = self._drainers.popleft()
            if not fut.done():
                fut.set_result(None)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        while self._drainers:
            fut = self._drainers.popleft()
            if not fut.done():
                fut.set_result(None)

    # --- reading --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _consumed(self) -> None:
        if self._paused_reading and self._end - self._start < self._max:
            self._paused_reading = False
            if not self._lost:
                self.transport.resume_reading()

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._end - self._start

    async def discard_until_eof(self) -> None:
        """Drop everything the peer sends until it stops sending."""
        while True:
            self._start = self._end
            self._consumed()
            if self._eof:
                return
            await self._wait()

    async def readexactly(self, n: int) -> bytes:
        """``n`` bytes as ``bytes``; IncompleteReadError if the peer stops sending first."""
        if n > self._max:
            buf = bytearray(n)
            await self.readinto(memoryview(buf))
            return bytes(buf)
        while self._end - self._start < n:
            if self._eof:
                partial = bytes(self._view[self._start : min(self._end, self._start + PARTIAL_KEPT)])
                self._start = self._end
                raise asyncio.IncompleteReadError(partial, n)
            if self._end - self._start + (len(self._buf) - self._end) < n:
                self._resize(max(n, len(self._buf)))  # room for the whole message
            await self._wait()
        start = self._start
        data = bytes(self._view[start : start + n])
        self._start = start + n
        self._consumed()
        return data

    async def readinto(self, view: memoryview) -> None:
        """Fill ``view`` completely; big remainders are received into it without a copy."""
        n = len(view)
        pos = 0
        while True:
            avail = self._end - self._start
            if avail:
                k = min(avail, n - pos)
                view[pos : pos + k] = self._view[self._start : self._start + k]
                self._start += k
                pos += k
                self._consumed()
            if pos == n:
                return
            if self._eof:  # the bytes that came are not copied out: only a hint of them
                raise asyncio.IncompleteReadError(bytes(view[: min(pos, PARTIAL_KEPT)]), n)
            if n - pos < DIRECT_MIN:
                await self._wait()
                continue
            # The staging buffer is empty: let the transport write into ``view`` itself.
            self._target, self._filled = view[pos:], 0
            try:
                while self._target is not None and not self._eof:
                    await self._wait()
            finally:
                pos += self._filled
                self._target = None

    # --- writing --------------------------------------------------------------------

    def writelines(self, buffers) -> None:
        """Queue replies; all written in one loop iteration go out in one writev.

        With many requests in flight, one recv brings many requests and their
        replies leave together instead of one send call each.
        """
        if self._lost:
            return
        if self._pending is None:
            self._pending = []
            self._loop.call_soon(self._flush)
        self._pending.extend(buffers)
        self._pending_bytes += sum(len(b) for b in buffers)
        if self._pending_bytes >= COALESCE_MAX:
            self._flush()

    def flush_pending(self) -> None:
        """Hand the replies held back to the transport now (before it is replaced, as by TLS)."""
        if self._pending is not None:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, None, 0
        if pending and not self._lost:
            self.transport.writelines(pending)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._paused_writing:
            return
        fut = self._loop.create_future()
        self._drainers.append(fut)
        await fut
        if self._lost:
            raise ConnectionResetError("connection lost")

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after our last byte; we can still read."""
        self._flush()
        if not self._lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def is_closing(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)
