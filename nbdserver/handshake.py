"""The fixed-newstyle handshake as a sans-I/O state machine.

The connection code asks :attr:`Handshake.need` how many bytes to read,
passes exactly those bytes to :meth:`Handshake.feed`, sends the replies of
the returned :class:`Step`, and stops when the step says so.  All protocol
decisions (export, structured replies, meta contexts, NO_ZEROES) live here,
so they are tested by feeding bytes, without sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import NamedTuple

from construct import Construct, ConstructError, Container

from . import wire
from .constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    PREFERRED_BLOCK_SIZE,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    opt_name,
)
from .export import Export, list_contexts, select_contexts

SERVER_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class ProtocolError(Exception):
    """The client broke a MUST (or looks abusive): drop the connection, answer nothing."""


@dataclass
class Negotiated:
    """What the handshake settled; the transmission phase runs on this."""

    export: Export
    structured: bool
    contexts: list[tuple[int, str]]  # (id, name) of the selected meta contexts
    transmission_flags: int  # TFlag bits, kept a plain int for the per-request checks
    client: str = ""  # who, for log lines (the connection names its peer here)


class Step(NamedTuple):
    replies: list[bytes]
    result: Negotiated | None = None  # set once transmission begins
    close: bool = False  # the client aborted: close after sending the replies
    start_tls: bool = False  # after the replies: the TLS handshake, then :meth:`Handshake.tls_started`
    # Before sending the replies: open the client's own disk for ``result.export`` (a per-client
    # export) and put it there; if that fails, send :meth:`Handshake.attach_failed`'s instead.
    attach: bool = False


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    DONE = auto()


class _Invalid(Exception):
    """An option's data is malformed: answer ERR_INVALID and go on."""


