"""qcow2-nbd against qemu-nbd: same images, same clients, same machine, same run.

    .venv/bin/python benchmarks/compare.py            # ~2.5 minutes (3 rounds, 2 s fio runs)
    .venv/bin/python benchmarks/compare.py --full     # more rounds, longer fio runs
    .venv/bin/python benchmarks/compare.py --only writes

Builds its test images with QEMU's own tools (qemu-img, qemu-io) and serves
them with both servers over Unix sockets, read-only for the read tests

    qemu-nbd  -r -A -t --fork -e 8 -f qcow2 -k SOCKET --pid-file F IMAGE
    qcow2-nbd -r       --fork -e 8 -f qcow2 -k SOCKET --pid-file F IMAGE

and read-write for the write tests, each server on its own copy

    qemu-nbd  -t --cache=writeback --discard=unmap --fork -e 8 -f qcow2 ... IMAGE
    qcow2-nbd                                      --fork -e 8 -f qcow2 ... IMAGE

(writeback is qemu-nbd's default cache mode: writes land in the host page
cache and an NBD flush becomes an fsync, which is also what our server does).
The same client command runs against each server in alternation (the order
flips every round), several rounds, reporting medians:

    seq read        nbdcopy URI null:                     1 GiB, ~7/8 allocated
    randread qdN    fio --ioengine=nbd --rw=randread --bs=4k --iodepth=N
    map             nbdinfo --map URI                      1 TiB, 100k scattered clusters
    map depth       nbdinfo --map=qemu:allocation-depth URI  same image
    seq write       nbdcopy --flush SOURCE.raw URI        1 GiB of random data with
                                                          zero runs, into a new empty
                                                          qcow2 each run; final flush timed
    randwrite alloc qdN    fio --rw=randwrite --bs=4k --number_ios=16384 on a new
                           empty 64 GiB qcow2 each run: nearly every write
                           allocates a cluster
    randwrite inplace qdN  fio --rw=randwrite --bs=4k, timed, on a fully allocated
                           1 GiB qcow2: every write overwrites allocated data

The map outputs of the two servers must be equal, and after every sequential
write the image must have the source's content (``qemu-img compare``; both
equal to the source, so equal to each other) and ours must pass ``qemu-img
check``.  fio issues no flushes; after each
in-place run the image file is fsynced outside the timing so that the next
run does not pay for the previous one's writeback.

``--ours 'qemu-nbd -A -t'`` puts qemu-nbd on both sides, to see how much
two identical servers differ here (the noise floor).  ``--before CMD`` adds a
third server to every round, our server at an earlier commit (for instance
``git worktree add /tmp/old HEAD~3`` then ``--before 'env PYTHONPATH=/tmp/old
.venv/bin/python -P -m nbdserver'``), and a column of per-round ratios
ours / before: what a change did, paired in one run.

Images are kept in --workdir and reused while their parameters match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER = 64 * 1024
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy", "nbdinfo", "fio")
QEMU_READ = ["qemu-nbd", "-A", "-t"]  # + -r
QEMU_WRITE = ["qemu-nbd", "-t", "--cache=writeback", "--discard=unmap"]
ALLOC_SIZE = 64 << 30  # virtual size of the images the allocating random writes go to


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    return int(float(t[: len(t) - len(unit)]) * units[unit])


def human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        size = 1 << {"T": 40, "G": 30, "M": 20, "K": 10}[unit]
        if n >= size and n % size == 0:
            return f"{n // size} {unit}iB"
    return f"{n} B"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


# --- images -----------------------------------------------------------------


def build_seq_image(path: Path, size: int) -> None:
    """``size`` bytes of qcow2, written in 64 MiB chunks except every 8th."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    chunk = min(64 << 20, size)
    cmds: list[str] = []
    for i, off in enumerate(range(0, size, chunk)):
        if i % 8 != 7:
            cmds += ["-c", f"write -q -P 0x{0x40 + i % 64:02x} {off} {min(chunk, size - off)}"]
    run(["qemu-io", "-f", "qcow2", *cmds, str(path)], stdout=subprocess.DEVNULL)


