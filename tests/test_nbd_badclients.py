"""Bad requests and misbehaving clients, sent byte by byte with a raw socket.

Every bad request must get the spec's error and leave the connection usable;
every protocol violation must drop only that client.
"""

from __future__ import annotations

import struct

import pytest
from nbd_wire import RawClient, Server, info_data, make_raw_image

MiB = 1 << 20
SIZE = 64 * MiB
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
EPERM, EINVAL = 1, 22
OPT_GO = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    image = make_raw_image(tmp / "disk.raw", "64M", ("write -P 0x5a 0 1M", "write -P 0xa5 63M 1M"))
    s = Server(image, tmp / "srv", ("-r",))
    yield s
    s.stop()


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def client(server, request):
    with RawClient(server.sock) as c:
        c.structured = request.param
        c.go(structured=request.param, contexts=("base:allocation",) if request.param else ())
        yield c


def reply_error(c: RawClient, cookie: int) -> int:
    if c.structured:
        chunks = c.structured_reply()
        assert {ck for _, ck, _ in chunks} == {cookie}
        if chunks[0][0] == 0x8001:
            assert struct.unpack(">H", chunks[0][2][4:6])[0] > 0  # error chunks carry a message
        return c.error_of(chunks[-1:]) if chunks[-1][0] in (0, 0x8001) else 0
    error, got = c.simple_reply()
    assert got == cookie
    return error


def assert_read_works(c: RawClient, cookie: int = 99) -> None:
    c.request(READ, offset=4096, length=512, cookie=cookie)
    if c.structured:
        chunks = c.structured_reply()
        assert chunks == [(1, cookie, struct.pack(">Q", 4096) + b"\x5a" * 512)]
    else:
        assert c.simple_reply() == (0, cookie)
        assert c.recv_exactly(512) == b"\x5a" * 512


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (READ, SIZE - 512, 1024, 0, EINVAL),
        (READ, SIZE + 1, 0, 0, EINVAL),
        (READ, 2**64 - 512, 1024, 0, EINVAL),
        (READ, 0, 32 * MiB + 1, 0, EINVAL),
        (CACHE, SIZE - 1, 2, 0, EINVAL),
        (42, 0, 512, 0, EINVAL),
        (8, 0, 0, 0, EINVAL),  # RESIZE is not offered
        (READ, 0, 512, 1 << 9, EINVAL),  # unknown flag
        (READ, 0, 512, 1 << 3, EINVAL),  # REQ_ONE does not apply to READ
        (FLUSH, 0, 512, 0, EINVAL),
        (TRIM, 0, 4096, 0, EPERM),
        (WRITE_ZEROES, 0, 4096, 0, EPERM),
        (WRITE_ZEROES, SIZE, 4096, 0, EPERM),  # read-only before ENOSPC
        (READ, 0, 0, 0, 0),
        (CACHE, 0, SIZE, 0, 0),
        (FLUSH, 0, 0, 1, 0),
    ],
)
def test_bad_requests_get_errors_and_the_connection_goes_on(client, cmd, offset, length, flags, error):
    client.request(cmd, offset, length, flags, cookie=7)
    assert reply_error(client, 7) == error
    assert_read_works(client)


def test_block_status_past_end(server):
    with RawClient(server.sock) as c:
        c.structured = True
        c.go(contexts=("base:allocation",))
        c.request(BLOCK_STATUS, SIZE - 512, 1024, cookie=3)
        assert reply_error(c, 3) == EINVAL
        c.request(BLOCK_STATUS, SIZE - 512, 512, flags=1 << 3, cookie=4)
        ((kind, cookie, payload),) = c.structured_reply()
        assert (kind, cookie) == (5, 4) and struct.unpack(">III", payload)[1:] == (512, 0)


def test_df_without_structured_replies_is_invalid(server):
    with RawClient(server.sock) as c:
        c.structured = False
        c.go(structured=False)
        c.request(READ, 0, 512, flags=1 << 2, cookie=5)
        assert reply_error(c, 5) == EINVAL
        assert_read_works(c)


@pytest.mark.parametrize("length", [4096, 40 * MiB])
def test_write_payload_is_consumed_before_eperm(client, length):
    client.request(WRITE, 0, length, cookie=11)
    block = b"\xee" * MiB
    for done in range(0, length, MiB):
        client.sock.sendall(block[: min(MiB, length - done)])
    assert reply_error(client, 11) == EPERM
    assert_read_works(client)


def test_replies_echo_cookies_for_pipelined_requests(client):
    cookies = [0, 1, 2**64 - 1, 0x1234567890ABCDEF]
    for ck in cookies:
        client.request(READ, offset=ck % 4096, length=100, cookie=ck)
    seen = set()
    for _ in cookies:
        if client.structured:
            seen |= {ck for _, ck, _ in client.structured_reply()}
        else:
            err, ck = client.simple_reply()
            assert err == 0
            client.recv_exactly(100)
            seen.add(ck)
    assert seen == set(cookies)


