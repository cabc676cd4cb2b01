"""The sans-I/O protocol code, fed bytes and checked bytes/decisions (no sockets)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import qcow2
from nbdserver import commands, wire
from nbdserver.blockstatus import block_status
from nbdserver.constants import (
    CTX_ALLOCATION_DEPTH,
    CTX_BASE_ALLOCATION,
    MAX_OPTION_LENGTH,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    Info,
    Opt,
    Rep,
    TFlag,
)
from nbdserver.export import Export
from nbdserver.handshake import Handshake, Negotiated, ProtocolError
from nbdserver.requests import Request, check, parse_request
from qcow2.contract import Extent, read_plan

MiB = 1 << 20
SIZE = 4 * MiB
RO_FLAGS = (
    TFlag.HAS_FLAGS
    | TFlag.READ_ONLY
    | TFlag.SEND_FLUSH
    | TFlag.SEND_FUA
    | TFlag.SEND_CACHE
    | TFlag.CAN_MULTI_CONN
)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """4 MiB sparse file: data at [0, 64K) and [1M, 1M+8K), holes elsewhere."""
    path = tmp_path_factory.mktemp("proto") / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(b"\x11" * 65536)
        f.seek(MiB)
        f.write(b"\x22" * 8192)
    return path


@pytest.fixture
def export(image):
    disk = qcow2.open_disk(str(image), fmt="raw")
    yield Export("", disk, "test disk")
    disk.close()


@pytest.fixture
def hs(export) -> Handshake:
    h = Handshake({"": export, "other": Export("other", export.disk)})
    assert h.need == 4
    h.feed(struct.pack(">I", 3))
    return h


def option(hs: Handshake, code: int, data: bytes = b""):
    """Feed one option; return the step with its replies decoded as (option, type, data)."""
    step = hs.feed(struct.pack(">QII", 0x49484156454F5054, code, len(data)))
    if data:
        assert hs.need == len(data)
        step = hs.feed(data)
    decoded = []
    for r in step.replies:
        if step.result is not None and code == Opt.EXPORT_NAME:
            break
        magic, opt, rep, length = struct.unpack(">QIII", r[:20])
        assert magic == 0x0003E889045565A9 and opt == code and len(r) == 20 + length
        decoded.append((rep, r[20:]))
    return step, decoded


def info_data(name: str, infos=()) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def context_names(replies) -> list[tuple[int, str]]:
    assert replies[-1] == (Rep.ACK, b"")
    out = []
    for rep, data in replies[:-1]:
        assert rep == Rep.META_CONTEXT
        out.append((struct.unpack(">I", data[:4])[0], data[4:].decode()))
    return out


# --- greeting and client flags ----------------------------------------------


def test_greeting_offers_fixed_newstyle_and_no_zeroes():
    assert Handshake.greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_drop_the_client(export, flags):
    h = Handshake({"": export})
    with pytest.raises(ProtocolError):
        h.feed(struct.pack(">I", flags))


def test_bad_option_magic_drops_the_client(hs):
    with pytest.raises(ProtocolError):
        hs.feed(struct.pack(">QII", 0x1234, Opt.LIST, 0))


def test_absurd_option_length_drops_before_reading_data(hs):
    with pytest.raises(ProtocolError):
        hs.feed(struct.pack(">QII", 0x49484156454F5054, Opt.INFO, MAX_OPTION_LENGTH + 1))


def test_option_data_is_requested_in_one_piece(hs):
    hs.feed(struct.pack(">QII", 0x49484156454F5054, 999, 100))
    assert hs.need == 100
    step = hs.feed(bytes(100))
    assert hs.need == 16 and len(step.replies) == 1


# --- EXPORT_NAME, ABORT, LIST -----------------------------------------------


@pytest.mark.parametrize(("client_flags", "length"), [(1, 134), (3, 10)])
def test_export_name_reply_padding_follows_no_zeroes(export, client_flags, length):
    h = Handshake({"": export})
    h.feed(struct.pack(">I", client_flags))
    step, _ = option(h, Opt.EXPORT_NAME)
    (reply,) = step.replies
    assert len(reply) == length
    size, flags = struct.unpack(">QH", reply[:10])
    assert size == SIZE and flags == RO_FLAGS
    assert reply[10:] == bytes(length - 10)
    assert step.result.export is export and h.need == 0


def test_export_name_unknown_export_drops(hs):
    with pytest.raises(ProtocolError):
        option(hs, Opt.EXPORT_NAME, b"nope")


def test_export_name_after_structured_reply_offers_df(hs):
    option(hs, Opt.STRUCTURED_REPLY)
    step, _ = option(hs, Opt.EXPORT_NAME)
    assert struct.unpack(">QH", step.replies[0][:10])[1] == RO_FLAGS | TFlag.SEND_DF
    assert step.result.structured


def test_abort_acks_and_closes(hs):
    step, replies = option(hs, Opt.ABORT)
    assert replies == [(Rep.ACK, b"")] and step.close and step.result is None


def test_list_names_every_export_with_description(hs):
    step, replies = option(hs, Opt.LIST)
    assert replies == [
        (Rep.SERVER, struct.pack(">I", 0) + b"test disk"),
        (Rep.SERVER, struct.pack(">I", 5) + b"other"),
        (Rep.ACK, b""),
    ]
    assert not step.close and step.result is None


def test_list_with_data_is_invalid(hs):
    _, replies = option(hs, Opt.LIST, b"x")
    assert replies[0][0] == Rep.ERR_INVALID and replies[0][1]


# --- INFO / GO ----------------------------------------------------------------


def test_info_sends_export_and_block_size_then_acks(hs):
    step, replies = option(hs, Opt.INFO, info_data(""))
    assert replies == [
        (Rep.INFO, struct.pack(">HQH", Info.EXPORT, SIZE, RO_FLAGS)),
        (Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 32 * MiB)),
        (Rep.ACK, b""),
    ]
    assert step.result is None and hs.need == 16  # INFO stays in the handshake


def test_info_name_and_description_when_requested(hs):
    _, replies = option(hs, Opt.INFO, info_data("", (Info.NAME, Info.DESCRIPTION, 77)))
    items = {struct.unpack(">H", d[:2])[0]: d[2:] for rep, d in replies if rep == Rep.INFO}
    assert items[Info.NAME] == b"" and items[Info.DESCRIPTION] == b"test disk"
    assert set(items) == {Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE}


def test_go_enters_transmission_with_the_same_flags_as_info(hs):
    option(hs, Opt.STRUCTURED_REPLY)
    _, info = option(hs, Opt.INFO, info_data("other"))
    step, go = option(hs, Opt.GO, info_data("other"))
    assert info == go
    assert step.result.export.name == "other"
    assert step.result.transmission_flags == RO_FLAGS | TFlag.SEND_DF
    assert hs.need == 0


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",  # too short
        struct.pack(">I", 10) + b"ab" + struct.pack(">H", 0),  # name overruns the option
        info_data("") + b"\x00",  # trailing junk
        struct.pack(">I", 0) + struct.pack(">H", 2) + struct.pack(">H", 1),  # fewer requests than counted
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # name not UTF-8
    ],
)
def test_info_malformed_is_invalid_and_the_handshake_goes_on(hs, data):
    for code in (Opt.INFO, Opt.GO):
        step, replies = option(hs, code, data)
        assert replies[0][0] == Rep.ERR_INVALID and step.result is None and hs.need == 16


def test_go_unknown_export(hs):
    step, replies = option(hs, Opt.GO, info_data("missing"))
    assert [r for r, _ in replies] == [Rep.ERR_UNKNOWN] and b"missing" in replies[0][1]
    assert step.result is None


# --- structured replies, unknown options -------------------------------------


def test_structured_reply_once(hs):
    assert option(hs, Opt.STRUCTURED_REPLY)[1] == [(Rep.ACK, b"")]
    assert option(hs, Opt.STRUCTURED_REPLY)[1][0][0] == Rep.ERR_INVALID
    assert hs.structured


def test_structured_reply_with_data_is_invalid(hs):
    assert option(hs, Opt.STRUCTURED_REPLY, b"\x00")[1][0][0] == Rep.ERR_INVALID
    assert not hs.structured


@pytest.mark.parametrize(
    ("code", "rep"),
    [
        (Opt.STARTTLS, Rep.ERR_POLICY),
        (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP),
        (Opt.PEEK_EXPORT, Rep.ERR_UNSUP),
        (12345, Rep.ERR_UNSUP),
    ],
)
def test_unsupported_options_get_an_error_with_a_message(hs, code, rep):
    step, replies = option(hs, code)
    assert replies[0][0] == rep and replies[0][1]
    assert not step.close
    assert option(hs, Opt.LIST)[1][-1] == (Rep.ACK, b"")  # still in sync


# --- meta contexts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ((), [CTX_BASE_ALLOCATION, CTX_ALLOCATION_DEPTH]),
        (("base:",), [CTX_BASE_ALLOCATION]),
        (("qemu:",), [CTX_ALLOCATION_DEPTH]),
        (("qemu:allocation-depth",), [CTX_ALLOCATION_DEPTH]),
        (("x-foo:bar", "nbd-server:", "base:nothing", "nocolon"), []),
        (("base:allocation", "base:"), [CTX_BASE_ALLOCATION]),
    ],
)
def test_list_meta_context(hs, queries, expected):
    _, replies = option(hs, Opt.LIST_META_CONTEXT, meta_data("", queries))
    assert context_names(replies) == [(0, n) for n in expected]


def test_list_meta_context_unknown_export(hs):
    _, replies = option(hs, Opt.LIST_META_CONTEXT, meta_data("zzz", ()))
    assert replies[0][0] == Rep.ERR_UNKNOWN


def test_set_meta_context_needs_structured_replies(hs):
    _, replies = option(hs, Opt.SET_META_CONTEXT, meta_data("", (CTX_BASE_ALLOCATION,)))
    assert replies[0][0] == Rep.ERR_INVALID and hs.contexts == []


def test_set_meta_context_selects_with_unique_ids(hs):
    option(hs, Opt.STRUCTURED_REPLY)
    _, replies = option(
        hs, Opt.SET_META_CONTEXT, meta_data("", (CTX_ALLOCATION_DEPTH, "qemu:", CTX_BASE_ALLOCATION))
    )
    first = context_names(replies)
    assert sorted(n for _, n in first) == [CTX_BASE_ALLOCATION, CTX_ALLOCATION_DEPTH]
    _, replies = option(hs, Opt.SET_META_CONTEXT, meta_data("", (CTX_BASE_ALLOCATION,)))
    second = context_names(replies)
    ids = [i for i, _ in first + second]
    assert len(set(ids)) == 3
    step, _ = option(hs, Opt.GO, info_data(""))
    assert step.result.contexts == second


@pytest.mark.parametrize("queries", [(), ("base:",), ("qemu:",), ("base:foo", "x-y:z")])
def test_set_meta_context_wildcards_select_nothing(hs, queries):
    option(hs, Opt.STRUCTURED_REPLY)
    _, replies = option(hs, Opt.SET_META_CONTEXT, meta_data("", queries))
    assert context_names(replies) == []


def test_failed_set_clears_the_selection(hs):
    option(hs, Opt.STRUCTURED_REPLY)
    option(hs, Opt.SET_META_CONTEXT, meta_data("", (CTX_BASE_ALLOCATION,)))
    _, replies = option(hs, Opt.SET_META_CONTEXT, meta_data("nope", (CTX_BASE_ALLOCATION,)))
    assert replies == [(Rep.ERR_UNKNOWN, replies[0][1])]
    step, _ = option(hs, Opt.GO, info_data(""))
    assert step.result.contexts == []


def test_malformed_set_clears_the_selection(hs):
    option(hs, Opt.STRUCTURED_REPLY)
    option(hs, Opt.SET_META_CONTEXT, meta_data("", (CTX_BASE_ALLOCATION,)))
    bad = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 50) + b"base:allocation"
    assert option(hs, Opt.SET_META_CONTEXT, bad)[1][0][0] == Rep.ERR_INVALID
    assert hs.contexts == []


def test_selection_for_another_export_is_dropped_at_go(hs):
    option(hs, Opt.STRUCTURED_REPLY)
    option(hs, Opt.SET_META_CONTEXT, meta_data("other", (CTX_BASE_ALLOCATION,)))
    step, _ = option(hs, Opt.GO, info_data(""))
    assert step.result.contexts == []


# --- request validation ---------------------------------------------------------


def negotiated(export: Export, structured=True, contexts=((0, CTX_BASE_ALLOCATION),)) -> Negotiated:
    return Negotiated(export, structured, list(contexts), export.transmission_flags(structured))


def test_parse_request():
    header = struct.pack(">IHHQQI", 0x25609513, 1, 0, 0xDEADBEEF, 4096, 512)
    assert parse_request(header) == Request(1, 0, 0xDEADBEEF, 4096, 512)
    with pytest.raises(ProtocolError):
        parse_request(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 0))


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "error"),
    [
        (Cmd.READ, 0, 0, 4096, Err.OK),
        (Cmd.READ, CmdFlag.FUA | CmdFlag.DF, SIZE - 1, 1, Err.OK),
        (Cmd.READ, 0, SIZE, 0, Err.OK),
        (Cmd.READ, 0, SIZE - 1, 2, Err.EINVAL),
        (Cmd.READ, 0, 2**64 - 1, 2**32 - 1, Err.EINVAL),
        (Cmd.READ, CmdFlag.REQ_ONE, 0, 1, Err.EINVAL),
        (Cmd.READ, 1 << 15, 0, 1, Err.EINVAL),
        (Cmd.WRITE, 0, 0, 512, Err.EPERM),
        (Cmd.WRITE, 0, SIZE, 512, Err.EPERM),  # read-only wins over ENOSPC
        (Cmd.WRITE_ZEROES, 0, 0, 512, Err.EPERM),
        (Cmd.TRIM, 0, 0, 512, Err.EPERM),
        (Cmd.WRITE, CmdFlag.DF, 0, 512, Err.EINVAL),
        (Cmd.FLUSH, 0, 0, 0, Err.OK),
        (Cmd.FLUSH, CmdFlag.FUA, 0, 0, Err.OK),
        (Cmd.FLUSH, 0, 0, 1, Err.EINVAL),
        (Cmd.FLUSH, 0, 512, 0, Err.EINVAL),
        (Cmd.DISC, 0, 0, 0, Err.OK),
        (Cmd.DISC, 0, 1, 0, Err.EINVAL),
        (Cmd.CACHE, 0, 0, SIZE, Err.OK),
        (Cmd.CACHE, 0, 0, SIZE + 1, Err.EINVAL),
        (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE, Err.OK),
        (Cmd.BLOCK_STATUS, 0, 0, 0, Err.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 1, SIZE, Err.EINVAL),
        (Cmd.BLOCK_STATUS, CmdFlag.DF, 0, 1, Err.EINVAL),
        (Cmd.RESIZE, 0, 0, 0, Err.EINVAL),
        (42, 0, 0, 0, Err.EINVAL),
    ],
)
def test_check(export, cmd, flags, offset, length, error):
    err, message = check(Request(flags, cmd, 1, offset, length), negotiated(export))
    assert err == error
    assert bool(message) == bool(error)


def test_read_longer_than_max_payload(tmp_path):
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    disk = qcow2.open_disk(str(path), fmt="raw")
    try:
        state = negotiated(Export("", disk))
        assert check(Request(0, Cmd.READ, 1, 0, 32 * MiB), state)[0] == Err.OK
        assert check(Request(0, Cmd.READ, 1, 0, 32 * MiB + 1), state)[0] == Err.EINVAL
    finally:
        disk.close()


def test_df_and_block_status_need_structured_replies(export):
    state = negotiated(export, structured=False, contexts=())
    assert not state.transmission_flags & TFlag.SEND_DF
    assert check(Request(CmdFlag.DF, Cmd.READ, 1, 0, 1), state)[0] == Err.EINVAL
    assert check(Request(0, Cmd.BLOCK_STATUS, 1, 0, 1), state)[0] == Err.EINVAL


# --- reply encoding -------------------------------------------------------------


def test_reply_layouts():
    assert wire.simple_reply(7, 22) == struct.pack(">IIQ", 0x67446698, 22, 7)
    assert wire.none_chunk(7) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 7, 0)
    assert wire.data_chunk_header(7, 4096, 100, done=False) == struct.pack(
        ">IHHQIQ", 0x668E33EF, 0, 1, 7, 108, 4096
    )
    assert wire.hole_chunk(7, 0, 512, done=True) == struct.pack(">IHHQIQI", 0x668E33EF, 1, 2, 7, 12, 0, 512)
    assert (
        wire.error_chunk(7, 22, "bad") == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 7, 9, 22, 3) + b"bad"
    )
    assert wire.block_status_chunk(7, 3, [(4096, 0), (512, 3)], done=True) == struct.pack(
        ">IHHQIIIIII", 0x668E33EF, 1, 5, 7, 20, 3, 4096, 0, 512, 3
    )


# --- extent maths ---------------------------------------------------------------


def E(length, data=True, zero=False, depth=1):
    return Extent(length, data, zero, depth)


def base(e):
    return (0 if e.data else 1) | (2 if e.zero else 0)


def depth(e):
    return e.depth


def test_block_status_merges_equal_neighbours_per_context():
    extents = [E(512), E(512), E(1024, False, True, 1), E(1024, False, True, 0)]
    assert block_status(extents, 3072, [base, depth]) == [[(1024, 0), (2048, 3)], [(2048, 1), (1024, 0)]]


def test_block_status_req_one_stops_at_the_first_change():
    def extents():
        yield E(512)
        yield E(512, False, True)
        raise AssertionError("REQ_ONE must not walk the whole range")

    assert block_status(extents(), 1 << 30, [base], req_one=True) == [[(512, 0)]]


def test_block_status_req_one_never_exceeds_the_request():
    assert block_status([E(1 << 20)], 4096, [base, depth], req_one=True) == [[(4096, 0)], [(4096, 1)]]


def test_block_status_limit_truncates():
    extents = [E(512, data=i % 2 == 0) for i in range(10)]
    assert block_status(extents, 5120, [base], limit=3) == [[(512, 0), (512, 1), (512, 0)]]


def test_read_plan_merges_data_and_holes():
    extents = [E(512), E(512, True, False, 2), E(1024, False, True), E(512, True, True), E(512)]
    assert read_plan(extents, 4096, 3072) == [(4096, 1024, False), (5120, 1536, True), (6656, 512, False)]


def test_read_plan_covers_a_short_extent_list_with_data():
    assert read_plan([E(512, False, True)], 0, 1024) == [(0, 512, True), (512, 512, False)]


# --- command handlers on a real disk ----------------------------------------------


def flatten(buffers) -> list[bytes]:
    return [bytes(b) for b in buffers]


def test_structured_read_sends_holes_and_data(export):
    req = Request(0, Cmd.READ, 9, 60 * 1024, 8192)
    parts = flatten(commands.run(export, req, negotiated(export)))
    assert parts[0] == wire.data_chunk_header(9, 60 * 1024, 4096, done=False)
    assert parts[1] == b"\x11" * 4096
    assert parts[2] == wire.hole_chunk(9, 64 * 1024, 4096, done=True)
    assert len(parts) == 3


def test_df_read_is_one_data_chunk(export):
    req = Request(CmdFlag.DF, Cmd.READ, 9, 60 * 1024, 8192)
    parts = flatten(commands.run(export, req, negotiated(export)))
    assert parts == [wire.data_chunk_header(9, 60 * 1024, 8192, done=True), b"\x11" * 4096 + bytes(4096)]


def test_simple_read(export):
    req = Request(0, Cmd.READ, 9, MiB - 1, 2)
    parts = flatten(commands.run(export, req, negotiated(export, structured=False, contexts=())))
    assert parts == [wire.simple_reply(9), b"\x00\x22"]


def test_zero_length_read_succeeds_with_none(export):
    parts = flatten(commands.run(export, Request(0, Cmd.READ, 9, 0, 0), negotiated(export)))
    assert parts == [wire.none_chunk(9)]


def test_block_status_one_chunk_per_context(export):
    state = negotiated(export, contexts=((4, CTX_BASE_ALLOCATION), (5, CTX_ALLOCATION_DEPTH)))
    parts = flatten(commands.run(export, Request(0, Cmd.BLOCK_STATUS, 9, 32 * 1024, MiB), state))
    assert parts == [
        wire.block_status_chunk(
            9, 4, [(32 * 1024, 0), (MiB - 64 * 1024, 3), (8192, 0), (24 * 1024, 3)], done=False
        ),
        wire.block_status_chunk(9, 5, [(MiB, 1)], done=True),
    ]
    one = flatten(commands.run(export, Request(CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS, 9, MiB, SIZE - MiB), state))
    assert one == [
        wire.block_status_chunk(9, 4, [(8192, 0)], done=False),
        wire.block_status_chunk(9, 5, [(SIZE - MiB, 1)], done=True),
    ]


def test_disk_errors_become_error_replies(tmp_path):
    path = tmp_path / "gone.raw"
    path.write_bytes(bytes(4096))
    disk = qcow2.open_disk(str(path), fmt="raw")
    export = Export("", disk)
    disk.close()  # reads now fail with EBADF
    req = Request(0, Cmd.READ, 9, 0, 512)
    (reply,) = flatten(commands.run(export, req, negotiated(export)))
    flags, kind, cookie, length, error, msglen = struct.unpack(">IHHQIIH", reply[:26])[1:]
    assert kind == Chunk.ERROR and cookie == 9 and error == Err.EIO and msglen > 0
    assert flatten(commands.run(export, req, negotiated(export, False, ()))) == [
        wire.simple_reply(9, Err.EIO)
    ]


# --- FORCEDTLS (no sockets: the state machine alone) ----------------------------------


@pytest.fixture
def tls_hs(export) -> Handshake:
    h = Handshake({"": export}, tls_required=True)
    h.feed(struct.pack(">I", 3))
    return h


@pytest.mark.parametrize(
    "code, data",
    [(Opt.LIST, b""), (Opt.INFO, info_data("")), (Opt.GO, info_data("")), (Opt.STRUCTURED_REPLY, b""),
     (Opt.LIST_META_CONTEXT, meta_data("", [])), (99, b"x")],
)  # fmt: skip
def test_forcedtls_answers_tls_reqd_before_starttls(tls_hs, code, data):
    step, replies = option(tls_hs, code, data)
    assert [rep for rep, _ in replies] == [Rep.ERR_TLS_REQD] and step.result is None
    assert b"test disk" not in replies[0][1], "nothing about the exports before TLS"


def test_forcedtls_export_name_ends_the_session_and_abort_is_acked(tls_hs, export):
    with pytest.raises(ProtocolError):
        option(tls_hs, Opt.EXPORT_NAME, b"")
    h = Handshake({"": export}, tls_required=True)
    h.feed(struct.pack(">I", 3))
    step, replies = option(h, Opt.ABORT)
    assert step.close and replies == [(Rep.ACK, b"")]


def test_starttls_then_everything_negotiated_before_is_forgotten(tls_hs):
    step, replies = option(tls_hs, Opt.STARTTLS, b"x")
    assert replies[0][0] == Rep.ERR_INVALID and not step.start_tls
    step, replies = option(tls_hs, Opt.STARTTLS)
    assert replies == [(Rep.ACK, b"")] and step.start_tls
    tls_hs.tls_started()
    option(tls_hs, Opt.STRUCTURED_REPLY)
    step, replies = option(tls_hs, Opt.STARTTLS)
    assert replies[0][0] == Rep.ERR_INVALID and not step.start_tls, "a second STARTTLS"
    step, _ = option(tls_hs, Opt.GO, info_data(""))
    assert step.result is not None and step.result.structured


def test_starttls_without_tls_configured_is_policy(hs):
    step, replies = option(hs, Opt.STARTTLS)
    assert replies[0][0] == Rep.ERR_POLICY and not step.start_tls


# --- per-client exports (--client-overlays): GO waits for the client's own disk ----------------


def _per_client_hs(export) -> Handshake:
    template = Export("farm", export.disk, per_client=True, multi_conn=False)
    h = Handshake({"farm": template})
    h.feed(struct.pack(">I", 3))
    return h


def test_go_to_a_per_client_export_asks_for_its_disk_before_replying(export):
    h = _per_client_hs(export)
    step, replies = option(h, Opt.GO, info_data("farm"))
    assert step.attach and step.result is not None and step.result.export.name == "farm"
    assert replies[-1] == (Rep.ACK, b"") and h.need == 0
    assert not step.result.transmission_flags & TFlag.CAN_MULTI_CONN  # each client its own disk


def test_a_failed_attach_answers_go_with_the_reason_and_options_go_on(export):
    h = _per_client_hs(export)
    option(h, Opt.GO, info_data("farm"))
    step = h.attach_failed("overlay 'farm' is in use by another client")
    assert step.result is None and not step.attach and len(step.replies) == 1
    magic, opt, rep, length = struct.unpack(">QIII", step.replies[0][:20])
    assert (opt, rep) == (Opt.GO, Rep.ERR_UNKNOWN)
    assert step.replies[0][20:] == b"overlay 'farm' is in use by another client"
    assert h.need == 16  # the next option header
    step, replies = option(h, Opt.INFO, info_data("farm"))
    assert replies[-1] == (Rep.ACK, b"")


def test_a_failed_attach_after_export_name_drops_the_client(export):
    h = _per_client_hs(export)
    step, _ = option(h, Opt.EXPORT_NAME, b"farm")
    assert step.attach
    with pytest.raises(ProtocolError, match="in use"):
        h.attach_failed("in use")


def test_ordinary_exports_need_no_attach(hs):
    step, _ = option(hs, Opt.GO, info_data(""))
    assert not step.attach
