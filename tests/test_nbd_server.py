"""The real server under real clients (libnbd, nbdinfo, nbdcopy, qemu-img, qemu-io).

Where qemu-nbd defines the expected answer (maps, REQ_ONE extents, data), the
same question goes to ``qemu-nbd -r -A`` on the same image and the answers
must be equal.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from nbd_wire import Server, make_raw_image, python_first_env, run, tool, wait_pid_exit

MiB = 1 << 20
DEPTH = "qemu:allocation-depth"
BASE = nbd.CONTEXT_BASE_ALLOCATION


@dataclass
class Image:
    path: Path
    fmt: str
    content: bytes  # the guest view, from qemu-img convert -O raw


def guest_bytes(path: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / (path.name + ".flat")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()


@pytest.fixture(scope="module", params=["raw", "qcow2", "raw-unaligned"])
def image(request, tmp_path_factory) -> Image:
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "raw":
        path = make_raw_image(
            tmp / "disk.raw",
            "8M",
            ("write -P 0x11 0 64k", "write -P 0x22 1M 512k", "write -z 1280k 256k", "write -P 0x33 8188k 4k"),
        )
        fmt = "raw"
    elif request.param == "raw-unaligned":
        path = tmp / "odd.raw"
        with open(path, "wb") as f:
            f.truncate(MiB + 1000)
            f.seek(MiB - 10)
            f.write(b"\x77" * 1010)  # data up to the very end, in the last partial sector
        fmt = "raw"
    else:
        base = tmp / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
        run(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0x33 8M 64k",
            base,
        )
        path = tmp / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path)
        run(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 512k 1M",
            "-c",
            "write -z -u 8M 64k",
            "-c",
            "write -P 0x55 15M 1M",
            "-c",
            "write -P 0x66 3M 4k",
            path,
        )
        fmt = "qcow2"
    return Image(path, fmt, guest_bytes(path, fmt, tmp))


@pytest.fixture(scope="module")
def server(image, tmp_path_factory):
    s = Server(image.path, tmp_path_factory.mktemp("srv"), ("-r", "-f", image.fmt))
    yield s
    s.stop()
    assert not s.sock.exists() and not s.pidfile.exists()


@pytest.fixture(scope="module")
def qemu(image, tmp_path_factory):
    """qemu-nbd on the same image: the reference answers."""
    d = tmp_path_factory.mktemp("qemu")
    sock, pidfile = d / "q.sock", d / "q.pid"
    run(
        "qemu-nbd", "-r", "-A", "-t", "--fork", "--pid-file", pidfile, "-k", sock, "-f", image.fmt, image.path
    )
    pid = int(pidfile.read_text())
    yield f"nbd+unix:///?socket={sock}"
    os.kill(pid, signal.SIGTERM)
    wait_pid_exit(pid)


def connect(uri: str, structured: bool = True, contexts=(BASE, DEPTH)) -> nbd.NBD:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def status(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}

    def cb(context, off, entries, err):
        assert off == offset and context not in got
        got[context] = list(entries)
        return 0

    h.block_status(length, offset, cb, flags)
    return got


# --- negotiation ------------------------------------------------------------------


def test_list_and_info_items(image, tmp_path_factory):
    s = Server(image.path, tmp_path_factory.mktemp("named"), ("-x", "disk0", "-D", "my test disk"))
    try:
        listing = json.loads(run("nbdinfo", "--list", "--json", s.uri))
        (exp,) = listing["exports"]
        assert exp["export-name"] == "disk0" and exp["description"] == "my test disk"
        h = nbd.NBD()
        h.set_full_info(True)
        h.connect_uri(f"nbd+unix:///disk0?socket={s.sock}")
        assert h.get_size() == len(image.content)
        assert h.get_canonical_export_name() == "disk0"
        assert h.get_export_description() == "my test disk"
        # Served read-write with the format probed: a raw image wants 512-byte requests (qemu-nbd's
        # minimum there too: it protects sector 0 from becoming another format's header).
        minimum = 512 if image.fmt == "raw" else 1
        assert [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)] == [
            minimum,
            4096,
            32 * MiB,
        ]
        h.shutdown()
        with pytest.raises(nbd.Error, match="no export named"):
            nbd.NBD().connect_uri(s.uri)  # the default export "" does not exist here
    finally:
        s.stop()


def test_transmission_flags(server):
    h = connect(server.uri)
    assert h.get_structured_replies_negotiated()
    assert h.is_read_only() and h.can_flush() and h.can_fua() and h.can_cache() and h.can_multi_conn()
    assert h.can_df()
    assert not (h.can_trim() or h.can_zero() or h.can_fast_zero() or h.is_rotational())
    assert h.can_meta_context(BASE) and h.can_meta_context(DEPTH)
    h.shutdown()


def test_meta_context_listing(server):
    def listed(*queries):
        h = nbd.NBD()
        h.set_opt_mode(True)
        for q in queries:
            h.add_meta_context(q)
        h.connect_uri(server.uri)
        names = []
        h.opt_list_meta_context(lambda name: names.append(name) or 0)
        h.opt_abort()
        return names

    assert listed() == [BASE, DEPTH]
    assert listed("base:") == [BASE]
    assert listed("qemu:") == [DEPTH]
    assert listed("x-unknown:foo", "qemu:dirty-bitmap:x") == []


def test_meta_context_selection(server):
    h = connect(server.uri, contexts=(DEPTH, "base:", "qemu:", "x-foo:bar"))
    assert h.can_meta_context(DEPTH) and not h.can_meta_context(BASE)
    assert list(status(h, 4096, 0)) == [DEPTH]
    h.shutdown()
    h = connect(server.uri, contexts=())
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        status(h, 4096, 0)
    assert e.value.errnum == 22  # BLOCK_STATUS without any context: EINVAL
    h.shutdown()


# --- block status: same answers as qemu-nbd -------------------------------------


@pytest.mark.parametrize("context", [None, DEPTH])
def test_nbdinfo_map_equals_qemu_nbd(server, qemu, context):
    tool("nbdinfo")
    args = ["nbdinfo", "--map" if context is None else f"--map={context}"]
    assert run(*args, server.uri) == run(*args, qemu)


def probes(size: int) -> list[tuple[int, int]]:
    picks = [
        (0, size),
        (0, 1),
        (1, 4095),
        (65536 - 512, 8192),
        (MiB + 3, 3 * MiB),
        (size - 1, 1),
        (size - 700, 700),
    ]
    rng = random.Random(size)
    picks += [(o, rng.randrange(1, size - o + 1)) for o in (rng.randrange(size) for _ in range(20))]
    return [(o, min(n, size - o)) for o, n in picks if o < size]


def test_block_status_equals_qemu_nbd(server, qemu, image):
    ours, theirs = connect(server.uri), connect(qemu)
    size = len(image.content)
    for offset, length in probes(size):
        for flags in (0, nbd.CMD_FLAG_REQ_ONE):
            got = status(ours, length, offset, flags)
            assert got == status(theirs, length, offset, flags), (offset, length, flags)
            for entries in got.values():
                lengths = entries[0::2]
                assert sum(lengths) <= length and all(lengths)
                if flags:
                    assert len(lengths) == 1
                else:
                    assert sum(lengths) == length  # a short answer would be legal; qemu-nbd gives it all
    ours.shutdown()
    theirs.shutdown()


# --- reads --------------------------------------------------------------------


def test_reads_match_the_image(server, image):
    data = image.content
    for structured in (True, False):
        h = connect(server.uri, structured=structured)
        assert h.can_df() == structured
        for offset, length in probes(len(data)):
            length = min(length, 32 * MiB)
            assert h.pread(length, offset) == data[offset : offset + length]
            if structured:
                chunks = []
                buf = h.pread_structured(
                    length,
                    offset,
                    lambda b, o, k, e, chunks=chunks: chunks.append((o, len(b), k)) or 0,
                    nbd.CMD_FLAG_DF,
                )
                assert buf == data[offset : offset + length]
                assert chunks == [(offset, length, nbd.READ_DATA)]
        h.shutdown()


def test_structured_read_chunks(server, image):
    h = connect(server.uri)
    data = image.content
    size = len(data)

    for df in (False, True):
        chunks = []

        def chunk(buf, offset, kind, err, chunks=chunks):
            chunks.append((offset, len(buf), kind))
            if kind == nbd.READ_HOLE:
                assert buf == bytes(len(buf))
            return 0

        buf = h.pread_structured(size, 0, chunk, nbd.CMD_FLAG_DF if df else 0)
        assert buf == data
        assert sum(n for _, n, _ in chunks) == size
        if df:
            assert chunks == [(0, size, nbd.READ_DATA)]
        else:
            kinds = [k for _, _, k in chunks]
            assert nbd.READ_HOLE in kinds or data.count(0) == 0
            assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False))  # neighbours merged
    h.shutdown()


def test_zero_length_read(server):
    for structured in (True, False):
        h = connect(server.uri, structured=structured)
        h.set_strict_mode(0)
        assert h.pread(0, 0) == b""
        h.shutdown()


def test_flush_and_cache(server, image):
    h = connect(server.uri)
    h.flush()
    h.cache(len(image.content), 0)
    h.set_strict_mode(0)
    h.flush(nbd.CMD_FLAG_FUA)  # FUA is valid on every command once SEND_FUA is advertised
    h.shutdown()


def test_many_requests_in_flight(server, image):
    data = image.content
    h = connect(server.uri)
    rng = random.Random(1)
    pending = []
    for _ in range(200):
        offset = rng.randrange(len(data))
        length = rng.randrange(1, min(256 * 1024, len(data) - offset) + 1)
        buf = nbd.Buffer(length)
        cookie = h.aio_pread(buf, offset)
        pending.append((cookie, buf, offset, length))
    assert h.aio_in_flight() > 1
    while h.aio_in_flight():
        h.poll(-1)
    for cookie, buf, offset, length in pending:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == data[offset : offset + length]
    h.shutdown()


def test_several_clients_at_once(server, image):
    data = image.content
    errors = []

    def client(seed):
        try:
            h = connect(server.uri, structured=seed % 2 == 0)
            rng = random.Random(seed)
            for _ in range(30):
                offset = rng.randrange(len(data))
                length = rng.randrange(1, min(MiB, len(data) - offset) + 1)
                assert h.pread(length, offset) == data[offset : offset + length]
            h.shutdown()
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert server.alive()


def test_nbdcopy_copies_the_guest_view(server, image, tmp_path):
    out = tmp_path / "copy.raw"
    run("nbdcopy", server.uri, out)
    assert out.read_bytes() == image.content


def test_qemu_tools_read_over_nbd(server, image):
    run("qemu-img", "compare", "-f", "raw", "-F", image.fmt, server.uri, image.path)
    info = json.loads(run("qemu-img", "info", "--output=json", server.uri))
    assert info["virtual-size"] == len(image.content)
    first = image.content[:512]
    assert first.count(first[0]) == 512
    out = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P {first[0]:#x} 0 512", server.uri)
    assert "read 512/512 bytes" in out


def test_nbdsh_reads(server, image):
    code = "print(h.get_size(), h.is_read_only(), h.pread(16, 0).hex())"
    out = run("nbdsh", "-u", server.uri, "-c", code, env=python_first_env())
    assert out.split() == [str(len(image.content)), "True", image.content[:16].hex()]
