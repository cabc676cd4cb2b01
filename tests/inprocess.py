"""Our server's real Server class run in a thread of the test process, on a Unix socket.

For tests that need to hold the server's disk or driver objects in their hands (a disk that
waits for the test, overlays that open when told), which a forked server would not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from nbdserver.server import Server


@contextlib.contextmanager
def in_process_server(make_server: Callable[[], Server], sock: Path) -> Iterator[None]:
    """Serve on ``sock`` until the block ends; ``make_server`` runs in the server's event loop."""
    started = threading.Event()
    state: dict = {}

    async def main() -> None:
        server = make_server()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock))
        listener.listen(16)
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        accepting = asyncio.create_task(server.accept_loop(listener))
        started.set()
        await state["stop"].wait()
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        listener.close()
        await server.shutdown()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
