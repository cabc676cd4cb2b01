"""Transmission-phase rules: parse a request header, decide whether it is valid.

One table describes every command (allowed flags, the transmission flag it
needs, whether it writes, what "past the end" means for it), so adding
WRITE/TRIM/WRITE_ZEROES handlers later changes no validation code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import wire
from .constants import MAX_PAYLOAD, REQUEST_MAGIC, Cmd, CmdFlag, Err, TFlag, cmd_name
from .handshake import Negotiated, ProtocolError


@dataclass(slots=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        """Bytes that follow the header on the wire (only WRITE carries data)."""
        return self.length if self.cmd == Cmd.WRITE else 0


def parse_request(header: bytes) -> Request:
    """Decode a 28-byte request header; a bad magic means the stream is lost."""
    magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, cmd, cookie, offset, length)


@dataclass(frozen=True)
class Rule:
    """Plain ints, not IntFlag members: enum arithmetic would dominate the per-request cost."""

    flags: int = 0  # CmdFlag bits valid on this command (FUA is handled globally)
    needs: int = 0  # TFlag bit the server must have advertised
    writes: bool = False  # refused with EPERM on a read-only export
    past_end: Err | None = Err.EINVAL  # error for a range past the end; None: offset/length must be 0
    max_length: int | None = None  # longest accepted length (payload-carrying commands)


RULES: dict[int, Rule] = {
    Cmd.READ: Rule(flags=int(CmdFlag.DF), max_length=MAX_PAYLOAD),
    Cmd.WRITE: Rule(writes=True, past_end=Err.ENOSPC, max_length=MAX_PAYLOAD),
    Cmd.DISC: Rule(past_end=None),
    Cmd.FLUSH: Rule(needs=int(TFlag.SEND_FLUSH), past_end=None),
    Cmd.TRIM: Rule(needs=int(TFlag.SEND_TRIM), writes=True),
    Cmd.CACHE: Rule(needs=int(TFlag.SEND_CACHE)),
    Cmd.WRITE_ZEROES: Rule(
        flags=int(CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
        needs=int(TFlag.SEND_WRITE_ZEROES),
        writes=True,
        past_end=Err.ENOSPC,
    ),
    Cmd.BLOCK_STATUS: Rule(flags=int(CmdFlag.REQ_ONE)),
}

# A flag valid on a command may still need its own transmission flag.
FLAG_NEEDS = {CmdFlag.FUA: TFlag.SEND_FUA, CmdFlag.DF: TFlag.SEND_DF, CmdFlag.FAST_ZERO: TFlag.SEND_FAST_ZERO}

_OK = (Err.OK, "")
_READ_ONLY = int(TFlag.READ_ONLY)


@lru_cache(maxsize=256)
def allowed_flags(cmd: int, transmission_flags: int) -> int:
    """Command flags a request may carry, given what the export advertised."""
    allowed = RULES[cmd].flags | int(CmdFlag.FUA)
    for flag, needed in FLAG_NEEDS.items():
        if not transmission_flags & needed:
            allowed &= ~int(flag)
    return allowed


def check(req: Request, state: Negotiated) -> tuple[Err, str]:
    """The NBD error for ``req`` (``Err.OK`` if it may run) and a message for error chunks."""
    rule = RULES.get(req.cmd)
    if rule is None:
        return Err.EINVAL, f"unknown {cmd_name(req.cmd)}"
    tflags = state.transmission_flags  # a plain int
    bad = req.flags & ~allowed_flags(req.cmd, tflags)
    if bad:
        return Err.EINVAL, f"unsupported flags {bad:#x} for {cmd_name(req.cmd)}"
    if rule.writes and tflags & _READ_ONLY:
        return Err.EPERM, "export is read-only"
    if rule.needs and not tflags & rule.needs:
        return Err.EINVAL, f"{cmd_name(req.cmd)} is not supported by this export"
    if rule.past_end is None:
        if req.offset or req.length:
            return Err.EINVAL, f"{cmd_name(req.cmd)} needs offset and length 0"
        return _OK
    size = state.export.size
    if req.offset > size or req.length > size - req.offset:
        return rule.past_end, f"{cmd_name(req.cmd)} beyond the end of the export"
    if rule.max_length is not None and req.length > rule.max_length:
        return Err.EINVAL, f"{cmd_name(req.cmd)} longer than {rule.max_length} bytes"
    if req.cmd == Cmd.BLOCK_STATUS:
        if not state.contexts:
            return Err.EINVAL, "no metadata context was negotiated"
        if req.length == 0:
            return Err.EINVAL, "BLOCK_STATUS needs a non-zero length"
    return _OK
