"""asyncio transport: accept clients, move bytes, run requests concurrently.

Protocol decisions come from :mod:`.handshake`, :mod:`.requests` and
:mod:`.commands`; this module only reads what they ask for, writes what they
return, and keeps one misbehaving client from hurting the others.

Where a request runs: small reads and writes are tried on the event loop
(cheaper than a hop to a thread), but only if the disk's gate admits them
at once; everything else, and whatever the gate would make wait, runs in a
pool of worker threads, where requests the disk's thread model lets overlap
really do (host reads release the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from qcow2.contract import Access, ThreadModel

from . import commands
from .constants import Cmd, Err, cmd_name
from .export import Export
from .handshake import Handshake, Negotiated, ProtocolError, Step
from .metrics import Metrics, reply_is_error
from .requests import Request, check, parse_request
from .stream import Stream
from .tls import TlsConfig

if TYPE_CHECKING:
    from .overlays import ClientOverlays

log = logging.getLogger("nbdserver")
T = TypeVar("T")

MAX_IN_FLIGHT = 64  # requests per connection being served at once
IN_FLIGHT_BYTES = 64 * 1024 * 1024  # read/write bytes per connection held in memory at once
# ... and in the whole server: beyond this, new requests wait for others to finish (they do
# not fail), so many clients with big requests cannot make a well-behaved one run out.
SERVER_IN_FLIGHT_BYTES = 1024 * 1024 * 1024
MMAP_PAYLOAD_MIN = 1024 * 1024  # WRITE payloads from this size are received into a mapping
HANDSHAKE_LIMIT = 10.0  # seconds a client gets to finish negotiating (qemu-nbd's default)
DISCARD_CHUNK = 1024 * 1024  # a refused WRITE payload is skipped this much at a time
# Requests that cost less on the event loop than a hop to a worker thread and back: reads
# from the page cache (a read that would wait for the device is refused there, RWF_NOWAIT,
# and goes to a worker), and writes that touch a few clusters (a write cannot be refused
# like that, so only small ones).  FLUSH and FUA (an fsync) never.  Measured with
# nbdcopy's 256 KiB reads of 2 GiB from the page cache: 1.66 s with reads inline up to
# 64 KiB, 1.27 s up to 1 MiB (qemu-nbd 1.01 s).
INLINE_READ_MAX = 1024 * 1024
INLINE_MAX = 64 * 1024
INLINE_COMMANDS = frozenset({Cmd.READ, Cmd.CACHE, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM})
# Threads for disk work when a disk lets calls overlap: two per usable CPU (at most 8), enough
# to overlap waits on the device, few enough that they do not spend their time handing the GIL
# to each other (measured: nbdcopy of 1 GiB from the page cache on 2 CPUs took 0.69 s with 4
# workers, 0.77 s with 8).
WORKERS = min(8, 2 * len(os.sched_getaffinity(0)))
_FUA = 1
ACCEPT_RETRY_DELAY = 0.1  # back-off after a failed accept() (e.g. out of file descriptors)
SHUTDOWN_GRACE = 30.0  # seconds in-flight requests get to finish after SIGTERM
SHUTDOWN_LINGER = 2.0  # seconds a client gets to hang up after our last reply at shutdown


def payload_buffer(n: int) -> memoryview:
    """A buffer for a WRITE payload of ``n`` bytes that costs memory only as bytes arrive.

    Big ones are anonymous mappings: untouched pages cost nothing, so a client
    that announces 32 MiB and sends one byte holds one page, and the memory
    goes back to the system as soon as the request is done.  Small ones come
    from the heap (cheaper to get than a mapping).
    """
    if n >= MMAP_PAYLOAD_MIN:
        return memoryview(mmap.mmap(-1, n))
    return memoryview(bytearray(n))


class _ByteBudget:
    """Bounds the bytes of requests in flight on one connection (one oversized request may run alone).

    Only the connection's reader acquires; workers release without awaiting,
    so a cancelled request can never leak budget.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = limit
        self._released = asyncio.Event()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        while self.free < n:
            self._released.clear()
            await self._released.wait()
        self.free -= n
        return n

    def release(self, n: int) -> None:
        self.free += n
        self._released.set()


