"""What one export offers: its flags and its metadata contexts.

Everything here is pure: it turns a disk's capabilities (the
:class:`qcow2.contract.Disk` contract) into transmission flags, and names
the metadata contexts (their descriptors: :mod:`nbdserver.blockstatus`).
No sockets, no asyncio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qcow2.contract import Bitmap, Disk

from .constants import CTX_ALLOCATION_DEPTH, CTX_BASE_ALLOCATION, CTX_DIRTY_BITMAP, TFlag
from .gate import RequestGate

# The metadata contexts every export offers (how extents read in each: nbdserver.blockstatus);
# an export with bitmaps adds one CTX_DIRTY_BITMAP + name context per bitmap.
CONTEXTS: tuple[str, ...] = (CTX_BASE_ALLOCATION, CTX_ALLOCATION_DEPTH)


def list_contexts(offered: Sequence[str], queries: Sequence[str]) -> list[str]:
    """Contexts matching LIST_META_CONTEXT queries, as qemu-nbd matches them.

    No queries means every context; ``ns:`` is a namespace wildcard, and
    ``qemu:dirty-bitmap:`` one for every bitmap.  Anything else matches only
    its exact name.
    """
    if not queries:
        return list(offered)
    found: list[str] = []
    for name in offered:
        wildcards = {name, name.split(":", 1)[0] + ":"}
        if name.startswith(CTX_DIRTY_BITMAP):
            wildcards.add(CTX_DIRTY_BITMAP)
        if any(q in wildcards for q in queries):
            found.append(name)
    return found


def select_contexts(offered: Sequence[str], queries: Sequence[str]) -> list[str]:
    """Contexts SET_META_CONTEXT selects: exact names only (wildcards select nothing)."""
    return [name for name in offered if name in queries]


@dataclass
class Export:
    """A disk under a name; capabilities come from the disk's contract, not from here.

    ``multi_conn``: more than one client may connect (with ``-e 1`` a second
    connection would only wait, so CAN_MULTI_CONN must not invite one).
    ``detect_zeroes``: qemu-nbd's ``--detect-zeroes``: "off", "on" (a WRITE of
    zeros becomes a zero write) or "unmap" (an unmapping one).
    ``unmap``: qemu-nbd's ``--discard=unmap``; False (``ignore``) makes TRIM a
    no-op (zero writes still unmap when the client allows it: qemu-nbd 7.2's behaviour, measured).
    ``bitmaps``: the disk's dirty bitmaps exported as ``qemu:dirty-bitmap:NAME``
    contexts (qemu-nbd ``-B``), in the order given.
    ``per_client``: a template: each client that chooses it gets an export of its own
    (:mod:`nbdserver.overlays`); ``disk`` only tells what those disks offer.
    """

    name: str
    disk: Disk
    description: str = ""
    multi_conn: bool = True
    detect_zeroes: str = "off"
    unmap: bool = True
    bitmaps: Sequence[Bitmap] = ()
    per_client: bool = False
    gate: RequestGate = field(init=False, repr=False)
    contexts: tuple[str, ...] = field(init=False)  # the metadata contexts offered
    dirty_bitmaps: dict[str, Bitmap] = field(init=False, repr=False)  # context name -> bitmap
    # Kept by the event loop, read by workers: is anyone else using this export right now?
    connections: int = field(default=0, init=False)  # clients in the transmission phase
    in_workers: int = field(default=0, init=False)  # requests handed to worker threads, not answered

    def worker_done(self, _task: object = None) -> None:
        self.in_workers -= 1

    def contended(self) -> bool:
        """Another client, or another request waiting or running: long work should let it in."""
        return self.connections > 1 or self.in_workers > 1

    def __post_init__(self) -> None:
        self.gate = RequestGate(self.disk.thread_model)
        self.dirty_bitmaps = {CTX_DIRTY_BITMAP + b.name: b for b in self.bitmaps}
        self.contexts = CONTEXTS + tuple(self.dirty_bitmaps)

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def writable(self) -> bool:
        return self.disk.can_write

    def transmission_flags(self, structured: bool) -> TFlag:
        """Flags for this export on a connection that did (not) negotiate structured replies.

        CAN_MULTI_CONN needs a disk that promises it (every connection shares
        one disk object in one process, so a flush on any covers all) and a
        server that lets a second client in.
        """
        disk = self.disk
        flags = TFlag.HAS_FLAGS
        if disk.can_cache:
            flags |= TFlag.SEND_CACHE
        if disk.can_flush:
            flags |= TFlag.SEND_FLUSH
        if disk.can_fua:
            flags |= TFlag.SEND_FUA
        if disk.can_multi_conn and self.multi_conn:
            flags |= TFlag.CAN_MULTI_CONN
        if structured:
            flags |= TFlag.SEND_DF
        if not self.writable:
            return flags | TFlag.READ_ONLY
        if disk.can_trim:
            flags |= TFlag.SEND_TRIM
        flags |= TFlag.SEND_WRITE_ZEROES  # without can_zero the disk writes zero bytes
        if disk.can_fast_zero:
            flags |= TFlag.SEND_FAST_ZERO
        return flags
