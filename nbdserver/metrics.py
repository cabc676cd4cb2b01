"""``--metrics ADDR``: Prometheus text on HTTP, per export and command.

Requests, bytes, errors and latency per command and export, and the
clients connected.  prometheus_client (the Prometheus project's own Python
client) serves them from a thread of its own, from a registry of ours.
Without ``--metrics`` the server holds a :class:`Metrics` that does
nothing, and prometheus_client is never imported.
"""

from __future__ import annotations

import struct

from .constants import SIMPLE_REPLY_MAGIC, cmd_name

_SIMPLE = struct.Struct(">II")  # magic, error
_CHUNK_TYPE = struct.Struct(">H")  # structured chunk type at offset 6; bit 15 = error


def reply_is_error(first: bytes | memoryview) -> bool:
    """Whether a reply (its first buffer) reports an error, simple or structured."""
    magic, error = _SIMPLE.unpack_from(first, 0)
    if magic == SIMPLE_REPLY_MAGIC:
        return error != 0
    return bool(_CHUNK_TYPE.unpack_from(first, 6)[0] & 0x8000)


class Metrics:
    """The interface, doing nothing (no --metrics)."""

    enabled = False

    def request(self, export: str, cmd: int, length: int, seconds: float, error: bool) -> None:
        pass

    def clients(self, delta: int) -> None:
        pass


class PrometheusMetrics(Metrics):
    enabled = True

    def __init__(self, host: str, port: int) -> None:
        import prometheus_client as p

        self.registry = registry = p.CollectorRegistry()
        labels = ("export", "command")
        self._requests = p.Counter("nbd_requests", "requests answered", labels, registry=registry)
        self._bytes = p.Counter("nbd_request_bytes", "bytes read or written", labels, registry=registry)
        self._errors = p.Counter("nbd_request_errors", "requests answered with an error", labels,
                                 registry=registry)  # fmt: skip
        self._latency = p.Histogram("nbd_request_seconds", "time from request to reply", labels,
                                    registry=registry)  # fmt: skip
        self._clients = p.Gauge("nbd_clients", "clients connected", registry=registry)
        self.server, self.thread = p.start_http_server(port, host, registry=registry)

    def request(self, export: str, cmd: int, length: int, seconds: float, error: bool) -> None:
        labels = (export, cmd_name(cmd))
        self._requests.labels(*labels).inc()
        self._latency.labels(*labels).observe(seconds)
        if error:
            self._errors.labels(*labels).inc()
        elif cmd in (0, 1):  # READ, WRITE
            self._bytes.labels(*labels).inc(length)

    def clients(self, delta: int) -> None:
        self._clients.inc(delta)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (all addresses) or ``PORT``; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
