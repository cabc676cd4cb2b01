"""NBD servers under test and the differential comparison against qemu.

``qemu_nbd`` and ``our_nbd`` are context managers that start a forking server on a
Unix socket, yield a :class:`Server`, and at exit send SIGTERM and wait for the
process to disappear (a pidfd, no sleeping).

:func:`compare_image` runs every comparison of the suite for one image and
returns a list of :class:`Mismatch`; :func:`report` turns them into one
readable failure message with both outputs, the server's stderr and the recipe
that rebuilds the image.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from images import Image
from nbd_wire import wait_pid_exit

PYTHON = sys.executable
CMD_TIMEOUT = 30
START_TIMEOUT = 30
STOP_TIMEOUT = 10
SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes including the NUL


class ServerError(AssertionError):
    pass


@dataclass
class Server:
    name: str
    argv: list[str]
    cwd: Path
    sock: Path
    pidfile: Path
    errfile: Path
    export: str = ""
    pid: int | None = None
    exit_problem: str | None = None
    port: int | None = None  # listening on 127.0.0.1:port instead of the socket

    @property
    def uri(self) -> str:
        if self.port is not None:
            return f"nbd://127.0.0.1:{self.port}/{self.export}"
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def stderr(self) -> str:
        try:
            return self.errfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return f"{self.name}: (cd {shlex.quote(str(self.cwd))} && {shlex.join(self.argv)})"


def _short_dir(workdir: Path) -> Path:
    """A directory for sockets; ``workdir`` unless its path is too long for AF_UNIX."""
    if len(str(workdir)) + 20 < SUN_PATH_MAX:
        return workdir
    return Path(tempfile.mkdtemp(prefix="nbdsock-", dir="/tmp"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (just now)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _forking_server(
    name: str, argv_fn, image: Image, workdir: Path, export: str, port: int | None = None
) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    sdir = _short_dir(workdir)
    tag = name.replace("-", "")
    sock = sdir / f"{tag}.sock"
    pidfile = workdir / f"{tag}.pid"
    errfile = workdir / f"{tag}.stderr"
    argv = argv_fn(sock, pidfile)
    srv = Server(name, argv, image.cwd, sock, pidfile, errfile, export, port=port)
    try:
        with open(errfile, "wb") as ef:
            # stdout/stderr go to a file: the daemon inherits them, a pipe would never see EOF.
            try:
                p = subprocess.run(
                    argv, cwd=image.cwd, stdin=subprocess.DEVNULL, stdout=ef, stderr=ef, timeout=START_TIMEOUT
                )
            except subprocess.TimeoutExpired as e:
                raise ServerError(f"{srv.describe()}\ndid not return within {START_TIMEOUT}s") from e
        if p.returncode != 0:
            raise ServerError(f"{srv.describe()}\nexited with {p.returncode}; stderr:\n{srv.stderr()}")
        try:
            srv.pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError) as e:
            raise ServerError(
                f"{srv.describe()}\nreturned 0 but wrote no pid file ({e}); stderr:\n{srv.stderr()}"
            ) from None
        if port is None and not sock.exists():
            raise ServerError(
                f"{srv.describe()}\nreturned 0 but {sock} does not exist; stderr:\n{srv.stderr()}"
            )
        yield srv
    finally:
        if srv.pid is None and pidfile.exists():
            with contextlib.suppress(ValueError):
                srv.pid = int(pidfile.read_text().strip() or "0") or None
        if srv.pid is not None:
            if wait_pid_exit(srv.pid, 0):
                srv.exit_problem = "server process had already exited before teardown"
            else:
                os.kill(srv.pid, signal.SIGTERM)
                if not wait_pid_exit(srv.pid, STOP_TIMEOUT):
                    os.kill(srv.pid, signal.SIGKILL)
                    wait_pid_exit(srv.pid, STOP_TIMEOUT)
                    srv.exit_problem = f"did not exit within {STOP_TIMEOUT}s of SIGTERM (killed)"
        if sdir != workdir:
            with contextlib.suppress(OSError):
                sock.unlink(missing_ok=True)
                sdir.rmdir()


def qemu_nbd(
    image: Image,
    workdir: Path,
    export: str = "",
    writable: bool = False,
    options: Sequence[str] = (),
    port: int | None = None,
) -> contextlib.AbstractContextManager[Server]:
    """qemu-nbd on ``image``: read-only unless ``writable`` (then it changes the image); ``options``
    are added to its command line; on 127.0.0.1:``port`` if given, else on a Unix socket."""

    def argv(sock, pidfile):
        a = ["qemu-nbd", *([] if writable else ["-r"]), "-A", "-t", "-e", "16", "-f", image.fmt, *options]
        a += ["-b", "127.0.0.1", "-p", str(port)] if port is not None else ["-k", str(sock)]
        if export:
            a += ["-x", export]
        return a + ["--fork", "--pid-file", str(pidfile), image.path]

    return _forking_server("qemu-nbd", argv, image, workdir, export, port)


def our_nbd(
    image: Image, workdir: Path, export: str = "", writable: bool = False, options: Sequence[str] = ()
) -> contextlib.AbstractContextManager[Server]:
    """Our server on ``image``: read-only unless ``writable`` (then it changes the image); ``options``
    are added to its command line."""

    def argv(sock, pidfile):
        a = [PYTHON, "-m", "nbdserver", *([] if writable else ["-r"]), "-f", image.fmt, *options]
        a += ["-k", str(sock)]
        if export:
            a += ["-x", export]
        return a + ["--fork", "--pid-file", str(pidfile), image.path]

    return _forking_server("ours", argv, image, workdir, export)


# ---------------------------------------------------------------------------
# Running client commands


@dataclass
class Result:
    argv: list[str]
    cwd: Path
    rc: int | None  # None = timed out
    out: str
    err: str

    def cmdline(self) -> str:
        return f"(cd {shlex.quote(str(self.cwd))} && {shlex.join(self.argv)})"


def run(argv: list[str], cwd: Path, timeout: float = CMD_TIMEOUT) -> Result:
    try:
        p = subprocess.run(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Result(argv, cwd, None, out, f"TIMEOUT after {timeout}s")
    return Result(argv, cwd, p.returncode, p.stdout, p.stderr)


# ---------------------------------------------------------------------------
# Mismatches


@dataclass
class Mismatch:
    what: str
    detail: str
    reference: Result | None = None
    ours: Result | None = None

    def render(self, limit: int = 4000) -> str:
        parts = [f"=== MISMATCH: {self.what}", self.detail]
        if self.reference is not None and self.ours is not None and self.reference.out != self.ours.out:
            diff = difflib.unified_diff(
                self.reference.out.splitlines(), self.ours.out.splitlines(), "qemu", "ours", lineterm="", n=1
            )
            parts.append("--- diff (qemu -> ours):\n" + _clip("\n".join(diff), limit))
        for label, r in (("qemu", self.reference), ("ours", self.ours)):
            if r is None:
                continue
            parts.append(f"--- {label}: {r.cmdline()}  [rc={r.rc}]")
            parts.append(_clip(r.out, limit) if r.out else "(no stdout)")
            if r.err.strip():
                parts.append(f"--- {label} stderr:\n{_clip(r.err, limit)}")
        return "\n".join(parts)


def _clip(s: str, limit: int) -> str:
    if len(s) <= limit:
        return s
    return s[: limit // 2] + f"\n... [{len(s) - limit} chars cut] ...\n" + s[-limit // 2 :]


def _compare_text(
    what: str, ref: Result, ours: Result, out: list[Mismatch], ref_may_fail: bool = False
) -> None:
    if ref.rc != 0 and ref_may_fail and ref.rc is not None:
        # qemu refuses (e.g. human map of compressed clusters): ours must refuse the same way
        if ours.rc != ref.rc or ours.out != ref.out:
            out.append(Mismatch(what, f"qemu failed with rc={ref.rc}; ours must fail alike", ref, ours))
    elif ref.rc != 0:
        out.append(Mismatch(what, "ORACLE FAILED (harness problem: qemu side did not succeed)", ref, ours))
    elif ours.rc != 0:
        out.append(Mismatch(what, f"ours failed (rc={ours.rc})", ref, ours))
    elif ref.out != ours.out:
        out.append(Mismatch(what, "outputs differ", ref, ours))


def _first_difference(a: Path, b: Path) -> str | None:
    """None if the files are identical, else a description of the first difference."""
    sa, sb = a.stat().st_size, b.stat().st_size
    chunk = 1 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                n = min(len(x), len(y))
                i = next((k for k in range(n) if x[k] != y[k]), n)
                off = pos + i
                return (
                    f"first difference at byte {off} (0x{off:x}): "
                    f"{a.name}={x[i : i + 16].hex()} {b.name}={y[i : i + 16].hex()}; sizes {sa} vs {sb}"
                )
            if not x:
                return None
            pos += len(x)


@dataclass
class Comparison:
    image: Image
    mismatches: list[Mismatch] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    context: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not any(s.exit_problem for s in self.servers)


def _settled_run(image: Image, argv: list[str], cwd: Path) -> Result:
    """Run one status query on a cold page cache.

    On ext4, SEEK_DATA reports an unwritten extent as a hole only while none of
    its pages are cached, and block status (raw files, qcow2's metadata-
    preallocation recursion) is built on SEEK_DATA.  Any read of the image --
    including kernel readahead behind another tool's metadata reads -- can turn
    such a "hole" into data.  So status queries run one at a time, each after
    the image files were flushed and dropped from the cache.
    """
    image.settle()
    return run(argv, cwd)


def compare_map(image: Image, cmp: Comparison, pool: ThreadPoolExecutor | None = None) -> None:
    """``qemu-img map`` vs ``python -m qcow2 map``, JSON and human."""
    for output in ("json", "human"):
        ref = _settled_run(image, ["qemu-img", "map", f"--output={output}", image.path], image.cwd)
        ours = _settled_run(
            image, [PYTHON, "-m", "qcow2", "map", f"--output={output}", image.path], image.cwd
        )
        _compare_text(f"map --output={output}", ref, ours, cmp.mismatches, ref_may_fail=True)


def compare_nbd(
    image: Image, workdir: Path, cmp: Comparison, pool: ThreadPoolExecutor, export: str = ""
) -> None:
    """Both servers on the same image, the same clients, the same answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        ref_srv = stack.enter_context(qemu_nbd(image, workdir / "qemu", export))
        cmp.servers.append(ref_srv)
        try:
            our_srv = stack.enter_context(our_nbd(image, workdir / "ours", export))
        except ServerError as e:
            cmp.mismatches.append(Mismatch("start our server", str(e)))
            return
        cmp.servers.append(our_srv)
        _nbd_clients(image, workdir, ref_srv, our_srv, cmp, pool)