class Connection:
    """One client, from greeting to close."""

    def __init__(self, server: Server, stream: Stream, peer: str):
        self.server = server
        self.stream = stream
        self.peer = peer
        self._task: asyncio.Task | None = None
        self._reading: asyncio.Task | None = None
        self._requests: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._bytes = _ByteBudget(IN_FLIGHT_BYTES)
        self._stopping = False
        self._idle = False  # waiting for a request header, no byte of it received yet
        self._unflushed: Export | None = None  # export written since this client's last FLUSH
        self._attached: Export | None = None  # this client's own export (a per-client overlay)

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            limit = self.server.handshake_limit
            try:
                async with asyncio.timeout(limit if limit > 0 else None):
                    negotiated = await self._handshake()
            except TimeoutError:
                log.warning("%s: handshake not finished within %g s; dropping the client", self.peer, limit)
                return
            if negotiated is not None:
                log.info(
                    "%s: export %r, structured replies %s, contexts %s",
                    self.peer,
                    negotiated.export.name,
                    negotiated.structured,
                    [n for _, n in negotiated.contexts],
                )
                export = negotiated.export
                # From here on every line about this client names its export too.
                self.peer = negotiated.client = f"{self.peer}, export {export.name!r}"
                export.connections += 1
                try:
                    self._reading = asyncio.create_task(self._read_requests(negotiated))
                    await asyncio.wait([self._reading])
                finally:
                    export.connections -= 1
                if not self._reading.cancelled():
                    self._reading.result()
                await self._finish_requests()
                if self._stopping:
                    await self._linger()
        except ProtocolError as e:
            log.warning("%s: %s; dropping the client", self.peer, e)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                log.info("%s: disconnected in the middle of a message", self.peer)
            else:
                log.info("%s: disconnected", self.peer)
        except (ConnectionError, TimeoutError) as e:
            log.info("%s: connection lost: %s", self.peer, e)
        except asyncio.CancelledError:
            log.info("%s: closed by server shutdown", self.peer)
        except Exception:
            log.exception("%s: internal error; dropping the client", self.peer)
        finally:
            for task in self._requests:
                task.cancel()
            # The reading task holds its exception, whose traceback holds the reading frame (its
            # buffers, and this connection): a cycle only a full collection would free.
            self._reading = None
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._flush_after_client()  # before the close the client may be waiting for
            if self._attached is not None:
                await self._detach()
            self.stream.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.stream.wait_closed()
            log.info("%s: closed", self.peer)

    async def _flush_after_client(self) -> None:
        """A client that wrote and left without FLUSH: persist its writes now.

        The driver keeps metadata updates in memory until a flush; a client
        leaving is the natural moment to put them on disk for the next reader.
        """
        export, self._unflushed = self._unflushed, None
        if export is None or self._stopping:
            return  # server shutdown closes (and so flushes) the disk itself
        try:
            await self.server.run_in_worker(commands.flush, export)
        except Exception as e:
            log.error("%s: flush after disconnect failed: %s", self.peer, e)

    async def _detach(self) -> None:
        """The client has gone: close its own export (a throwaway overlay goes with it).

        Shielded: a server shutdown that cancels this connection must not leave the disk open.
        """
        export, self._attached = self._attached, None
        assert export is not None and self.server.overlays is not None
        try:
            await asyncio.shield(self.server.run_in_worker(self.server.overlays.detach, export))
        except asyncio.CancelledError:
            pass
        except Exception as e:
            log.error("%s: closing the client's overlay failed: %s", self.peer, e)

    def stop(self) -> None:
        """Server shutdown: start no new request; those received still get answered.

        A request whose header has arrived is read to its end and served;
        requests already buffered behind it are answered with ESHUTDOWN.
        """
        self._stopping = True
        if self._reading is None:
            if self._task is not None:
                self._task.cancel()  # still in the handshake: nothing in flight
        elif self._idle:
            self._reading.cancel()

    async def _linger(self) -> None:
        """After the last reply: half-close, then wait a little for the client to hang up.

        Closing with unread requests in our receive queue would send a reset,
        and a reset can destroy replies the client has not read yet.
        """
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.stream.drain()
            self.stream.write_eof()
            await asyncio.wait_for(self.stream.discard_until_eof(), SHUTDOWN_LINGER)

    async def _handshake(self) -> Negotiated | None:
        hs = Handshake(self.server.exports, tls_required=self.server.tls is not None)
        self.stream.writelines([hs.greeting()])
        while True:
            step = hs.feed(await self.stream.readexactly(hs.need))
            if step.attach:
                step = await self._attach(hs, step)
            if step.replies:
                self.stream.writelines(step.replies)
                await self.stream.drain()
            if step.close:
                log.info("%s: client aborted the handshake", self.peer)
                return None
            if step.start_tls:
                await self._start_tls()
                hs.tls_started()
            if step.result is not None:
                return step.result

    async def _attach(self, hs: Handshake, step: Step) -> Step:
        """A per-client export chosen: open the client's own disk (in a worker), then reply."""
        assert step.result is not None and self.server.overlays is not None
        name = step.result.export.name
        opening = asyncio.ensure_future(self.server.run_in_worker(self.server.overlays.attach, name))
        try:
            export = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Dropped meanwhile (handshake limit, shutdown): the overlay is closed again once
            # open, or a kept one would stay "in use" by nobody until the server stops.
            opening.add_done_callback(self.server.release_orphan)
            raise
        except Exception as e:
            log.warning("%s: cannot give the client its own overlay: %s", self.peer, e)
            return hs.attach_failed(str(e))
        step.result.export = self._attached = export
        return step

    async def _start_tls(self) -> None:
        """After STARTTLS's ACK: the TLS handshake on this connection, then the authorisation."""
        stream, tls = self.stream, self.server.tls
        if stream.buffered:
            raise ProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
        stream.flush_pending()
        stream.tls = True
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                stream.transport, stream, self.server.tls_context, server_side=True,
                ssl_handshake_timeout=self.server.handshake_limit or None,
            )  # fmt: skip
        except (ssl.SSLError, OSError, TimeoutError) as e:
            raise ProtocolError(f"TLS handshake failed: {e}") from None
        if transport is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        stream.transport = transport
        allowed, subject = tls.allows(transport.get_extra_info("peercert"))
        if not allowed:
            raise ProtocolError(f"client certificate {subject} is not on the --tls-authz list")
        cipher = transport.get_extra_info("cipher")
        log.info("%s: TLS established (%s), client %s", self.peer, cipher, subject)

    async def _read_requests(self, negotiated: Negotiated) -> None:
        stream = self.stream
        metrics, export_name = self.server.metrics, negotiated.export.name
        while True:
            if self._stopping and not stream.buffered:
                return
            self._idle = not stream.buffered
            if self._idle:
                stream.shrink()  # an idle client keeps a small buffer
            try:
                header = await stream.readexactly(28)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                log.info("%s: client hung up without NBD_CMD_DISC", self.peer)
                return
            finally:
                self._idle = False
            req = parse_request(header)
            if self._stopping:
                if req.cmd == Cmd.DISC:
                    return
                await self._discard(req.payload_length)
                self.stream.writelines(
                    commands.error_reply(req, negotiated.structured, Err.ESHUTDOWN, "server shutting down")
                )
                await self.stream.drain()
                continue
            error, message = check(req, negotiated)
            if req.cmd == Cmd.DISC:
                if error:
                    log.warning("%s: malformed NBD_CMD_DISC (%s); disconnecting anyway", self.peer, message)
                return
            if error:
                await self._discard(req.payload_length)
                metrics.request(export_name, req.cmd, req.length, 0.0, True)
                log.debug("%s: %s refused: %s", self.peer, cmd_name(req.cmd), message)
                self.stream.writelines(commands.error_reply(req, negotiated.structured, error, message))
                await self.stream.drain()
                continue
            if req.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM):
                self._unflushed = negotiated.export
            elif req.cmd == Cmd.FLUSH:
                self._unflushed = None
            payload = None
            if self.server.can_run_inline(req):
                if req.payload_length:
                    payload = payload_buffer(req.payload_length)
                    await stream.readinto(payload)
                started = time.perf_counter() if metrics.enabled else 0.0
                buffers = commands.run(negotiated.export, req, negotiated, payload, wait=False)
                if buffers is not None:
                    if metrics.enabled:
                        elapsed = time.perf_counter() - started
                        metrics.request(export_name, req.cmd, req.length, elapsed, reply_is_error(buffers[0]))
                    self.stream.writelines(buffers)
                    await self.stream.drain()
                    continue
            await self._slots.acquire()
            wanted = req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0
            held = await self._bytes.acquire(wanted)
            try:
                if req.payload_length and payload is None:  # received straight into a buffer of its size
                    payload = payload_buffer(req.payload_length)
                    await stream.readinto(payload)
                # The server-wide share only now: a payload costs memory as it arrives (see
                # payload_buffer), so a client that announces a big WRITE and stalls holds none of
                # it, and cannot make everyone else wait.
                held_server = await self.server.budget.acquire(wanted)
            except BaseException:
                self._bytes.release(held)
                self._slots.release()
                raise
            negotiated.export.in_workers += 1
            task = asyncio.create_task(self._serve(negotiated, req, payload, held, held_server))
            payload = None  # the task holds it; this frame must not (a traceback would keep it)
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            task.add_done_callback(negotiated.export.worker_done)

    async def _discard(self, length: int) -> None:
        scratch = memoryview(bytearray(min(length, DISCARD_CHUNK)))
        while length:
            n = min(length, DISCARD_CHUNK)
            await self.stream.readinto(scratch[:n])
            length -= n

    async def _serve(
        self, negotiated: Negotiated, req: Request, payload: memoryview | None, held: int, held_server: int
    ) -> None:
        started = time.perf_counter() if self.server.metrics.enabled else 0.0
        try:
            buffers = await self.server.run_in_worker(
                commands.run,
                negotiated.export,
                req,
                negotiated,
                payload,
                lane=self.server.lane(req, negotiated),
            )
            metrics = self.server.metrics
            if metrics.enabled:
                elapsed = time.perf_counter() - started
                metrics.request(
                    negotiated.export.name, req.cmd, req.length, elapsed, reply_is_error(buffers[0])
                )
            if self.stream.is_closing():
                return
            self.stream.writelines(buffers)  # no await between chunks: the reply goes out whole
            await self.stream.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("%s: internal error in %s; dropping the client", self.peer, cmd_name(req.cmd))
            self.stream.close()  # the reply is lost: better a closed connection than a client waiting forever
        finally:
            payload = None
            self._slots.release()
            self._bytes.release(held)
            self.server.budget.release(held_server)

    async def _finish_requests(self) -> None:
        while self._requests:
            await asyncio.wait(set(self._requests))