def test_disc_answers_requests_in_flight_then_closes(server):
    with RawClient(server.sock) as c:
        c.structured = True
        c.go()
        for ck in range(10):
            c.request(READ, offset=0, length=MiB, cookie=ck)
        c.request(DISC, cookie=100)
        got = set()
        for _ in range(10):
            chunks = c.structured_reply()
            assert sum(len(p) - 8 for k, _, p in chunks if k == 1) == MiB
            got.add(chunks[0][1])
        assert got == set(range(10))
        assert c.closed_by_server()


# --- clients that break the protocol --------------------------------------------


def test_garbage_magic_drops_only_that_client(server):
    with RawClient(server.sock) as good, RawClient(server.sock) as bad:
        good.structured = True
        good.go()
        bad.go()
        bad.sock.sendall(b"GARBAGE!" * 8)
        assert bad.closed_by_server()
        assert_read_works(good)
    assert server.alive()


def test_abrupt_disconnects(server):
    with RawClient(server.sock) as good:
        good.structured = True
        good.go()
        with RawClient(server.sock) as c:  # half a request header
            c.go()
            c.sock.sendall(struct.pack(">IHH", 0x25609513, 0, READ))
        with RawClient(server.sock) as c:  # a write cut short in its payload
            c.go()
            c.request(WRITE, 0, MiB, payload=bytes(1000))
        with RawClient(server.sock) as c:  # gone with many reads in flight
            c.go()
            for ck in range(20):
                c.request(READ, 0, 4 * MiB, cookie=ck)
        with RawClient(server.sock) as c:  # gone in the middle of an option
            c.greet()
            c.sock.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_GO, 100) + b"abc")
        assert_read_works(good)
    assert server.alive()


@pytest.mark.parametrize(
    "send",
    [
        lambda c: c.sock.sendall(struct.pack(">I", 0x80)),  # unknown client flag
        lambda c: (c.greet(), c.sock.sendall(b"NOTMAGIC" + bytes(8))),  # bad option magic
        lambda c: (c.greet(), c.send_option(1, b"no-such-export")),  # EXPORT_NAME cannot fail politely
        lambda c: (c.greet(), c.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 99, 2**31))),  # absurd
    ],
    ids=["client-flags", "option-magic", "export-name", "huge-option"],
)
def test_handshake_violations_close_the_connection(server, send):
    with RawClient(server.sock) as c:
        if c.recv_exactly(18)[:8] != b"NBDMAGIC":
            raise AssertionError("no greeting")
        c.greet = lambda flags=3: c.sock.sendall(struct.pack(">I", flags))  # greeting already read
        send(c)
        assert c.closed_by_server()
    assert server.alive()


def test_abort_is_acknowledged(server):
    with RawClient(server.sock) as c:
        c.greet()
        c.send_option(2)
        assert c.option_reply() == (2, 1, b"")
        assert c.closed_by_server()


def test_export_name_then_reads(server):
    with RawClient(server.sock) as c:
        c.structured = False
        c.greet(client_flags=1)  # no NO_ZEROES: the reply carries 124 zero bytes
        c.send_option(1)
        size, flags = struct.unpack(">QH", c.recv_exactly(10))
        assert size == SIZE and flags & 3 == 3
        assert c.recv_exactly(124) == bytes(124)
        assert_read_works(c)


def test_unknown_options_then_go(server):
    with RawClient(server.sock) as c:
        c.greet()
        for code in (5, 11, 200):
            c.send_option(code, b"x" * code)
            _, rep, msg = c.option_reply()
            assert rep & 0x80000000 and msg
        c.send_option(OPT_GO, info_data(""))
        assert c.replies_until_final()[-1] == (1, b"")
        c.structured = False
        assert_read_works(c)


def test_small_read_is_not_stuck_behind_a_big_one(server):
    with RawClient(server.sock) as c:
        c.go()
        big = struct.pack(">IHHQQI", 0x25609513, 0, READ, 1, 0, 32 * MiB)
        small = struct.pack(">IHHQQI", 0x25609513, 0, READ, 2, 63 * MiB, 4096)
        c.sock.sendall(big + small)  # one write: both requests are in flight together
        flags, kind, cookie, payload = c.chunk()
        assert (flags, kind, cookie) == (1, 1, 2) and payload[8:] == b"\xa5" * 4096
        got = 0
        while got < 32 * MiB:
            flags, kind, cookie, payload = c.chunk()
            assert cookie == 1
            got += len(payload) - 8 if kind == 1 else struct.unpack(">QI", payload)[1]
        assert flags & 1