def _nbd_clients(image: Image, workdir: Path, ref: Server, ours: Server, cmp: Comparison, pool) -> None:
    def both(argv_fn):
        return pool.submit(run, argv_fn(ref), workdir), pool.submit(run, argv_fn(ours), workdir)

    # Status first, one query at a time on a cold cache (see _settled_run), reads after.
    text_checks = {
        "nbdinfo --map (base:allocation)": lambda s: ["nbdinfo", "--map", s.uri],
        "nbdinfo --map=qemu:allocation-depth": lambda s: ["nbdinfo", "--map=qemu:allocation-depth", s.uri],
        "qemu-img map over NBD": lambda s: ["qemu-img", "map", "-f", "raw", "--output=json", s.uri],
    }
    for what, argv_fn in text_checks.items():
        r = _settled_run(image, argv_fn(ref), workdir)
        o = _settled_run(image, argv_fn(ours), workdir)
        _compare_text(what, r, o, cmp.mismatches)
    info = both(lambda s: ["nbdinfo", "--json", s.uri])  # reads the first sectors
    _compare_info(info[0].result(), info[1].result(), cmp.mismatches)

    ref_raw, ours_raw, conv_raw = workdir / "qemu-nbd.raw", workdir / "ours.raw", workdir / "convert.raw"
    ours_full = workdir / "ours-no-extents.raw"
    copies = (
        pool.submit(run, ["nbdcopy", ref.uri, str(ref_raw)], workdir),
        pool.submit(run, ["nbdcopy", ours.uri, str(ours_raw)], workdir),
        # without block status: every byte comes from READ, nothing is skipped as a hole
        pool.submit(run, ["nbdcopy", "--no-extents", ours.uri, str(ours_full)], workdir),
    )
    conv = pool.submit(
        run, ["qemu-img", "convert", "-f", image.fmt, "-O", "raw", image.path, str(conv_raw)], image.cwd
    )

    r_ref, r_ours, r_full, r_conv = copies[0].result(), copies[1].result(), copies[2].result(), conv.result()
    if r_conv.rc != 0 or r_ref.rc != 0:
        cmp.mismatches.append(
            Mismatch(
                "content",
                "ORACLE FAILED (qemu-img convert / nbdcopy from qemu-nbd)",
                r_conv if r_conv.rc != 0 else r_ref,
                r_ours,
            )
        )
        return
    d = _first_difference(conv_raw, ref_raw)
    if d:
        cmp.mismatches.append(Mismatch("content", f"ORACLE DISAGREES: qemu-img convert vs qemu-nbd: {d}"))
    keep = False
    for label, r, f in (("nbdcopy", r_ours, ours_raw), ("nbdcopy --no-extents", r_full, ours_full)):
        what = f"content ({label} from ours vs qemu-img convert -O raw)"
        if r.rc != 0:
            cmp.mismatches.append(Mismatch(what, f"{label} from ours failed", r_ref, r))
            keep = True
            continue
        d = _first_difference(conv_raw, f)
        if d:
            cmp.mismatches.append(Mismatch(what, f"{d}\n(files kept: {conv_raw} {f})"))
            keep = True
    if not keep:
        _compare_reads(image, ref, ours, conv_raw, cmp)
    if not keep:
        for f in (ref_raw, ours_raw, ours_full, conv_raw):
            f.unlink(missing_ok=True)


