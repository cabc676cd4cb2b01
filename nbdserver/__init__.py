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
