"""QEMU's iotests as a compatibility suite: every NBD test qemu-nbd passes, ours must pass.

The iotests of the installed QEMU come from Debian's source package of that
very version, fetched at run time with ``apt-get source`` (a private apt
configuration with deb-src lines: the system's apt setup is not touched) and
kept in ``/var/tmp/qcow2-nbd-iotests/VERSION`` (only ``tests/qemu-iotests``
and ``python/``).  QEMU's ``check`` runs them against the installed
binaries: ``QEMU_IMG_PROG``, ``QEMU_IO_PROG``, ``QSD_PROG``, ``QEMU_PROG``
(``iotests_wrappers/qemu_system.sh``: TCG for the qtest accelerator Debian
leaves out) and ``QEMU_NBD_PROG`` (``iotests_wrappers/qemu_nbd.py``: the real
qemu-nbd for the baseline, qemu-nbd's command line mapped onto ours then).

Per mode (``-nbd -raw``, ``-nbd -qcow2``; ``-file -raw``, ``-file -qcow2`` for
the tests that start qemu-nbd themselves):

1. baseline: ``check`` once over the candidates with the real qemu-nbd; the
   wrapper logs which test started it.  Candidates: under ``-nbd`` every
   bash test (``_make_test_img`` serves the image with qemu-nbd) and every
   Python test that names qemu-nbd (iotests.py starts no server for ``-nbd``
   itself); under ``-file`` the tests that name it.
2. ours: every test that passed with qemu-nbd and started it, one ``check``
   per test (a time limit each), again once if it fails.

Differences we accept are listed below with their reasons; anything else is
a failure, and so is a listed test that now passes (the list would be stale).

    python tests/qemu_iotests.py [-v] [--modes nbd-raw,...] [TEST...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("QCOW2_NBD_IOTESTS_CACHE", "/var/tmp/qcow2-nbd-iotests"))
WRAPPERS = Path(__file__).resolve().parent / "iotests_wrappers"
HARNESS_PYTHON = "/usr/bin/python3"  # QEMU's check and its Python tests (Debian's python3)
MODES = ("nbd-raw", "nbd-qcow2", "file-raw", "file-qcow2")
# nbd-qcow2 is left out by default: its baseline takes three minutes, and QEMU 7.2's harness
# opens that export with "qemu-io -f qcow2" while qemu-nbd serves the guest's bytes, so
# qemu-nbd passes 5 of the 49 tests that start it there: 4 that start it themselves and run
# in file-qcow2 too, and 174.  QCOW2_NBD_IOTESTS_MODES=all or --modes runs it.
DEFAULT_MODES = ("nbd-raw", "file-raw", "file-qcow2")
TEST_TIMEOUT = 300  # seconds, one iotest with our server
SWEEP_TIMEOUT = 1800  # seconds, the baseline of one mode
NAMES_QEMU_NBD = re.compile(rb"QEMU_NBD|qemu_nbd|nbd_server_start_(unix|tcp)_socket")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Tests qemu-nbd passes that ours may fail, each with its kind and reason:
#   wording  an error message is worded differently
#   missing  the server lacks what the test uses
#   race     a known difference in behaviour that the test hits only now and then
# A listed test that passes fails the suite (strike it from the list), except a race.
KINDS = ("wording", "missing", "race")
EXPECTED: dict[str, tuple[str, str]] = {
    "block-status-cache": (
        "race",
        "ours removes its --pid-file when it exits, qemu-nbd leaves it: the test's tearDown "
        "sends SIGTERM and then removes the file itself, which fails if our server was quicker",
    ),
}


# What the run needs beyond the qemu/libnbd tools every test uses (scripts/setup.sh installs them)
TOOLS = ("qemu-system-x86_64", "qemu-storage-daemon", "qemu-nbd", "apt-get", "dpkg-source", HARNESS_PYTHON)


class FetchError(Exception):
    """QEMU's iotests could not be fetched: the suite fails (it never skips)."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def qemu_version() -> str:
    """The Debian source version of the installed qemu-utils (the source of qemu-img and qemu-nbd)."""
    r = _run(["dpkg-query", "-W", "-f=${source:Package} ${source:Version}", "qemu-utils"])
    if r.returncode != 0 or not r.stdout.startswith("qemu "):
        raise FetchError(f"qemu-utils is not installed (dpkg-query: {r.stderr.strip() or r.stdout})")
    return r.stdout.split()[1]


