"""The Docker image, built from the repository's Dockerfile and run as users run it.

The engine is Debian's docker.io (scripts/setup.sh installs it); the test
starts dockerd if none runs and stops it again.  Without a reachable image
registry, the base is Debian 12 made by debootstrap (scripts/docker-base.sh),
and without PyPI inside the build, pip takes the wheels this machine's pip
downloads, served over HTTP on loopback (the Dockerfile's PIP_FIND_LINKS and
PIP_NO_INDEX build arguments).  Then, on a volume of qemu-built images:

- read-only, a backing chain: ``nbdinfo --map`` of both contexts and the
  guest bytes from the container equal qemu-nbd's on the same files;
- read-write: the same qemu-io writes locally and through the container
  leave the same guest view, and ours checks clean;
- ``--confine /images``: an image whose backing file lies outside the volume
  is refused with a message that says why;
- ``docker stop`` ends the server cleanly (exit status 0).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import Image, Recipe
from servers import qemu_nbd, run

ROOT = Path(__file__).resolve().parent.parent
TAG = "qcow2-nbd:test"
REGISTRY_BASE = "python:3.11-slim"  # the Dockerfile's default base
DEBOOTSTRAP_BASE = "qcow2-nbd-base:bookworm"
READY_TIMEOUT = 60


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}", pytrace=False)
    return p


def _engine_answers() -> bool:
    return subprocess.run(["docker", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running Docker engine: the one already there, or dockerd started for this session."""
    for tool in ("docker", "dockerd", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs it (docker.io, debootstrap)")
    if _engine_answers():
        yield
        return
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _engine_answers():  # readiness is only observable by asking
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not come up:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.2)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


@contextlib.contextmanager
def wheel_server(directory: Path) -> Iterator[str]:
    """``directory`` over HTTP on loopback, as a pip find-links page."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def image_tag(engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The repository's Dockerfile built; the base from a registry if one answers, else debootstrapped."""
    if docker("pull", REGISTRY_BASE, check=False, timeout=300).returncode == 0:
        base = REGISTRY_BASE
    else:
        made = subprocess.run(
            ["bash", str(ROOT / "scripts" / "docker-base.sh"), DEBOOTSTRAP_BASE],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if made.returncode != 0:
            pytest.fail(f"scripts/docker-base.sh failed:\n{made.stderr[-3000:]}", pytrace=False)
        base = DEBOOTSTRAP_BASE
    wheels = tmp_path_factory.mktemp("wheels")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    # the dependencies and the build backend: the image builds the package from its sources
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    argv = [*pip, "wheel", "-w", str(wheels), *wanted]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed:\n{p.stderr[-3000:]}", pytrace=False)
    with wheel_server(wheels) as url:
        docker(
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE={base}",
            "--build-arg",
            f"PIP_FIND_LINKS={url}",
            "--build-arg",
            "PIP_NO_INDEX=1",
            "-t",
            TAG,
            str(ROOT),
            timeout=900,
        )
    return TAG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def container(tag: str, volume: Path, *args: str, read_only_volume: bool = True) -> Iterator[str]:
    """The image running detached on ``volume``; yields its nbd:// URL once the server listens."""
    port = _free_port()
    mount = f"{volume}:/images" + (":ro" if read_only_volume else "")
    cid = docker("run", "-d", "-p", f"127.0.0.1:{port}:10809", "-v", mount, tag, "-v", *args).stdout.strip()
    try:
        logs = subprocess.Popen(
            ["docker", "logs", "-f", cid], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        seen = []
        for line in logs.stderr:  # the server logs to stderr; "serving" comes once it listens
            seen.append(line)
            if "serving" in line:
                break
        logs.kill()
        logs.wait()
        if not any("serving" in line for line in seen):
            pytest.fail("the container's server did not start:\n" + "".join(seen), pytrace=False)
        yield f"nbd://127.0.0.1:{port}"
        stopped = docker("stop", "-t", "30", cid)
        assert stopped.returncode == 0
        state = docker("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip()
        log = docker("logs", cid).stderr
        assert state == "0", f"docker stop: the server exited with {state}:\n{log}"
        assert "Traceback" not in log, log
    finally:
        docker("rm", "-f", cid, check=False)


def _chain(rc: Recipe) -> Image:
    rc.create("base.qcow2", "64M", cluster_size=65536)
    rc.io("base.qcow2", "write -P 0x11 0 8M", "write -P 0x12 32M 4M", "write -z 40M 1M")
    rc.create("top.qcow2", "64M", backing="base.qcow2", backing_fmt="qcow2")
    rc.io("top.qcow2", "write -P 0x21 4M 2M", "write -z 33M 64k", "discard 6M 1M", "write -c -P 0x22 50M 1M")
    return rc.image("top.qcow2")


def _nbd_answers(uri: str, cwd: Path, name: str) -> dict[str, str | bytes]:
    out = {}
    for what in ("base:allocation", "qemu:allocation-depth"):
        r = run(["nbdinfo", f"--map={what}", uri], cwd)
        assert r.rc == 0, r.err
        out[what] = r.out
    raw = cwd / f"{name}.raw"
    r = run(["nbdcopy", uri, str(raw)], cwd, timeout=120)
    assert r.rc == 0, r.err
    out["bytes"] = raw.read_bytes()
    raw.unlink()
    return out


def test_container_serves_a_chain_like_qemu_nbd(image_tag: str, tmp_path: Path, oracle_tools: None):
    image = _chain(Recipe(tmp_path / "images"))
    with qemu_nbd(image, tmp_path / "q") as q:
        want = _nbd_answers(q.uri, tmp_path, "qemu-nbd")
    with container(image_tag, image.cwd, "-r", "top.qcow2") as uri:
        got = _nbd_answers(uri, tmp_path, "container")
    assert got["base:allocation"] == want["base:allocation"]
    assert got["qemu:allocation-depth"] == want["qemu:allocation-depth"]
    assert got["bytes"] == want["bytes"]


WRITES = ("write -P 0x31 1M 256k", "write -z 5M 1M", "discard 32M 2M", "write -P 0x32 63M 4k")


def test_container_writes_like_qemu_io(image_tag: str, tmp_path: Path, oracle_tools: None):
    local = _chain(Recipe(tmp_path / "local"))
    ours = _chain(Recipe(tmp_path / "ours"))
    argv = ["qemu-io", "-f", "qcow2", *[x for op in WRITES for x in ("-c", op)], local.path]
    r = run(argv, local.cwd)
    assert r.rc == 0 and "failed" not in r.out, r.out + r.err
    with container(image_tag, ours.cwd, "top.qcow2", read_only_volume=False) as uri:
        r = run(["qemu-io", "-f", "raw", *[x for op in WRITES for x in ("-c", op)], uri], tmp_path)
        assert r.rc == 0 and "failed" not in r.out, r.out + r.err
    r = run(["qemu-img", "compare", str(local.abspath), str(ours.abspath)], tmp_path)
    assert r.rc == 0, r.out + r.err
    r = run(["qemu-img", "check", str(ours.abspath)], tmp_path)
    assert r.rc == 0, r.out + r.err


def test_container_refuses_a_backing_file_outside_the_volume(image_tag: str, tmp_path: Path):
    volume = tmp_path / "images"
    volume.mkdir()
    r = run(
        ["qemu-img", "create", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", "evil.qcow2", "1M"],
        volume,
    )
    assert r.rc == 0, r.err
    p = docker("run", "--rm", "-v", f"{volume}:/images:ro", image_tag, "-r", "evil.qcow2", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "/etc/passwd" in p.stderr and "confined" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