def _read_probes(size: int) -> list[tuple[int, int]]:
    """Aligned and unaligned (offset, length) pairs, deterministic for a given size."""
    rng = random.Random(size)
    picks = [(0, min(size, 1)), (0, min(size, 4096)), (size - 1, 1), (max(0, size - 1000), min(size, 1000))]
    for _ in range(24):
        off = rng.randrange(size)
        if rng.random() < 0.3:
            off -= off % 512
        length = rng.randint(1, min(size - off, rng.choice([17, 512, 5000, 70000, 300000])))
        picks.append((off, length))
    return picks


def _compare_reads(image: Image, ref: Server, ours: Server, conv_raw: Path, cmp: Comparison) -> None:
    """Single NBD_CMD_READs at odd offsets and lengths through libnbd, against the reference bytes."""
    import nbd

    data = conv_raw.read_bytes()
    h = nbd.NBD()
    try:
        h.connect_uri(ours.uri)
        for off, length in _read_probes(len(data)):
            try:
                got = h.pread(length, off)
            except nbd.Error as e:
                cmp.mismatches.append(Mismatch(f"pread({length}, {off}) from ours", f"failed: {e}"))
                return
            if got != data[off : off + length]:
                i = next(k for k in range(length) if got[k] != data[off + k])
                cmp.mismatches.append(
                    Mismatch(
                        f"pread({length}, {off}) from ours",
                        f"differs from qemu-img convert at byte {off + i}: ours {got[i : i + 16].hex()} "
                        f"qemu {data[off + i : off + i + 16].hex()}",
                    )
                )
                return
    except nbd.Error as e:
        cmp.mismatches.append(Mismatch("libnbd connection to ours", str(e)))
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        del h