def _codename() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip('"')
    raise FetchError("/etc/os-release names no Debian release (VERSION_CODENAME)")


def fetch_source(version: str, cache: Path = CACHE) -> Path:
    """QEMU's iotests directory of Debian's qemu source ``version``, fetched once into ``cache``."""
    dest = cache / version.replace(":", "_")  # no ":" in a path that goes into PYTHONPATH
    if (dest / ".complete").exists():
        return dest / "tests" / "qemu-iotests"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        work = Path(tmp)
        suite = _codename()
        repo = f"deb-src [signed-by={KEYRING}] https://deb.debian.org"
        (work / "sources.list").write_text(
            f"{repo}/debian {suite} main\n{repo}/debian {suite}-updates main\n"
            f"{repo}/debian-security {suite}-security main\n"
        )
        for d in ("lists/partial", "cache/archives/partial", "src"):
            (work / d).mkdir(parents=True)
        apt = ["apt-get", "-q", "-o", f"Dir::Etc::SourceList={work}/sources.list",
               "-o", f"Dir::Etc::SourceParts={work}/none", "-o", f"Dir::State::Lists={work}/lists",
               "-o", f"Dir::Cache={work}/cache", "-o", "APT::Sandbox::User=root",
               "-o", "Acquire::Retries=3"]  # fmt: skip
        for argv, cwd in ((apt + ["update"], work), (apt + ["source", f"qemu={version}"], work / "src")):
            r = _run(argv, cwd=cwd, timeout=900)
            if r.returncode != 0:
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
                what = " ".join(argv[-2:])
                hint = "\n(is the installed qemu older than the archive's? upgrade qemu-utils)"
                raise FetchError(f"cannot fetch Debian's qemu source {version}: {what}:\n{tail}{hint}")
        trees = sorted((work / "src").glob("qemu-*/tests/qemu-iotests"))
        if not trees:
            raise FetchError(f"Debian's qemu source {version} has no tests/qemu-iotests")
        top = trees[0].parents[1]
        staged = work / "staged"
        for part in ("tests/qemu-iotests", "python"):
            (staged / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(top / part, staged / part)
        (staged / ".complete").write_text(version + "\n")
        if dest.exists() and not (dest / ".complete").exists():
            shutil.rmtree(dest)  # an earlier, unfinished copy
        with contextlib.suppress(OSError):  # another run may have been quicker: its copy is as good
            staged.rename(dest)
    return dest / "tests" / "qemu-iotests"


@dataclass
class Outcome:
    status: str  # pass, fail, skip, timeout
    detail: str = ""  # the diff or reason check printed
    started: list[list[str]] = field(default_factory=list)  # qemu-nbd command lines (without -L)
    first_failure: str = ""  # when it passed only when run again


def parse_tap(text: str) -> dict[str, Outcome]:
    """check -tap's output: ``ok FMT T``, ``ok FMT T # SKIP``, ``not ok FMT T`` and what follows."""
    results: dict[str, Outcome] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"(not ok|ok) \S+ (\S+)( # SKIP)?$", line)
        if m:
            status = "fail" if m[1] == "not ok" else "skip" if m[3] else "pass"
            current = results[m[2]] = Outcome(status)
        elif line.startswith("# running "):
            current = None
        elif current is not None and current.status == "fail":
            current.detail += line + "\n"
    return results


