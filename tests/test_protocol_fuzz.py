"""A seeded protocol fuzzer (issue 8 §8): random and mutated handshakes and requests.

Each seed makes one client's whole byte stream: client flags, options
(valid ones, mutated lengths and payloads, unknown and out-of-order ones),
then requests of every command with random fields, truncated payloads and
bad magics.  The client sends it all, half-closes, and reads until the
server hangs up.  Required for every seed: the server hangs up in bounded
time (it never waits forever on a client that is done), stays up, and still
serves a well-behaved client the right bytes; on the read-write qcow2
export, ``qemu-img check`` finds the image clean afterwards.

``FUZZ_CASES=N`` runs N seeds per export (``FUZZ_SEED`` the first one); a
failure names the seed.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbd
import pytest
from nbd_wire import wait_pid_exit

CASES = int(os.environ.get("FUZZ_CASES", "120"))
FIRST_SEED = int(os.environ.get("FUZZ_SEED", "1"))
SIZE = 16 << 20
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPTS = (1, 3, 5, 6, 7, 8, 9, 10, 2, 4, 11, 12, 99)  # EXPORT_NAME, LIST, STARTTLS, INFO, GO, ... unknown
CONTEXTS = (b"base:allocation", b"qemu:allocation-depth", b"qemu:", b"base:", b"nope:x", b"")


def _option(rng: random.Random) -> bytes:
    opt = rng.choice(OPTS)
    if opt in (6, 7):  # INFO / GO: name, info requests
        name = rng.choice((b"", b"", b"x", bytes(rng.getrandbits(8) for _ in range(rng.randrange(8)))))
        infos = [rng.randrange(5) for _ in range(rng.randrange(4))]
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
    elif opt in (9, 10):  # LIST/SET_META_CONTEXT: export name, queries
        queries = [rng.choice(CONTEXTS) for _ in range(rng.randrange(4))]
        data = struct.pack(">I", 0) + struct.pack(">I", len(queries))
        data += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    elif opt == 1:
        data = rng.choice((b"", b"x"))
    else:
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 0, 3, 17))))
    length = len(data)
    mutation = rng.randrange(10)
    if mutation == 0:
        length = rng.choice((length + 1, max(0, length - 1), rng.getrandbits(32), 1 << 20))
    elif mutation == 1 and data:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.getrandbits(8)]) + data[i + 1 :]
    magic = IHAVEOPT if rng.randrange(30) else rng.getrandbits(64)
    return struct.pack(">QII", magic, opt, min(length, (1 << 32) - 1)) + data[: min(len(data), 1 << 16)]


def _request(rng: random.Random, cookie: int) -> bytes:
    cmd = rng.choice((0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9))
    flags = rng.choice((0, 0, 1, 2, 4, 8, 16, 32, rng.getrandbits(16)))
    if rng.randrange(4):
        offset = rng.randrange(0, SIZE, 512)
        length = rng.choice((0, 1, 512, 4096, 65536, rng.randrange(1, 1 << 18)))
        length = min(length, SIZE - offset) if rng.randrange(8) else length
    else:
        offset, length = rng.getrandbits(64), rng.getrandbits(32)
    magic = REQUEST_MAGIC if rng.randrange(40) else rng.getrandbits(32)
    header = struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
    if cmd == 1 and length <= 1 << 18:  # a WRITE payload, sometimes cut short
        payload_length = length if rng.randrange(6) else rng.randrange(length + 1)
        header += bytes([cookie & 0xFF]) * payload_length
    return header


def client_stream(seed: int) -> bytes:
    rng = random.Random(seed)
    out = [struct.pack(">I", rng.choice((3, 3, 3, 1, 0, 2, rng.getrandbits(32))))]
    options = [_option(rng) for _ in range(rng.randrange(5))]
    if rng.randrange(5):
        options.insert(rng.randrange(len(options) + 1), struct.pack(">QII", IHAVEOPT, 8, 0))  # structured
    if rng.randrange(8):
        options.append(struct.pack(">QII", IHAVEOPT, 7, 6) + struct.pack(">IH", 0, 0))  # GO ""
    out += options
    out += [_request(rng, cookie) for cookie in range(rng.randrange(12))]
    if rng.randrange(2):
        out.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 99, 0, 0))  # DISC
    return b"".join(out)


def run_client(sock_path: Path, data: bytes, timeout: float = 20.0) -> float:
    """Send ``data``, half-close, read until the server hangs up; seconds it took (or fail)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    started = time.monotonic()

    def send() -> None:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server hung up first

    sender = threading.Thread(target=send)
    sender.start()
    try:
        while s.recv(1 << 16):
            pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open {timeout}s after the client was done")
    except ConnectionResetError:
        pass
    finally:
        sender.join()
        s.close()
    return time.monotonic() - started


def _serve(image: Path, fmt: str, *opts: str) -> tuple[Path, int]:
    sock = image.parent / f"{image.stem}.sock"
    pidfile = image.parent / f"{image.stem}.pid"
    argv = [sys.executable, "-m", "nbdserver", "-f", fmt, "-k", str(sock), "--handshake-limit", "5", *opts]
    subprocess.run([*argv, "--fork", "--pid-file", str(pidfile), str(image)], check=True, timeout=60)
    return sock, int(pidfile.read_text())


def _stop(pid: int) -> None:
    os.kill(pid, 15)
    assert wait_pid_exit(pid, 30), "the server did not stop"


@pytest.mark.parametrize("mode", ["read-only raw", "read-write qcow2"])
def test_fuzzed_clients(tmp_path: Path, oracle_tools: None, mode: str) -> None:
    if mode == "read-only raw":
        image, fmt, opts = tmp_path / "ro.raw", "raw", ("-r",)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), str(SIZE)], check=True)
    else:
        image, fmt, opts = tmp_path / "rw.qcow2", "qcow2", ()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5a {SIZE - 65536} 64k", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    sock, pid = _serve(image, fmt, *opts)
    try:
        for seed in range(FIRST_SEED, FIRST_SEED + CASES):
            try:
                run_client(sock, client_stream(seed))
            except BaseException as e:
                raise AssertionError(f"seed {seed}: {e}") from e
            assert not wait_pid_exit(pid, 0), f"seed {seed}: the server died"
            if seed % 20 == 0 or seed == FIRST_SEED + CASES - 1:
                h = nbd.NBD()
                h.connect_uri(f"nbd+unix:///?socket={sock}")
                assert h.pread(512, SIZE - 512) == b"\x5a" * 512 or mode != "read-only raw", seed
                h.shutdown()
    finally:
        _stop(pid)
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
