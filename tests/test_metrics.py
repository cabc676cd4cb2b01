"""--metrics ADDR (issue 10 §7): Prometheus text, scraped over HTTP after real client traffic."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nbd_wire import wait_pid_exit
from prometheus_client.parser import text_string_to_metric_families


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_what_clients_did(tmp_path: Path, oracle_tools: None) -> None:
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
    sock, pidfile, port = tmp_path / "s.sock", tmp_path / "s.pid", free_port()
    argv = [sys.executable, "-m", "nbdserver", "-x", "vm", "-k", str(sock), "--metrics", f"127.0.0.1:{port}"]
    sh(*argv, "--fork", "--pid-file", str(pidfile), str(img))
    pid = int(pidfile.read_text())
    uri = f"nbd+unix:///vm?socket={sock}"
    try:
        sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "read 0 4k", "-c", "read 4k 4k", uri)
        deadline = time.monotonic() + 30
        while True:  # the last client's disconnect is counted once its connection has closed
            m = scrape(port)
            if m.get(("nbd_clients", ()), 1) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        read = (("command", "READ"), ("export", "vm"))
        write = (("command", "WRITE"), ("export", "vm"))
        assert m[("nbd_requests_total", read)] == 2, m
        assert m[("nbd_request_bytes_total", read)] == 8192
        assert m[("nbd_requests_total", write)] == 1
        assert m[("nbd_request_bytes_total", write)] == 65536
        assert m[("nbd_request_seconds_count", read)] == 2
        assert m[("nbd_clients", ())] == 0
    finally:
        os.kill(pid, 15)
        wait_pid_exit(pid, 30)


def test_errors_are_counted(tmp_path: Path, oracle_tools: None) -> None:
    img = tmp_path / "ro.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
    sock, pidfile, port = tmp_path / "s.sock", tmp_path / "s.pid", free_port()
    argv = [sys.executable, "-m", "nbdserver", "-r", "-k", str(sock), "--metrics", f"127.0.0.1:{port}"]
    sh(*argv, "--fork", "--pid-file", str(pidfile), str(img))
    pid = int(pidfile.read_text())
    try:
        import nbd

        h = nbd.NBD()
        h.set_strict_mode(0)  # let the write reach the server, which must refuse it
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        try:
            h.pwrite(b"x" * 512, 0)
        except nbd.Error:
            pass
        h.shutdown()
        m = scrape(port)
        key = (("command", "WRITE"), ("export", ""))
        assert m[("nbd_request_errors_total", key)] == 1, m
    finally:
        os.kill(pid, 15)
        wait_pid_exit(pid, 30)