class Harness:
    """QEMU's check on one iotests directory, with scratch dirs of its own and no leftovers."""

    def __init__(self, iotests: Path, python: str = sys.executable) -> None:
        self.iotests = iotests
        self.base = Path(tempfile.mkdtemp(prefix="qcow2-nbd-iot.", dir="/tmp"))  # short: sockets
        self.token = self.base.name
        self.python = python

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def env(self, server: str, log: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QEMU_NBD_OPTIONS")}
        tool = {name: shutil.which(name) or f"/usr/bin/{name}" for name in ("qemu-img", "qemu-io")}
        env.update(
            QEMU_PROG=str(WRAPPERS / "qemu_system.sh"),
            QSD_PROG=shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon",
            QEMU_IMG_PROG=tool["qemu-img"],
            QEMU_IO_PROG=tool["qemu-io"],
            QEMU_NBD_PROG=str(WRAPPERS / "qemu_nbd.py"),
            IOTESTS_SERVER=server,
            IOTESTS_NBD_LOG=str(log),
            IOTESTS_RUN=self.token,  # marks every process of the run, see reap()
            QCOW2_NBD_PYTHON=self.python,
            TEST_DIR=str(self.base / "t"),
            SOCK_DIR=str(self.base / "s"),
            PYTHONDONTWRITEBYTECODE="1",
        )
        return env

    def candidates(self, proto: str, fmt: str) -> list[str]:
        """The tests check would select, minus those that cannot start qemu-nbd in this mode."""
        r = _run([HARNESS_PYTHON, "check", f"-{proto}", f"-{fmt}", "-n"], cwd=self.iotests,
                 env=self.env("qemu", self.base / "dry.log"))  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"check -n failed: {r.stderr.strip()}")
        out = []
        for name in r.stdout.split():
            text = (self.iotests / name).read_bytes()
            bash = text.startswith(b"#!/usr/bin/env bash")
            if NAMES_QEMU_NBD.search(text) or (proto == "nbd" and bash):
                out.append(os.path.basename(name))  # check selects tests/NAME as NAME
        return out

    def check(self, proto: str, fmt: str, server: str, tests: list[str], timeout: float) -> dict:
        """Run check on ``tests``; each outcome says which qemu-nbd command lines its test ran.

        A start the wrapper could not pin on a test is filed under "?".
        """
        for d in ("t", "s"):
            shutil.rmtree(self.base / d, ignore_errors=True)
            (self.base / d).mkdir()
        log = self.base / "nbd.log"
        log.unlink(missing_ok=True)
        argv = [HARNESS_PYTHON, "check", f"-{proto}", f"-{fmt}", "-tap", *tests]
        proc = subprocess.Popen(argv, cwd=self.iotests, env=self.env(server, log), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n# timed out after {timeout:.0f} s\n"
        finally:
            self.reap()
        results = parse_tap(out)
        for name in tests:
            if name not in results:
                results[name] = Outcome("timeout" if "timed out" in out else "fail", out[-3000:])
        if log.exists():
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                if {"-L", "--list"} & set(entry["argv"]):
                    continue  # qemu-nbd as a client
                outcome = results.setdefault(os.path.basename(entry["test"]), Outcome("unknown"))
                outcome.started.append(entry["argv"])
        return results

    def reap(self) -> None:
        """Kill what a test left running (servers, VMs): every process carrying this run's mark."""
        mark = f"IOTESTS_RUN={self.token}".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)


@dataclass
class ModeReport:
    mode: str
    candidates: int = 0
    baseline: dict[str, Outcome] = field(default_factory=dict)  # the tests that started qemu-nbd
    ours: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def qemu_passed(self) -> list[str]:
        return sorted(t for t, o in self.baseline.items() if o.status == "pass")

    @property
    def ours_passed(self) -> list[str]:
        return sorted(t for t, o in self.ours.items() if o.status == "pass")

    def problems(self) -> list[str]:
        """What makes the suite fail: unexpected failures, stale list entries, unknown starts."""
        out = []
        if "?" in self.baseline:
            out.append(f"{self.mode}: qemu-nbd started by no test the wrapper could name: "
                       f"{self.baseline['?'].started}")  # fmt: skip
        for name in self.qemu_passed:
            outcome = self.ours[name]
            kind = EXPECTED.get(name, ("",))[0]
            if outcome.status != "pass" and not kind:
                out.append(f"{self.mode} {name}: qemu-nbd passes, ours: {outcome.status}")
            elif outcome.status == "pass" and kind in ("wording", "missing"):
                out.append(f"{self.mode} {name}: passes now; strike it from EXPECTED in {__file__}")
        return out


