"""TLS (issue 8 §6): x509 credentials as QEMU lays them out, FORCEDTLS, client certificates.

Certificates are made in the test with openssl.  qemu-nbd with
``--object tls-creds-x509`` on the same image is the reference: TLS clients
(nbdinfo, nbdcopy, qemu-img with ``tls-creds``) get the same answers from
both, and a plain client is refused the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_wire import wait_pid_exit

IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME, OPT_LIST = 1, 3
ERR_TLS_REQD = (1 << 31) | 5


def sh(*argv: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA; a server certificate for localhost; two client certificates (one from another CA)."""
    d = tmp_path_factory.mktemp("pki")

    def ssl(*args: str) -> None:
        sh("openssl", *args, cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-days", "2", "-subj", "/CN=Test CA")  # fmt: skip
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue-ca-key.pem", "-out",
        "rogue-ca-cert.pem", "-days", "2", "-subj", "/CN=Rogue CA")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who, subject, ca in (("server", "/CN=localhost", "ca"), ("client", "/O=Example/CN=laptop", "ca"),
                             ("rogue", "/O=Example/CN=laptop", "rogue-ca")):  # fmt: skip
        (d / who).mkdir()
        role = "server" if who == "server" else "client"
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}/{role}-key.pem", "-out", f"{who}.csr",
            "-subj", subject)  # fmt: skip
        extra = ["-extfile", "san.ext"] if who == "server" else []
        ssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
            "-CAcreateserial", "-out", f"{who}/{role}-cert.pem", "-days", "2", *extra)  # fmt: skip
        (d / who / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    (d / "anonymous").mkdir()  # a client with the CA but no certificate of its own
    (d / "anonymous" / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    return d


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, oracle_tools: None) -> Path:
    d = tmp_path_factory.mktemp("tlsimg")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "64M")
    sh("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 8M 1M", str(d / "base.qcow2"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    sh("qemu-io", "-c", "write -P 2 512k 1M", str(d / "top.qcow2"))
    return d / "top.qcow2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tls_server(kind: str, image: Path, creds: Path, *opts: str, verify: bool = False) -> Iterator[int]:
    port = free_port()
    pidfile = image.parent / f"{kind}-{port}.pid"
    if kind == "qemu":
        peer = "on" if verify else "off"
        obj = f"tls-creds-x509,id=tls0,dir={creds / 'server'},endpoint=server,verify-peer={peer}"
        argv = ["qemu-nbd", "-t", "-A", "--object", obj, "--tls-creds", "tls0", "-f", "qcow2", *opts]
    else:
        argv = [sys.executable, "-m", "nbdserver", "--tls-creds", str(creds / "server"), "-f", "qcow2", *opts]
        argv += ["--tls-verify-peer"] if verify else []
    started = sh(*argv, "-b", "127.0.0.1", "-p", str(port), "--fork", "--pid-file", str(pidfile), str(image),
                 check=False)  # fmt: skip
    assert pidfile.exists(), started.stderr
    try:
        yield port
    finally:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        wait_pid_exit(pid, 30)


def nbds(port: int, certs: Path) -> str:
    return f"nbds://localhost:{port}/?tls-certificates={certs}"


def qemu_img_map(port: int, certs: Path) -> list:
    out = sh("qemu-img", "map", "--output=json",
             "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
             "--image-opts", f"driver=nbd,host=localhost,port={port},tls-creds=tls0")  # fmt: skip
    return json.loads(out.stdout)


def test_tls_clients_get_qemu_nbds_answers(image: Path, creds: Path, tmp_path: Path) -> None:
    answers = {}
    for kind in ("qemu", "ours"):
        with tls_server(kind, image, creds, "-r") as port:
            uri = nbds(port, creds / "client")
            got = [sh("nbdinfo", "--map", uri).stdout,
                   sh("nbdinfo", "--map=qemu:allocation-depth", uri).stdout,
                   qemu_img_map(port, creds / "client")]  # fmt: skip
            copy = tmp_path / f"{kind}.raw"
            sh("nbdcopy", uri, str(copy))
            answers[kind] = got
    assert answers["ours"] == answers["qemu"]
    same = sh(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        str(tmp_path / "qemu.raw"),
        str(tmp_path / "ours.raw"),
    )
    assert same.returncode == 0


def test_plain_clients_are_refused_as_by_qemu_nbd(image: Path, creds: Path) -> None:
    refusals = {}
    for kind in ("qemu", "ours"):
        with tls_server(kind, image, creds, "-r") as port:
            plain = sh("nbdinfo", f"nbd://localhost:{port}/", check=False)
            listing = sh("nbdinfo", "--list", f"nbd://localhost:{port}/", check=False)
            assert plain.returncode != 0 and listing.returncode != 0
            refusals[kind] = (plain.stderr, listing.stderr)
            if kind == "ours":
                _raw_checks(port, image.name)
    assert refusals["ours"] == refusals["qemu"]


def _raw_checks(port: int, export_hint: str) -> None:
    """LIST before STARTTLS: ERR_TLS_REQD, and nothing about the exports; EXPORT_NAME: hang-up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert len(s.recv(18, socket.MSG_WAITALL)) == 18
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
        header = s.recv(20, socket.MSG_WAITALL)
        _, option, reply, length = struct.unpack(">QIII", header)
        assert (option, reply) == (OPT_LIST, ERR_TLS_REQD)
        message = s.recv(length, socket.MSG_WAITALL)
        assert export_hint.encode() not in message and b"localhost" not in message
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 0))
        assert s.recv(1) == b"", "EXPORT_NAME before TLS ends the session"


def test_client_certificates_verified_and_authorised(image: Path, creds: Path) -> None:
    with tls_server("ours", image, creds, "-r", verify=True) as port:
        assert sh("nbdinfo", "--size", nbds(port, creds / "client")).stdout.strip() == str(64 << 20)
        for who in ("anonymous", "rogue"):
            refused = sh("nbdinfo", "--size", nbds(port, creds / who), check=False)
            assert refused.returncode != 0, who
    for allowed, ok in (("CN=laptop,O=Example", True), ("O=Example, CN=laptop", True), ("CN=desktop", False)):
        with tls_server("ours", image, creds, "-r", "--tls-authz", allowed) as port:
            got = sh("nbdinfo", "--size", nbds(port, creds / "client"), check=False)
            assert (got.returncode == 0) == ok, (allowed, got.stderr)


def test_writes_over_tls(image: Path, creds: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "rw.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay))
    source = tmp_path / "src.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", str(source), "64M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 7 3M 5M", str(source))
    with tls_server("ours", overlay, creds) as port:
        sh("nbdcopy", "--flush", str(source), nbds(port, creds / "client"))
    assert sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(overlay)).returncode == 0
    assert sh("qemu-img", "check", str(overlay)).returncode == 0


def test_bad_credentials_fail_the_start(tmp_path: Path, image: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [
        sys.executable,
        "-m",
        "nbdserver",
        "-r",
        "-k",
        str(tmp_path / "s.sock"),
        "--tls-creds",
        str(empty),
    ]
    failed = sh(*argv, str(image), check=False)
    assert failed.returncode == 1 and "ca-cert.pem: missing" in failed.stderr, failed.stderr
    psk = sh(sys.executable, "-m", "nbdserver", "--tls-psk", "keys.psk", str(image), check=False)
    assert psk.returncode == 2 and "Python 3.13" in psk.stderr, psk.stderr
