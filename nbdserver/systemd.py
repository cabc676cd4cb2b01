"""systemd integration: socket activation (LISTEN_FDS) and readiness (NOTIFY_SOCKET).

The protocol is small enough to speak without libsystemd: a socket unit
hands the listening socket over as file descriptor 3 with ``LISTEN_PID``
naming us and ``LISTEN_FDS`` counting the descriptors (sd_listen_fds); a
``Type=notify`` service tells systemd it is ready with one datagram,
``READY=1``, to the socket ``NOTIFY_SOCKET`` names (sd_notify).  qemu-nbd
and nbdkit support both.
"""

from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3


def inherited_listener(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed us, or None (the variables are then left alone).

    Only the first descriptor is used: one server, one listening socket.
    The variables are removed so that no child of ours takes them for its own.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sock = socket.socket(fileno=LISTEN_FDS_START)
    sock.set_inheritable(False)
    return sock


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """sd_notify: send ``state`` (``"READY=1"``...) if systemd asked for it; True if sent."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False
    return True