def run_mode(h: Harness, mode: str, only: list[str] | None = None, say=print) -> ModeReport:
    proto, fmt = mode.split("-")
    t0 = time.monotonic()
    rep = ModeReport(mode)
    tests = h.candidates(proto, fmt)
    if only:
        tests = [t for t in tests if t in only]
    rep.candidates = len(tests)
    say(f"== {mode}: {len(tests)} candidates, with qemu-nbd")
    base = h.check(proto, fmt, "qemu", tests, SWEEP_TIMEOUT) if tests else {}
    rep.baseline = {t: o for t, o in base.items() if o.started}
    passed = rep.qemu_passed
    say(f"   qemu-nbd started by {len(rep.baseline)} tests, passes {len(passed)}: {' '.join(passed)}")
    for name in rep.qemu_passed:
        outcome = h.check(proto, fmt, "ours", [name], TEST_TIMEOUT)[name]
        if outcome.status != "pass" and name not in EXPECTED:  # once more: timing on a busy machine?
            again = h.check(proto, fmt, "ours", [name], TEST_TIMEOUT)[name]
            if again.status == "pass":
                again.first_failure = outcome.detail or outcome.status
                outcome = again
        rep.ours[name] = outcome
        if not outcome.started:
            outcome.status, outcome.detail = "fail", "our server was never started\n" + outcome.detail
        say(f"   ours {name}: {outcome.status}{' (when run again)' if outcome.first_failure else ''}")
    rep.seconds = time.monotonic() - t0
    return rep


def summary(reports: list[ModeReport], verbose: bool = False) -> str:
    lines = []
    for r in reports:
        fails = [t for t in r.qemu_passed if r.ours[t].status != "pass"]
        lines.append(
            f"{r.mode}: {r.candidates} candidates, {len(r.baseline)} start qemu-nbd; "
            f"qemu-nbd passes {len(r.qemu_passed)}, ours {len(r.ours_passed)} of those "
            f"({r.seconds:.0f} s)"
        )
        for t in fails:
            kind, reason = EXPECTED.get(t, ("", ""))
            lines.append(f"  {t}: {r.ours[t].status} ({f'{kind}: {reason}' if kind else 'NOT LISTED'})")
            if verbose or not kind:
                lines += ["    " + x for x in r.ours[t].detail.splitlines()[:60]]
        for t in r.qemu_passed:
            if r.ours[t].first_failure:
                lines.append(f"  {t}: passed when run again; the first time:")
                lines += ["    " + x for x in r.ours[t].first_failure.splitlines()[: 60 if verbose else 8]]
        for t, o in sorted(r.baseline.items()):
            if o.status != "pass" and verbose:
                lines.append(f"  ({t}: qemu-nbd {o.status}, not compared)")
                lines += ["    " + x for x in o.detail.splitlines()[:30]]
    return "\n".join(lines)


def modes(text: str) -> list[str]:
    """``nbd-raw,file-qcow2`` or ``all`` as a list of modes."""
    chosen = list(MODES) if text == "all" else [m for m in text.split(",") if m]
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {', '.join(unknown)}: the modes are {', '.join(MODES)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tests", nargs="*", help="only these iotests (e.g. 001 nbd-qemu-allocation)")
    p.add_argument("--modes", default=os.environ.get("QCOW2_NBD_IOTESTS_MODES", ",".join(DEFAULT_MODES)),
                   help=f"comma-separated, of {', '.join(MODES)}; or all (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every failure's diff")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if missing_tools():
        print(f"iotests: missing {', '.join(missing_tools())} (bash scripts/setup.sh)", file=sys.stderr)
        return 2
    try:
        version = qemu_version()
        iotests = fetch_source(version)
    except FetchError as e:
        print(f"iotests: {e}", file=sys.stderr)
        return 2
    print(f"QEMU {version}: iotests in {iotests} ({time.monotonic() - t0:.0f} s to get them)")
    h = Harness(iotests)
    try:
        reports = [run_mode(h, m, args.tests or None) for m in modes(args.modes)]
    finally:
        h.close()
    print(summary(reports, args.verbose))
    problems = [x for r in reports for x in r.problems()]
    print("\n".join(problems) or "every test qemu-nbd passes, ours passes (or is listed)")
    print(f"total {time.monotonic() - t0:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
