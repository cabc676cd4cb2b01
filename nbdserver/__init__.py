"""NBD server exporting qcow2 (and raw) images.

Layout, protocol apart from I/O:

- ``constants``: the protocol's numbers.
- ``wire``: byte layouts (construct for the handshake, struct for requests/replies).
- ``handshake``: the option-haggling state machine, fed bytes, returning replies.
- ``requests``: request parsing and the per-command validation table.
- ``export``: export flags from disk capabilities, meta contexts, extent maths.
- ``commands``: blocking command handlers returning reply buffers.
- ``stream``: a connection's bytes (payloads received straight into request buffers).
- ``server``: asyncio connections (the only module doing network I/O); disk calls
  of a non-thread-safe disk are serialised (one worker, inline reads only when idle).
- ``cli``: the ``qcow2-nbd`` command.
"""

import os as _os
import sys as _sys
from importlib.machinery import PathFinder as _PathFinder


def _our_driver_first() -> None:
    """Make ``import qcow2`` find the driver installed beside this package.

    QEMU's iotests (and other tools) put a module named ``qcow2.py`` on
    PYTHONPATH; without this, the server would import that one and die.
    """
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if "qcow2" in _sys.modules:
        return
    spec = _PathFinder.find_spec("qcow2", _sys.path)
    ours = _os.path.join(root, "qcow2", "__init__.py")
    if spec is None or spec.origin is None or _os.path.abspath(spec.origin) != ours:
        if _os.path.isfile(ours):
            _sys.path.insert(0, root)


_our_driver_first()