def build_source_raw(path: Path, size: int, seed: int) -> None:
    """``size`` bytes of raw data for the sequential write: seeded random bytes
    in 64 MiB chunks, every 8th chunk written as zeros (real zeros, not a hole,
    so nbdcopy has to find them by looking: it sends them as zero requests)."""
    rng = random.Random(seed)
    chunk = min(64 << 20, size)
    with open(path, "wb") as f:
        for i, off in enumerate(range(0, size, chunk)):
            n = min(chunk, size - off)
            f.write(bytes(n) if i % 8 == 7 else rng.randbytes(n))


def build_full_image(path: Path, raw: Path) -> None:
    """Every cluster allocated with data (``-S 0``: zeros are written too)."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-S", "0", str(raw), str(path)])


def build_map_image(path: Path, size: int, clusters: int, seed: int) -> None:
    """A qcow2 image with ``clusters`` data clusters at random places.

    Fastest way measured: 4 KiB of data at each place in a sparse raw file,
    then ``qemu-img convert`` (it skips the holes with SEEK_DATA).  One
    qemu-io write per cluster is about five times slower.
    """
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(size // CLUSTER), clusters))
    raw = path.with_suffix(".raw")
    payload = rng.randbytes(4096)
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for c in picks:
            os.pwrite(fd, payload, c * CLUSTER)
    finally:
        os.close(fd)
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        raw.unlink()


def ensure_images(workdir: Path, args, needed: set[str], labels: tuple[str, ...]) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    specs = {
        "seq": {"size": args.seq_size},
        "map": {"size": args.map_size, "clusters": args.map_clusters, "seed": args.seed},
        "src": {"size": args.seq_size, "seed": args.seed, "kind": "random, every 8th 64 MiB zero"},
    }
    specs["full"] = {"from": specs["src"], "convert": "-S 0"}
    paths = {}
    for name, spec in specs.items():
        if name not in needed:
            continue
        path = workdir / (f"{name}.raw" if name == "src" else f"{name}.qcow2")
        stamp = workdir / f"{name}.json"
        want = json.dumps(spec, sort_keys=True)
        if not (path.exists() and stamp.exists() and stamp.read_text() == want):
            stamp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            t = time.perf_counter()
            print(f"building {path} ({json.dumps(spec)}) ...", end=" ", flush=True)
            if name == "seq":
                build_seq_image(path, spec["size"])
            elif name == "map":
                build_map_image(path, spec["size"], spec["clusters"], spec["seed"])
            elif name == "src":
                build_source_raw(path, spec["size"], spec["seed"])
            else:
                build_full_image(path, paths["src"])
            stamp.write_text(want)
            print(f"{time.perf_counter() - t:.1f} s")
        paths[name] = path
    if "full" in needed:
        # One copy per server, as the in-place tests write to them.  Rewrites keep
        # them fully allocated, so they are reused while qemu-img check is happy.
        for label in labels:
            copy = workdir / f"full-{label}.qcow2"
            stamp = workdir / f"full-{label}.json"
            want = (workdir / "full.json").read_text()
            ok = copy.exists() and stamp.exists() and stamp.read_text() == want
            if ok and subprocess.run(["qemu-img", "check", "-q", str(copy)]).returncode != 0:
                ok = False
            if not ok:
                stamp.unlink(missing_ok=True)
                print(f"copying {paths['full']} to {copy} ...", flush=True)
                shutil.copyfile(paths["full"], copy)
                fsync_file(copy)
                stamp.write_text(want)
            paths[f"full-{label}"] = copy
    return paths


def fsync_file(path: Path) -> None:
    """Write the file's dirty page cache out now, so no later run pays for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm_page_cache(path: Path) -> None:
    """Read the whole file once so that neither server pays for the disk."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


# --- servers ----------------------------------------------------------------


@dataclass
class Server:
    label: str
    argv: list[str]
    image: Path
    rundir: Path
    writable: bool = False
    pid: int = 0
    socket: Path = field(init=False)

    def __post_init__(self) -> None:
        tag = f"{self.label}-{self.image.stem}"
        self.socket = self.rundir / f"{tag}.sock"
        self.pidfile = self.rundir / f"{tag}.pid"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> None:
        cmd = [
            *self.argv, *([] if self.writable else ["-r"]), "--fork", "-e", "8", "-f", "qcow2",
            "-k", str(self.socket), "--pid-file", str(self.pidfile), str(self.image),
        ]  # fmt: skip
        # In the run directory: a ``python -m`` server must not pick up modules from our cwd.
        subprocess.run(cmd, check=True, timeout=60, stdin=subprocess.DEVNULL, cwd=self.rundir)
        for _ in range(100):  # --fork returns once listening; the pid file may lag a little
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                break
            time.sleep(0.05)
        self.pid = int(self.pidfile.read_text())

    def stop(self, kill: bool = False) -> None:
        """SIGTERM: the server closes the image cleanly (and flushes it);
        ``kill``: SIGKILL at once, for an image that is thrown away anyway."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + 60  # closing may write back a lot of data
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid = 0


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (the daemon's parent is pid 1,
    which may take a second or two to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# --- measurements -----------------------------------------------------------


@dataclass
class Test:
    name: str
    image: str  # key into the images; "fresh": a new empty image per run
    unit: str  # "s" (lower is better) or "IOPS" (higher is better)
    note: str
    fresh_size: int = 0  # virtual size of that new image


def timed(cmd: list[str], timeout: float, out=subprocess.DEVNULL) -> float:
    t = time.perf_counter()
    subprocess.run(
        cmd, check=True, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=timeout
    )
    return time.perf_counter() - t


def fio(server: Server, rw: str, depth: int, args, scratch: Path, *limit: str) -> dict:
    out = scratch / "fio.json"
    cmd = [
        "fio", f"--name={rw}", "--ioengine=nbd", f"--uri={server.uri}", f"--rw={rw}",
        "--bs=4k", f"--iodepth={depth}", *limit, "--output-format=json", f"--output={out}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=args.fio_runtime + args.timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']}")
    return job


def measure(
    test: Test, server: Server, args, scratch: Path, images: dict[str, Path]
) -> tuple[float, str | None]:
    """One run of ``test`` against ``server``: (value, map output or None)."""
    if test.name == "seq read":
        return timed(["nbdcopy", server.uri, "null:"], args.timeout), None
    if test.name == "seq write":
        # nbdcopy does not flush unless told to; the flush is part of the job
        return timed(["nbdcopy", "--flush", str(images["src"]), server.uri], args.timeout), None
    if test.name.startswith(("randread", "randwrite")):
        depth = int(test.name.rsplit(" qd", 1)[1])
        rw = test.name.split()[0]
        if test.fresh_size:  # a fixed number of writes, nearly all into clusters not yet allocated
            job = fio(server, rw, depth, args, scratch, f"--number_ios={args.alloc_writes}")
            if job["write"]["total_ios"] != args.alloc_writes:
                raise RuntimeError(f"fio wrote {job['write']['total_ios']} times, not {args.alloc_writes}")
        else:
            job = fio(server, rw, depth, args, scratch, f"--runtime={args.fio_runtime}", "--time_based")
        return job["read" if rw == "randread" else "write"]["iops"], None
    which = "--map" if test.name == "map" else "--map=qemu:allocation-depth"
    out = scratch / "map.txt"
    with open(out, "w") as f:
        value = timed(["nbdinfo", which, server.uri], args.timeout, out=f)
    return value, out.read_text()


def data_clusters(image: Path) -> int:
    """Clusters holding data in ``image``, by qemu-img map."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return sum(e["length"] for e in json.loads(out) if e["data"]) // CLUSTER


def verify_written(image: Path, source: Path, check: bool) -> tuple[bool, bool, str]:
    """After a sequential write: (``image`` has the source's content, ``qemu-img
    check`` is clean or was not asked for, details of what failed).

    Each server's image is compared with the source rather than the two images
    with each other (equal to the source both, so equal to each other): that
    way each is deleted right after its run.  Keeping the first one on disk
    while the second server writes made the second run up to twice as slow on
    a thin-provisioned virtual disk, whichever server it was.
    """
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    detail = ""
    if cmp.returncode:
        detail += f"qemu-img compare: {(cmp.stdout + cmp.stderr).strip()[-300:]} "
    clean = True
    if check:
        chk = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True)
        clean = chk.returncode == 0
        if not clean:
            detail += f"qemu-img check: {(chk.stdout + chk.stderr).strip()[-300:]}"
    return cmp.returncode == 0, clean, detail.strip()


def settle_disk(workdir: Path, source: Path) -> None:
    """Write ``source`` to a scratch file, fsync, delete: untimed, before a
    round's pair of sequential writes.  On this kind of virtual disk a 1 GiB
    write lands much faster in space that was freed a moment ago than in space
    freed (and discarded) earlier, so without this the first run of a round
    was the slow one, whichever server it was; now both follow a deletion."""
    scratch = workdir / "settle.tmp"
    shutil.copyfile(source, scratch)
    fsync_file(scratch)
    scratch.unlink()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def qemu_default_cache() -> str:
    """The cache mode ``qemu-nbd --help`` calls the default, or '?'."""
    text = subprocess.run(["qemu-nbd", "--help"], capture_output=True, text=True).stdout
    m = re.search(r"--cache=.*?'(\w+)' \(default\)", text, re.S)
    return m.group(1) if m else "?"


def fmt_value(unit: str, v: float | None) -> str:
    if v is None:
        return "FAILED"
    return f"{v:.3f} s" if unit == "s" else f"{v:,.0f} IOPS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="5 rounds, 10 s fio runs, 32768 allocating writes (about 8 minutes)",
    )
    p.add_argument("--rounds", type=int, help="rounds per test (default 3, --full 5)")
    p.add_argument("--fio-runtime", type=int, help="seconds per timed fio run (default 2, --full 10)")
    p.add_argument(
        "--alloc-writes", type=int, help="writes per allocating fio run (default 16384, --full 32768)"
    )
    p.add_argument("--seq-size", type=parse_size, default=parse_size("1G"), help="sequential image size (1G)")
    p.add_argument("--map-size", type=parse_size, default=parse_size("1T"), help="map image size (1T)")
    p.add_argument("--map-clusters", type=int, default=100_000, help="allocated clusters in the map image")
    p.add_argument("--seed", type=int, default=1, help="seed for the map image and the write source data")
    p.add_argument(
        "--only",
        help="comma-separated subset of: seq,qd1,qd32,map,depth (or 'reads'), "
        "wseq,alloc1,alloc32,inplace1,inplace32 (or 'writes')",
    )
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2-nbd-bench"), help="images (kept)")
    p.add_argument("--ours", help="command for our server (default: qcow2-nbd next to this Python)")
    p.add_argument("--before", help="also run this server (ours at an earlier commit) in every round")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one client run fails")
    p.add_argument("--json", type=Path, help="also write all samples here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every sample")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.rounds = args.rounds or (5 if args.full else 3)
    args.fio_runtime = args.fio_runtime or (10 if args.full else 2)
    args.alloc_writes = args.alloc_writes or (32768 if args.full else 16384)

    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (run: bash scripts/setup.sh)", file=sys.stderr)
        return 1
    if args.ours:
        ours = shlex.split(args.ours)
    else:
        here = Path(sys.executable).parent / "qcow2-nbd"
        ours = [str(here)] if here.exists() else [shutil.which("qcow2-nbd") or "qcow2-nbd"]
    labels: tuple[str, ...] = ("qemu", "ours")
    read_argv = {"qemu": QEMU_READ, "ours": ours}
    write_argv = {"qemu": QEMU_WRITE, "ours": ours}
    if args.before:
        labels += ("before",)
        read_argv["before"] = write_argv["before"] = shlex.split(args.before)

    seq, fio_s = human(args.seq_size), f"{args.fio_runtime} s"
    alloc = f"fio nbd 4k, {args.alloc_writes} writes, new {human(ALLOC_SIZE)}"
    tests = [
        Test("seq read", "seq", "s", f"nbdcopy URI null:, {seq}"),
        Test("randread qd1", "seq", "IOPS", f"fio nbd 4k, {fio_s}"),
        Test("randread qd32", "seq", "IOPS", f"fio nbd 4k, {fio_s}"),
        Test("map", "map", "s", f"nbdinfo --map, {human(args.map_size)}, {args.map_clusters} clusters"),
        Test("map depth", "map", "s", "nbdinfo --map=qemu:allocation-depth"),
        Test("seq write", "fresh", "s", f"nbdcopy --flush raw URI, {seq} into new qcow2", args.seq_size),
        Test("randwrite alloc qd1", "fresh", "IOPS", alloc, ALLOC_SIZE),
        Test("randwrite alloc qd32", "fresh", "IOPS", alloc, ALLOC_SIZE),
        Test("randwrite inplace qd1", "full", "IOPS", f"fio nbd 4k, {fio_s}, fully allocated {seq}"),
        Test("randwrite inplace qd32", "full", "IOPS", f"fio nbd 4k, {fio_s}, fully allocated {seq}"),
    ]  # fmt: skip
    keys = {"seq": "seq read", "qd1": "randread qd1", "qd32": "randread qd32"}
    keys |= {"map": "map", "depth": "map depth", "wseq": "seq write"}
    keys |= {"alloc1": "randwrite alloc qd1", "alloc32": "randwrite alloc qd32"}
    keys |= {"inplace1": "randwrite inplace qd1", "inplace32": "randwrite inplace qd32"}
    groups = {"reads": ["seq", "qd1", "qd32", "map", "depth"]}
    groups["writes"] = ["wseq", "alloc1", "alloc32", "inplace1", "inplace32"]
    if args.only:
        wanted = set()
        for k in (k.strip() for k in args.only.split(",")):
            if k not in keys and k not in groups:
                p.error(f"--only: unknown test {k!r}")
            wanted |= {keys[g] for g in groups.get(k, [k])}
        tests = [t for t in tests if t.name in wanted]

    print("qcow2-nbd vs qemu-nbd")
    print(f"  qemu-nbd:  {first_line(['qemu-nbd', '--version'])}")
    print(f"             reads:  {shlex.join(QEMU_READ)} -r")
    print(f"             writes: {shlex.join(QEMU_WRITE)}  (--help names '{qemu_default_cache()}' as the")
    print("                     default cache mode: host page cache, NBD flush = fsync, like ours)")
    print(f"  ours:      {shlex.join(ours)}  (-r for reads; read-write, buffered, flush = fsync)")
    if args.before:
        print(f"  before:    {args.before}  (the same, at an earlier commit)")
    print(f"  clients:   {first_line(['nbdcopy', '--version'])}, {first_line(['fio', '--version'])}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"  machine:   {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}")
    print(f"  Python:    {platform.python_version()} ({sys.executable})")
    print(f"  rounds:    {args.rounds}, order rotating; medians; page cache warm; Unix sockets")
    load_before = loadavg()
    print(f"  load avg:  {load_before} (1/5/15 min) at start; other jobs on this machine skew the figures")

    needed = {t.image for t in tests} - {"fresh"}
    if "full" in needed or any(t.name == "seq write" for t in tests):
        needed.add("src")
    images = ensure_images(args.workdir, args, needed, labels)
    for name in sorted(needed):
        for key in [f"{name}-{label}" for label in labels] if name == "full" else (name,):
            warm_page_cache(images[key])

    samples: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    mismatch: list[str] = []
    same_as_source: dict[str, list[bool]] = {label: [] for label in labels}  # seq write, per round
    ours_clean: list[bool] = []  # seq write: qemu-img check on our image, per round
    allocated: dict[tuple[str, str], float] = {}  # share of allocating writes that found a new cluster
    fresh_paths = [args.workdir / f"fresh-{label}.qcow2" for label in labels]
    with tempfile.TemporaryDirectory(prefix="qcow2-nbd-bench-") as tmp:
        rundir = Path(tmp)
        servers: dict[tuple[str, str], Server] = {}
        try:
            for image in sorted({t.image for t in tests} - {"fresh"}):
                for label, argv_ in read_argv.items():
                    if image == "full":
                        s = Server(label, write_argv[label], images[f"full-{label}"], rundir, writable=True)
                    else:
                        s = Server(label, argv_, images[image], rundir)
                    servers[label, image] = s
                    s.start()
            t0 = time.perf_counter()
            for rnd in range(args.rounds):
                order = labels[rnd % len(labels) :] + labels[: rnd % len(labels)]
                for test in tests:
                    outputs = {}
                    written: dict[str, Path] = {}
                    if test.name == "seq write":
                        settle_disk(args.workdir, images["src"])
                    for label in order:
                        key = (test.name, label)
                        if key in errors:
                            continue
                        fresh = None
                        # images to be looked at are closed cleanly; the others are
                        # killed and deleted with their dirty pages, which is much quicker
                        inspect = test.name == "seq write" or key not in allocated
                        try:
                            if test.fresh_size:
                                path = args.workdir / f"fresh-{label}.qcow2"
                                path.unlink(missing_ok=True)
                                run(
                                    [
                                        "qemu-img",
                                        "create",
                                        "-q",
                                        "-f",
                                        "qcow2",
                                        str(path),
                                        str(test.fresh_size),
                                    ]
                                )
                                written[label] = path
                                fresh = Server(label, write_argv[label], path, rundir, writable=True)
                                fresh.start()
                            server = fresh or servers[label, test.image]
                            value, output = measure(test, server, args, rundir, images)
                        except (
                            subprocess.CalledProcessError,
                            subprocess.TimeoutExpired,
                            RuntimeError,
                            OSError,
                        ) as e:
                            detail = getattr(e, "stderr", None) or ""
                            errors[key] = f"{e} {detail.strip()[-300:]}".strip()
                            print(f"  {test.name} / {label}: FAILED: {errors[key]}", file=sys.stderr)
                            continue
                        finally:
                            if fresh:
                                fresh.stop(kill=not inspect)
                        samples.setdefault(key, []).append(value)
                        outputs[label] = output
                        if test.image == "full":
                            fsync_file(server.image)
                        if test.name == "seq write":
                            same, clean, detail = verify_written(
                                written[label], images["src"], label != "qemu"
                            )
                            same_as_source[label].append(same)
                            if label != "qemu":
                                ours_clean.append(clean)
                            if detail:
                                print(f"  seq write / {label}, round {rnd + 1}: {detail}", file=sys.stderr)
                        elif test.fresh_size and inspect:
                            allocated[key] = data_clusters(written[label]) / args.alloc_writes
                        if test.fresh_size:
                            written.pop(label).unlink()
                        if args.verbose:
                            print(f"  round {rnd + 1} {test.name:22} {label:5} {fmt_value(test.unit, value)}")
                    reference = outputs.get("qemu")
                    for output in outputs.values():
                        if reference is not None and output is not None and output != reference:
                            if test.name not in mismatch:
                                mismatch.append(test.name)
                    for path in written.values():  # left by a failed run
                        path.unlink(missing_ok=True)
                print(f"  round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            for s in servers.values():
                s.stop()
            for path in fresh_paths:
                path.unlink(missing_ok=True)
    load_after = loadavg()

    print()
    print("Medians of the rounds; ± is half the min-max range, relative to the median.")
    print("ratio = our time / the other's, per round (the same round's runs paired), then the median;")
    print("for IOPS rows their IOPS / ours (time per request).  Below 1.00: qcow2-nbd is faster.")
    print()
    names = {"qemu": "qemu-nbd", "ours": "qcow2-nbd", "before": "before"}
    head = f"{'test':22} " + " ".join(f"{names[label]:>21}" for label in labels) + f" {'ratio':>6}"
    if args.before:
        head += f" {'/before':>7}"
    head += "  what"
    print(head)
    print("-" * len(head))

    def paired(test: Test, other: str) -> str:
        mine, theirs = samples.get((test.name, "ours")), samples.get((test.name, other))
        if (
            not mine
            or not theirs
            or len(mine) != len(theirs)
            or {(test.name, "ours"), (test.name, other)} & set(errors)
        ):
            return "-"
        ratios = [m / t if test.unit == "s" else t / m for m, t in zip(mine, theirs, strict=True) if m and t]
        return f"{statistics.median(ratios):.2f}" if ratios else "-"

    for t in tests:
        med: dict[str, float | None] = {}
        cells = {}
        for label in labels:
            vals = samples.get((t.name, label))
            if not vals or (t.name, label) in errors:
                med[label] = None
                cells[label] = "FAILED"
                continue
            m = med[label] = statistics.median(vals)
            spread = (max(vals) - min(vals)) / 2 / m * 100 if m else 0.0
            cells[label] = f"{fmt_value(t.unit, m)} ±{spread:.0f}%"
        extra = ""
        if t.name.startswith("seq") and med["qemu"] and med["ours"]:
            mib = args.seq_size / (1 << 20)
            extra = f" ({mib / med['qemu']:,.0f} vs {mib / med['ours']:,.0f} MiB/s)"
        row = (
            f"{t.name:22} " + " ".join(f"{cells[label]:>21}" for label in labels) + f" {paired(t, 'qemu'):>6}"
        )
        if args.before:
            row += f" {paired(t, 'before'):>7}"
        print(f"{row}  {t.note}{extra}")
    print()
    checked = [t.name for t in tests if t.name.startswith("map")]
    if checked:
        if mismatch:
            print(f"MAP OUTPUT DIFFERS from qemu-nbd's: {', '.join(mismatch)}")
        else:
            print(f"map outputs identical to qemu-nbd's: {', '.join(checked)}")
    bad_writes = False
    if any(t.name == "seq write" for t in tests):
        q, o = same_as_source["qemu"], [x for label in labels[1:] for x in same_as_source[label]]
        bad_writes = not (q and o and ours_clean and all(q + o + ours_clean))
        flag = "SEQ WRITE CHECK FAILED: " if bad_writes else ""
        print(
            f"{flag}seq write: image == source (qemu-img compare), so qemu-nbd's == ours: "
            f"qemu-nbd {sum(q)}/{len(q)} runs, qcow2-nbd {sum(o)}/{len(o)}; "
            f"qemu-img check clean on ours {sum(ours_clean)}/{len(ours_clean)}"
        )
    for t in tests:
        if t.fresh_size and t.name != "seq write":
            shares = ", ".join(f"{label} {allocated[t.name, label]:.1%}" for label in labels
                               if (t.name, label) in allocated)  # fmt: skip
            print(f"{t.name}: writes that allocated a new cluster (qemu-img map, round 1): {shares}")
    print(f"load average (1/5/15 min): {load_before} at start, {load_after} at end")
    if args.json:
        args.json.write_text(json.dumps({
            "rounds": args.rounds,
            "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.items()},
            "errors": {f"{k[0]}/{k[1]}": v for k, v in errors.items()},
            "map_mismatch": mismatch,
            "seq_write_same_as_source": same_as_source,
            "seq_write_ours_check_clean": ours_clean,
            "allocating_share": {f"{k[0]}/{k[1]}": v for k, v in allocated.items()},
            "load": {"start": load_before, "end": load_after},
        }, indent=2))  # fmt: skip
    return 1 if errors or mismatch or bad_writes else 0


if __name__ == "__main__":
    sys.exit(main())