INFO_FIELDS = ("export-size", "is_read_only")
REQUIRED_CONTEXTS = ("base:allocation", "qemu:allocation-depth")


def _compare_info(ref: Result, ours: Result, out: list[Mismatch]) -> None:
    what = "nbdinfo --json"
    if ref.rc != 0:
        out.append(Mismatch(what, "ORACLE FAILED", ref, ours))
        return
    if ours.rc != 0:
        out.append(Mismatch(what, f"ours failed (rc={ours.rc})", ref, ours))
        return
    try:
        r = json.loads(ref.out)["exports"][0]
        o = json.loads(ours.out)["exports"][0]
    except (ValueError, KeyError, IndexError) as e:
        out.append(Mismatch(what, f"cannot parse nbdinfo JSON: {e}", ref, ours))
        return
    problems = [f"{k}: qemu={r.get(k)!r} ours={o.get(k)!r}" for k in INFO_FIELDS if r.get(k) != o.get(k)]
    for c in REQUIRED_CONTEXTS:
        if c not in (o.get("contexts") or []):
            problems.append(f"context {c} not listed by ours (ours lists {o.get('contexts')})")
    if problems:
        out.append(Mismatch(what, "; ".join(problems), ref, ours))


def compare_image(
    image: Image, workdir: Path, *, map_: bool = True, nbd: bool = True, export: str = ""
) -> Comparison:
    cmp = Comparison(image)
    with ThreadPoolExecutor(max_workers=4) as pool:
        if map_:
            compare_map(image, cmp, pool)
        if nbd:
            compare_nbd(image, workdir, cmp, pool, export)
    return cmp


