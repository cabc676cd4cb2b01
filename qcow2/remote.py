"""NBD exports as layers: a backing file served by another NBD server.

QEMU lets an overlay name an NBD export as its backing file: a local overlay
over a golden image served elsewhere.  :func:`parse_nbd_name` reads the names
QEMU accepts for it (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``,
the older ``nbd:unix:PATH[:exportname=X]`` and ``nbd:HOST:PORT[:exportname=X]``,
and ``json:`` names whose ``file`` is an ``nbd`` node); :class:`NbdLayer` is
the export as the bottom layer of a chain (a raw backing file, or the "host
file" under a qcow2 exported raw), read through libnbd.

Block status is the remote's ``base:allocation``, mapped as QEMU's nbd driver
maps it: DATA unless HOLE, ZERO if ZERO, the offset always valid in the export
itself.  A hole that is not known to read as zeros is therefore neither data
nor zero, and not allocated: nothing below can decide it, so it stays so.

One connection, opened with the chain and closed with it, as QEMU's driver
keeps one.  Calls from the server's reader threads take turns on it under a
lock (a libnbd handle serialises its calls anyway; the lock makes it
explicit).  A second connection is not an option by default: qemu-nbd
serves one client at a time unless told otherwise, and the second handshake
would wait for ever.  libnbd releases the GIL while it waits for the remote.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass

from .contract import WouldBlock, without_waiting
from .hostfile import SECTOR, zero_fill
from .status import ALLOCATED, DATA, OFFSET_VALID, ZERO, Status

NBD_DEFAULT_PORT = "10809"
CONNECT_TIMEOUT = 30.0  # seconds for the TCP connection and the NBD handshake together
MAX_READ = 32 << 20  # QEMU's NBD_MAX_BUFFER_SIZE: no request larger, whatever the server allows
MAX_STATUS = (1 << 31) - 1  # QEMU asks at most INT_MAX bytes of block status at once
STATE_HOLE, STATE_ZERO = 1, 2  # base:allocation bits
_URL_SCHEMES = {"nbd": False, "nbd+tcp": False, "nbd+unix": True}  # scheme -> Unix socket
_PREFIXES = ("nbd:", "nbd+tcp:", "nbd+unix:")


@dataclass(frozen=True)
class NbdAddress:
    """Where an export lives; ``export`` None is the default export, as QEMU keeps it."""

    path: str | None = None  # a Unix socket ...
    host: str | None = None  # ... or a TCP host and port
    port: str = NBD_DEFAULT_PORT
    export: str | None = None

    @property
    def name(self) -> str:
        """QEMU's pseudo-filename of the node (what ``qemu-img map`` prints in its File column)."""
        if self.path is not None:
            return (
                f"nbd+unix:///{self.export}?socket={self.path}"
                if self.export
                else f"nbd+unix://?socket={self.path}"
            )
        return (
            f"nbd://{self.host}:{self.port}/{self.export}"
            if self.export
            else f"nbd://{self.host}:{self.port}"
        )

    @property
    def server(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def parse_nbd_name(name: str) -> tuple[NbdAddress, str | None] | None:
    """(address, format named inside a json: name) for an NBD backing name, None for any other.

    ValueError, in QEMU's words where it has some, for a malformed one.
    """
    if name.startswith("json:"):
        return _parse_json(name[5:])
    if not name.startswith(_PREFIXES):  # a protocol QEMU's nbd driver does not register
        return None
    if "://" in name:
        return _parse_url(name), None
    return _parse_legacy(name), None


def _parse_url(name: str) -> NbdAddress:
    from urllib.parse import parse_qsl, unquote, urlsplit

    bad = ValueError("No valid URL specified")
    try:
        url = urlsplit(name)
        port = url.port
    except ValueError:
        raise bad from None
    unix = _URL_SCHEMES.get(url.scheme)
    if unix is None:
        raise bad
    export = unquote(url.path[1:] if url.path.startswith("/") else url.path) or None
    query = parse_qsl(url.query, keep_blank_values=True)
    if len(query) > 1 or (unix and not query) or (not unix and query):
        raise bad
    if unix:
        if url.hostname or port is not None or query[0][0] != "socket":
            raise bad
        return NbdAddress(path=query[0][1], export=export)
    if not url.hostname:
        raise bad
    return NbdAddress(host=url.hostname, port=str(port or NBD_DEFAULT_PORT), export=export)


def _parse_legacy(name: str) -> NbdAddress:
    """``nbd:unix:PATH[:exportname=X]`` and ``nbd:HOST:PORT[:exportname=X]``."""
    export = None
    spec, found, rest = name.partition(":exportname=")
    if found:
        if not rest:
            raise ValueError("NBD server address missing")  # QEMU stops before the address
        export = rest
    if not spec.startswith("nbd:") or not spec[4:]:
        raise ValueError("NBD server address missing")
    spec = spec[4:]
    if spec.startswith("unix:"):
        return NbdAddress(path=spec[5:], export=export)
    if "," in spec:
        raise ValueError(f"address options are not supported: {spec!r}")
    host, colon, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port:
        raise ValueError(f"error parsing address '{spec}'")
    return NbdAddress(host=host, port=port, export=export)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_JSON_KEYS = {"driver", "file.driver", "file.export", "file.server.type", "file.server.path",
              "file.server.host", "file.server.port", "file.path", "file.host", "file.port"}  # fmt: skip


def _parse_json(text: str) -> tuple[NbdAddress, str | None] | None:
    """A ``json:`` name with an nbd ``file`` (nested or dotted keys); None if its file is not nbd."""
    import json

    try:
        tree = json.loads(text)
    except ValueError as e:
        raise ValueError(f"Could not parse the JSON options: {e}") from None
    if not isinstance(tree, dict):
        raise ValueError("Could not parse the JSON options: not an object")
    options = _flatten(tree)
    if options.get("file.driver") != "nbd":
        return None
    unknown = sorted(set(options) - _JSON_KEYS)
    if unknown:
        raise ValueError(f"json: options not supported for an NBD backing file: {', '.join(unknown)}")
    values = {k: str(v) for k, v in options.items()}
    export = values.get("file.export") or None
    kind = values.get("file.server.type")
    path = values.get("file.server.path", values.get("file.path"))
    host = values.get("file.server.host", values.get("file.host"))
    port = values.get("file.server.port", values.get("file.port", NBD_DEFAULT_PORT))
    if kind == "unix" or (kind is None and path is not None and host is None):
        if path is None:
            raise ValueError("NBD server address missing")
        address = NbdAddress(path=path, export=export)
    elif kind == "inet" or (kind is None and host is not None and path is None):
        if host is None:
            raise ValueError("NBD server address missing")
        address = NbdAddress(host=host, port=port, export=export)
    else:
        raise ValueError(
            "NBD server address missing" if kind is None else f"server type {kind!r} not supported"
        )
    fmt = values.get("driver")
    return address, fmt


def _connect_socket(address: NbdAddress) -> socket.socket:
    """A connected socket; OSError worded as QEMU's ``Failed to connect to '...': ...``."""
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as e:
        raise OSError(
            errno.EHOSTUNREACH, f"address resolution failed for {address.server}: {e.strerror}"
        ) from None
    except TimeoutError:
        raise OSError(
            errno.ETIMEDOUT, f"Failed to connect to '{address.server}': Connection timed out"
        ) from None
    except OSError as e:
        raise OSError(e.errno, f"Failed to connect to '{address.server}': {e.strerror or e}") from None


class NbdLayer:
    """An NBD export read through one libnbd connection; its size rounded up to sectors as QEMU's."""

    supports_backing = False
    backing = None
    map_window = 1 << 30  # bytes of remote block status per window

    def __init__(self, address: NbdAddress) -> None:
        try:
            import nbd  # Debian's python3-libnbd: loaded only for a remote backing file
        except ImportError:
            raise OSError(
                errno.ENOTSUP, "NBD backing files need libnbd's Python binding (python3-libnbd)"
            ) from None
        self._nbd = nbd
        self.address = address
        self.filename = address.name
        self._lock = threading.Lock()
        self._handle = self._open(address)
        h = self._handle
        self.file_size = h.get_size()
        self.size = -(-self.file_size // SECTOR) * SECTOR
        self.base_allocation = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        self.min_block = h.get_block_size(nbd.SIZE_MINIMUM) or 1
        self.max_read = min(MAX_READ, h.get_block_size(nbd.SIZE_MAXIMUM) or MAX_READ)
        self.max_status = MAX_STATUS // self.min_block * self.min_block

    def _open(self, address: NbdAddress):
        """Connect and negotiate within CONNECT_TIMEOUT (a busy qemu-nbd accepts and stays silent)."""
        nbd = self._nbd
        h = nbd.NBD()
        try:
            h.set_export_name(address.export or "")
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            # the handle owns (and closes) the descriptor from here on
            h.aio_connect_socket(_connect_socket(address).detach())
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while h.aio_is_connecting():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(
                        errno.ETIMEDOUT,
                        f"Failed to connect to '{address.server}': "
                        f"no NBD handshake within {CONNECT_TIMEOUT:g} s "
                        "(a server that takes one client at a time, busy with another?)",
                    )
                h.poll(int(left * 1000) + 1)
            if not h.aio_is_ready():
                raise OSError(errno.EIO, f"Failed to connect to '{address.server}': the NBD handshake failed")
        except nbd.Error as e:
            _close_handle(h)
            raise OSError(e.errno or errno.EIO, f"{address.name}: {_libnbd_message(e)}") from None
        except BaseException:
            _close_handle(h)
            raise
        return h

    def _call(self, method: str, *args):
        """One request on the connection, in turn; libnbd errors become OSError (EIO by default)."""
        if without_waiting.depth:  # the event loop may not wait for the network
            raise WouldBlock(errno.EAGAIN, f"{self.filename}: a remote read")
        with self._lock:
            h = self._handle
            if h is None:
                raise OSError(errno.EIO, f"{self.filename}: the connection is closed")
            try:
                return getattr(h, method)(*args)
            except self._nbd.Error as e:
                raise OSError(e.errno or errno.EIO, f"{self.filename}: {_libnbd_message(e)}") from None

    # -- block status ----------------------------------------------------------------

    def _extents(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        """(length, base:allocation flags) from ``offset`` on, as the server sent them."""
        found: list[int] = []

        def extent(context: str, _offset: int, entries: list[int], _err) -> int:
            if context == self._nbd.CONTEXT_BASE_ALLOCATION:
                found.extend(entries)
            return 0

        flags = self._nbd.CMD_FLAG_REQ_ONE if req_one else 0
        self._call("block_status", length, offset, extent, flags)
        out = list(zip(found[0::2], found[1::2], strict=False))
        if not out or not out[0][0]:
            raise OSError(errno.EIO, f"{self.filename}: the server sent no block status for offset {offset}")
        return out

    def driver_status(self, offset: int, length: int, want_zero: bool) -> Status:
        """QEMU's nbd driver: one extent (REQ_ONE), want_zero ignored; beyond the export: zeros."""
        if offset >= self.file_size:  # the sector padding past an unaligned export
            return Status(ZERO, length, 0, None)
        if not self.base_allocation:
            return Status(DATA | OFFSET_VALID, length, offset, self)
        ask = min(length, self.file_size - offset, self.max_status)
        n, state = self._extents(offset, ask, req_one=True)[0]
        if n % self.min_block:  # a server misaligned: what QEMU makes of it
            n, state = (
                (n // self.min_block * self.min_block, state) if n > self.min_block else (self.min_block, 0)
            )
        return Status(_driver_flags(state), min(n, length), offset, self)

    def status_runs(self, start: int, end: int):
        """The whole window in as few requests as the server allows (see :mod:`qcow2.extentmap`)."""
        import numpy as np

        from .extentmap import NOT_ALLOCATED_CODE, generic_runs

        if not self.base_allocation or self.min_block > 1:
            return generic_runs(self, start, end)  # one extent at a time: QEMU's answer exactly
        bounds, codes = [start], []
        pos, inside = start, min(end, self.file_size)
        while pos < inside:
            for n, state in self._extents(pos, min(inside - pos, self.max_status), req_one=False):
                n = min(n, inside - pos)  # the last one may reach past the request
                if n <= 0:
                    break
                flags = _driver_flags(state) & (DATA | ZERO)
                codes.append(flags | ALLOCATED if flags else NOT_ALLOCATED_CODE)
                pos += n
                bounds.append(pos)
        if pos < end:  # the sector padding: zeros
            codes.append(ZERO | ALLOCATED)
            bounds.append(end)
        return np.array(bounds, dtype=np.int64), np.array(codes, dtype=np.uint8)

    # -- reads -----------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes; past the end of the export they read as zeros."""
        inside = max(0, min(len(buf), self.file_size - offset))
        pos = 0
        while pos < inside:
            n = min(inside - pos, self.max_read)
            buf[pos : pos + n] = self._read(offset + pos, n)
            pos += n
        zero_fill(buf[inside:])

    def _read(self, offset: int, length: int) -> bytes:
        """A read aligned to the server's minimum block, as QEMU's block layer aligns it."""
        mb = self.min_block
        lo, hi = offset // mb * mb, min(-(-(offset + length) // mb) * mb, self.file_size)
        data = self._call("pread", hi - lo, lo)
        return data if (lo, hi) == (offset, offset + length) else data[offset - lo : offset - lo + length]

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        if offset + length <= self.file_size and length <= self.max_read:
            return self._read(offset, length)
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return buf

    read = pread  # the layer surface's name for it

    def allocated_bytes(self) -> int:
        raise OSError(errno.ENOTSUP, f"{self.filename}: an NBD export has no allocated size")

    def close(self) -> None:
        with self._lock:
            h, self._handle = self._handle, None
        if h is not None:
            try:
                h.shutdown()
            except self._nbd.Error:
                pass  # the server went away first: nothing to say goodbye to
            _close_handle(h)


def _close_handle(h) -> None:
    """Close a libnbd handle now (libnbd < 1.16 has no close(): dropping the last reference does it)."""
    close = getattr(h, "close", None)
    if close is not None:
        close()


def _driver_flags(state: int) -> int:
    return (0 if state & STATE_HOLE else DATA) | (ZERO if state & STATE_ZERO else 0) | OFFSET_VALID


def _libnbd_message(e) -> str:
    """libnbd's message without the name of its own function in front."""
    text = e.string or str(e)
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("nbd_") else text