@dataclass
class Handshake:
    """One connection's handshake; ``exports`` maps names (``""`` = default) to exports."""

    exports: Mapping[str, Export]
    #: FORCEDTLS: until STARTTLS succeeds, every option but STARTTLS and ABORT gets
    #: ERR_TLS_REQD and nothing about the exports is revealed.
    tls_required: bool = False
    tls_active: bool = field(default=False, init=False)
    structured: bool = field(default=False, init=False)
    no_zeroes: bool = field(default=False, init=False)
    contexts: list[tuple[int, str]] = field(default_factory=list, init=False)
    _meta_export: str | None = field(default=None, init=False)  # export the selection was made for
    _next_context_id: int = field(default=0, init=False)
    _state: _State = field(default=_State.CLIENT_FLAGS, init=False)
    _need: int = field(default=4, init=False)
    _option: int = field(default=0, init=False)

    @staticmethod
    def greeting() -> bytes:
        return wire.Greeting.build({"handshake_flags": SERVER_FLAGS})

    @property
    def need(self) -> int:
        """Bytes the next :meth:`feed` expects (0 once the handshake is over)."""
        return self._need if self._state is not _State.DONE else 0

    def feed(self, data: bytes) -> Step:
        """Consume exactly :attr:`need` bytes; raise :class:`ProtocolError` to drop the client."""
        if len(data) != self.need:
            raise ValueError(f"expected {self.need} bytes, got {len(data)}")
        if self._state is _State.CLIENT_FLAGS:
            return self._client_flags(data)
        if self._state is _State.OPTION_HEADER:
            header = wire.OptionRequestHeader.parse(data)
            if header.magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {header.magic:#x}")
            if header.length > MAX_OPTION_LENGTH:
                raise ProtocolError(f"{opt_name(header.option)} with {header.length} bytes of data")
            self._option = header.option
            if header.length:
                self._state, self._need = _State.OPTION_DATA, header.length
                return Step([])
            return self._run_option(b"")
        if self._state is _State.OPTION_DATA:
            return self._run_option(data)
        raise ValueError("handshake is over")

    # --- states -------------------------------------------------------------

    def _client_flags(self, data: bytes) -> Step:
        flags = wire.ClientFlags.parse(data).client_flags
        unknown = flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if unknown:
            raise ProtocolError(f"unknown client flags {unknown:#x}")
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._state, self._need = _State.OPTION_HEADER, 16
        return Step([])

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: everything negotiated before is forgotten."""
        self.tls_active = True
        self.structured = False
        self.contexts, self._meta_export = [], None

    def _run_option(self, data: bytes) -> Step:
        option = self._option
        self._state, self._need = _State.OPTION_HEADER, 16
        if self.tls_required and not self.tls_active and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:  # cannot be answered with an error: end the session
                raise ProtocolError("EXPORT_NAME before TLS on a server that requires TLS")
            return Step(
                [self._error(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")]
            )
        handler = _HANDLERS.get(option)
        if handler is None:
            return Step([self._error(option, Rep.ERR_UNSUP, f"{opt_name(option)} is not supported")])
        try:
            return handler(self, data)
        except _Invalid as e:
            return Step([self._error(option, Rep.ERR_INVALID, str(e))])

    # --- helpers ------------------------------------------------------------

    @staticmethod
    def _reply(option: int, rep: int, data: bytes = b"") -> bytes:
        return wire.option_reply(option, rep, data)

    @staticmethod
    def _error(option: int, rep: Rep, message: str) -> bytes:
        return wire.option_reply(option, rep, message.encode("utf-8")[:MAX_STRING])

    @staticmethod
    def _no_data(option: int, data: bytes) -> None:
        if data:
            raise _Invalid(f"{opt_name(option)} takes no data")

    @staticmethod
    def _parse(layout: Construct, data: bytes) -> Container:
        try:
            return layout.parse(data)
        except (ConstructError, UnicodeDecodeError, struct.error) as e:
            raise _Invalid(f"malformed option data ({type(e).__name__})") from None

    @staticmethod
    def _check_string(text: str, what: str) -> None:
        if len(text.encode("utf-8")) > MAX_STRING:
            raise _Invalid(f"{what} longer than {MAX_STRING} bytes")
        if "\0" in text:
            raise _Invalid(f"{what} contains NUL")

    def _enter_transmission(self, export: Export) -> Negotiated:
        self._state = _State.DONE
        if self._meta_export != export.name:
            self.contexts = []  # the selection was made for another export
        return Negotiated(
            export, self.structured, list(self.contexts), int(export.transmission_flags(self.structured))
        )

    # --- options ------------------------------------------------------------

    def _opt_export_name(self, data: bytes) -> Step:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("EXPORT_NAME with a name that is not UTF-8") from None
        export = self.exports.get(name)
        if export is None:
            raise ProtocolError(f"EXPORT_NAME for unknown export {name!r}")
        result = self._enter_transmission(export)
        reply = wire.ExportNameReply.build(
            {"size": export.size, "transmission_flags": result.transmission_flags}
        )
        if not self.no_zeroes:
            reply += bytes(EXPORT_NAME_PADDING)
        return Step([reply], result, attach=export.per_client)

    def _opt_abort(self, data: bytes) -> Step:
        self._state = _State.DONE
        return Step([self._reply(Opt.ABORT, Rep.ACK)], close=True)

    def _opt_list(self, data: bytes) -> Step:
        self._no_data(Opt.LIST, data)
        replies = [
            self._reply(
                Opt.LIST, Rep.SERVER, wire.RepServer.build({"name": e.name, "description": e.description})
            )
            for e in self.exports.values()
        ]
        replies.append(self._reply(Opt.LIST, Rep.ACK))
        return Step(replies)

    def _opt_info(self, data: bytes, option: int = Opt.INFO) -> Step:
        request = self._parse(wire.InfoRequest, data)
        self._check_string(request.name, "export name")
        export = self.exports.get(request.name)
        if export is None:
            return Step([self._error(option, Rep.ERR_UNKNOWN, f"export {request.name!r} not found")])
        wanted = set(request.requests)
        flags = export.transmission_flags(self.structured)
        items = [wire.InfoExport.build({"size": export.size, "transmission_flags": flags})]
        if Info.NAME in wanted:
            items.append(wire.InfoName.build({"name": export.name}))
        if Info.DESCRIPTION in wanted and export.description:
            items.append(wire.InfoDescription.build({"description": export.description}))
        # Sent even when not asked for, like qemu-nbd: it binds only clients that asked.
        items.append(
            wire.InfoBlockSize.build(
                {
                    "minimum": max(MIN_BLOCK_SIZE, export.disk.min_block_size),
                    "preferred": PREFERRED_BLOCK_SIZE,
                    "maximum": MAX_PAYLOAD,
                }
            )
        )
        replies = [self._reply(option, Rep.INFO, item) for item in items]
        replies.append(self._reply(option, Rep.ACK))
        if option == Opt.GO:
            return Step(replies, self._enter_transmission(export), attach=export.per_client)
        return Step(replies)

    def attach_failed(self, message: str) -> Step:
        """The client's own disk could not be opened after GO: ERR_UNKNOWN, and the options go on.

        After EXPORT_NAME no error can be sent: the client is dropped.
        """
        if self._option == Opt.EXPORT_NAME:
            raise ProtocolError(f"EXPORT_NAME: {message}")
        self._state, self._need = _State.OPTION_HEADER, 16
        return Step([self._error(Opt.GO, Rep.ERR_UNKNOWN, message)])

    def _opt_go(self, data: bytes) -> Step:
        return self._opt_info(data, Opt.GO)

    def _opt_structured_reply(self, data: bytes) -> Step:
        self._no_data(Opt.STRUCTURED_REPLY, data)
        if self.structured:
            raise _Invalid("structured replies already negotiated")
        self.structured = True
        return Step([self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)])

    def _meta_request(self, data: bytes) -> tuple[Export | None, list[str]]:
        request = self._parse(wire.MetaContextRequest, data)
        self._check_string(request.name, "export name")
        for query in request.queries:
            self._check_string(query, "context query")
        return self.exports.get(request.name), list(request.queries)

    def _opt_list_meta_context(self, data: bytes) -> Step:
        option = Opt.LIST_META_CONTEXT
        export, queries = self._meta_request(data)
        if export is None:
            return Step([self._error(option, Rep.ERR_UNKNOWN, "export not found")])
        replies = [
            self._reply(option, Rep.META_CONTEXT, wire.RepMetaContext.build({"context_id": 0, "name": name}))
            for name in list_contexts(export.contexts, queries)
        ]
        replies.append(self._reply(option, Rep.ACK))
        return Step(replies)

    def _opt_set_meta_context(self, data: bytes) -> Step:
        option = Opt.SET_META_CONTEXT
        self.contexts, self._meta_export = [], None  # replaced even if this SET fails
        if not self.structured:
            raise _Invalid("SET_META_CONTEXT needs structured replies first")
        export, queries = self._meta_request(data)
        if export is None:
            return Step([self._error(option, Rep.ERR_UNKNOWN, "export not found")])
        replies = []
        for name in select_contexts(export.contexts, queries):
            context_id = self._next_context_id  # never reused on this connection
            self._next_context_id += 1
            self.contexts.append((context_id, name))
            payload = wire.RepMetaContext.build({"context_id": context_id, "name": name})
            replies.append(self._reply(option, Rep.META_CONTEXT, payload))
        self._meta_export = export.name
        replies.append(self._reply(option, Rep.ACK))
        return Step(replies)

    def _opt_starttls(self, data: bytes) -> Step:
        if not self.tls_required:
            return Step([self._error(Opt.STARTTLS, Rep.ERR_POLICY, "TLS is not configured on this server")])
        self._no_data(Opt.STARTTLS, data)
        if self.tls_active:
            raise _Invalid("TLS is already active")
        return Step([self._reply(Opt.STARTTLS, Rep.ACK)], start_tls=True)


_HANDLERS = {
    Opt.EXPORT_NAME: Handshake._opt_export_name,
    Opt.ABORT: Handshake._opt_abort,
    Opt.LIST: Handshake._opt_list,
    Opt.INFO: Handshake._opt_info,
    Opt.GO: Handshake._opt_go,
    Opt.STRUCTURED_REPLY: Handshake._opt_structured_reply,
    Opt.LIST_META_CONTEXT: Handshake._opt_list_meta_context,
    Opt.SET_META_CONTEXT: Handshake._opt_set_meta_context,
    Opt.STARTTLS: Handshake._opt_starttls,
    # EXTENDED_HEADERS, PEEK_EXPORT and unknown codes: ERR_UNSUP.
}