def report(cmp: Comparison, title: str = "") -> str:
    parts = []
    if title:
        parts.append(title)
    parts.append(f"image: {cmp.image.path} (format {cmp.image.fmt}, opened from {cmp.image.cwd})")
    if cmp.context:
        parts.append("\n".join(cmp.context))
    parts += [m.render() for m in cmp.mismatches]
    for s in cmp.servers:
        if s.exit_problem:
            parts.append(f"=== SERVER PROBLEM: {s.describe()}\n{s.exit_problem}")
        if s.name == "ours" or s.exit_problem:
            err = s.stderr().strip()
            if err:
                parts.append(f"=== {s.name} server stderr:\n{_clip(err, 6000)}")
    parts.append("=== commands that rebuild the image:\n" + cmp.image.recipe.script())
    return "\n\n".join(parts)


def assert_same(cmp: Comparison, title: str = "") -> None:
    if not cmp.ok:
        import pytest

        pytest.fail(report(cmp, title), pytrace=False)


# ---------------------------------------------------------------------------
# Images a writer has changed: guest bytes, allocation, check


def guest_bytes(image: Image, scratch: Path) -> bytes:
    """The guest view of ``image`` (``qemu-img convert -O raw`` run from the image's directory)."""
    r = run(["qemu-img", "convert", "-f", image.fmt, "-O", "raw", image.path, str(scratch)], image.cwd)
    if r.rc != 0:
        raise AssertionError(f"{r.cmdline()} failed (rc={r.rc}): {r.err}")
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def allocation_map(image: Image) -> tuple[list[tuple], Result]:
    """``qemu-img map --output=json`` reduced to what must match qemu after the same writes:
    runs of (start, length, depth, present, zero, data, mapped to the host or not); host
    offsets themselves may differ.  The image's files are synced and dropped from the
    page cache first (written-but-unsynced ext4 extents flip between hole and data)."""
    image.recipe.settle(sync=True)
    r = run(["qemu-img", "map", "--output=json", image.path], image.cwd)
    if r.rc != 0:
        raise AssertionError(f"{r.cmdline()} failed (rc={r.rc}): {r.err}")
    runs: list[list] = []
    for e in json.loads(r.out):
        key = [e["depth"], e["present"], e["zero"], e["data"], "offset" in e]
        if runs and runs[-1][2:] == key and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1][1] += e["length"]
        else:
            runs.append([e["start"], e["length"], *key])
    return [tuple(x) for x in runs], r


def check_report(image: Image, *extra: str) -> tuple[Result, dict]:
    """``qemu-img check [extra] --output=json``: the result and the parsed report ({} if none)."""
    r = run(["qemu-img", "check", *extra, "--output=json", image.path], image.cwd)
    try:
        report = json.loads(r.out) if r.out.strip() else {}
    except ValueError:
        report = {}
    return r, report


def check_problems(image: Image) -> str | None:
    """None if ``qemu-img check`` is clean and the image is not dirty, else what is wrong."""
    r, report = check_report(image)
    bad = {k: report.get(k) for k in ("corruptions", "leaks", "check-errors") if report.get(k)}
    if r.rc != 0 or bad:
        return f"{r.cmdline()}: rc={r.rc} {bad}\n{r.out}{r.err}"
    if dirty_flag(image):
        return f"{image.path} is left with the dirty flag set"
    return None


def dirty_flag(image: Image) -> bool:
    r = run(["qemu-img", "info", "-U", "--output=json", image.path], image.cwd)
    if r.rc != 0:
        raise AssertionError(f"{r.cmdline()} failed (rc={r.rc}): {r.err}")
    return bool(json.loads(r.out).get("dirty-flag", False))