class Server:
    """Serves ``exports`` on any number of listening sockets."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        max_clients: int = 0,
        workers: int | None = None,
        handshake_limit: float = HANDSHAKE_LIMIT,
        tls: TlsConfig | None = None,
        metrics: Metrics | None = None,
        overlays: ClientOverlays | None = None,
    ) -> None:
        self.exports = exports if overlays is None else overlays.exports(exports)
        self.overlays = overlays  # gives per-client exports their own disks
        self.metrics = metrics if metrics is not None else Metrics()
        self.tls = tls  # None: no TLS (STARTTLS gets ERR_POLICY); else FORCEDTLS
        self.tls_context = tls.context() if tls is not None else None
        self.handshake_limit = handshake_limit  # seconds; 0: no limit
        self.budget = _ByteBudget(SERVER_IN_FLIGHT_BYTES)
        self.connections: set[Connection] = set()
        self._slots = asyncio.Semaphore(max_clients) if max_clients > 0 else None
        if workers is None:
            serial = all(e.disk.thread_model == ThreadModel.SERIALIZE_ALL_REQUESTS for e in exports.values())
            workers = 1 if serial else WORKERS
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        # Lanes, so that one kind of request never queues behind another kind's long work.
        # Writes to a disk that runs them alone anyway queue on one thread of their own: handing
        # each to whichever pool thread is free only made them wait for each other at the gate
        # and pass the GIL around.  Block status (long, CPU-bound, computed one window at a time
        # in the process) gets two threads, so two clients' maps interleave window by window; in
        # the pool, 8 pipelined whole-disk maps held every thread and a read queued behind
        # them for 8 s.
        self._lanes = {
            "pool": self._executor,
            "write": ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbd-write"),
            "status": ThreadPoolExecutor(max_workers=2, thread_name_prefix="nbd-status"),
        }
        self._tasks: set[asyncio.Task] = set()
        self._accepted = 0
        self.on_last_client_gone: Callable[[], None] | None = None  # qemu-nbd without -t: exit

    @staticmethod
    def can_run_inline(req: Request) -> bool:
        """Worth trying on the event loop: a small request without FUA (the gate decides the rest)."""
        if req.cmd == Cmd.READ:
            return req.length <= INLINE_READ_MAX
        return req.cmd in INLINE_COMMANDS and req.length <= INLINE_MAX and not req.flags & _FUA

    @staticmethod
    def lane(req: Request, negotiated: Negotiated) -> str:
        """Which threads run a request: "status", "write" (when the disk runs writes alone) or "pool"."""
        if req.cmd == Cmd.BLOCK_STATUS:
            return "status"
        if (
            commands.ACCESS.get(req.cmd) == Access.WRITE
            and negotiated.export.disk.thread_model != ThreadModel.PARALLEL
        ):
            return "write"
        return "pool"

    def release_orphan(self, opening: asyncio.Future) -> None:
        """A client's own export opened after the client was dropped: close it."""
        if opening.cancelled() or opening.exception() is not None:
            return
        task = asyncio.ensure_future(self._release(opening.result()))
        self._tasks.add(task)  # shutdown waits for it
        task.add_done_callback(self._tasks.discard)

    async def _release(self, export: Export) -> None:
        assert self.overlays is not None
        try:
            try:
                closing = self._lanes["pool"].submit(self.overlays.detach, export)
            except RuntimeError:  # the workers are gone (shutdown): close it here
                self.overlays.detach(export)
                return
            await asyncio.wrap_future(closing)
        except Exception as e:
            log.error("closing an overlay of a dropped client failed: %s", e)

    async def run_in_worker(self, fn: Callable[..., T], *args: object, lane: str = "pool") -> T:
        """Run a blocking call on the threads of ``lane``."""
        return await asyncio.wrap_future(self._lanes[lane].submit(fn, *args))

    async def accept_loop(self, listener: socket.socket) -> None:
        """Accept clients until cancelled; with ``max_clients``, wait for a free slot first."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            if self._slots is not None:
                await self._slots.acquire()
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as e:
                self._release_slot()
                log.error("accept failed: %s", e)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            except BaseException:
                self._release_slot()
                raise
            task = asyncio.create_task(self._client(sock, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _client(self, sock: socket.socket, addr: object) -> None:
        self._accepted += 1
        peer = (
            f"client {self._accepted} ({addr[0]}:{addr[1]})"
            if isinstance(addr, tuple)
            else f"client {self._accepted}"
        )
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = Stream()
            await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, sock)
        except Exception as e:
            log.warning("%s: cannot set up the connection: %s", peer, e)
            sock.close()
            self._release_slot()
            return
        log.info("%s: connected", peer)
        conn = Connection(self, stream, peer)
        self.connections.add(conn)
        self.metrics.clients(+1)
        try:
            await conn.run()
        finally:
            self.metrics.clients(-1)
            self.connections.discard(conn)
            self._release_slot()
            if not self.connections and self.on_last_client_gone is not None:
                self.on_last_client_gone()

    async def shutdown(self) -> None:
        """Stop reading requests, let those in flight finish, close every connection."""
        for conn in list(self.connections):
            conn.stop()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
            for task in late:  # clients that stopped reading their replies
                task.cancel()
            if late:
                await asyncio.wait(late)
        for executor in self._lanes.values():
            executor.shutdown(wait=True)
