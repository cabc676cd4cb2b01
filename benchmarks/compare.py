"""qcow2-nbd against qemu-nbd: same images, same clients, same machine, same run.

    .venv/bin/python benchmarks/compare.py            # ~1-2 minutes (3 rounds)
    .venv/bin/python benchmarks/compare.py --full     # more rounds, longer fio runs

Builds its test images with QEMU's own tools (qemu-img, qemu-io), serves
each image with both servers at once over Unix sockets

    qemu-nbd  -r -A -t --fork -e 8 -f qcow2 -k SOCKET --pid-file F IMAGE
    qcow2-nbd -r       --fork -e 8 -f qcow2 -k SOCKET --pid-file F IMAGE

and runs the same client command against each in alternation (the order
flips every round), several rounds, reporting medians:

    seq read      nbdcopy URI null:                      1 GiB, ~7/8 allocated
    randread qdN  fio --ioengine=nbd --rw=randread --bs=4k --iodepth=N
    map           nbdinfo --map URI                       1 TiB, 100k scattered clusters
    map depth     nbdinfo --map=qemu:allocation-depth URI  same image

The map outputs of the two servers are compared too: they must be equal.
``--ours 'qemu-nbd -A -t'`` puts qemu-nbd on both sides, to see how much
two identical servers differ here (the noise floor).

Images are kept in --workdir and reused while their parameters match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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


def ensure_images(workdir: Path, args) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    specs = {
        "seq": {"size": args.seq_size},
        "map": {"size": args.map_size, "clusters": args.map_clusters, "seed": args.seed},
    }
    paths = {}
    for name, spec in specs.items():
        path = workdir / f"{name}.qcow2"
        stamp = workdir / f"{name}.json"
        want = json.dumps(spec, sort_keys=True)
        if not (path.exists() and stamp.exists() and stamp.read_text() == want):
            stamp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            t = time.perf_counter()
            print(f"building {path} ({json.dumps(spec)}) ...", end=" ", flush=True)
            if name == "seq":
                build_seq_image(path, spec["size"])
            else:
                build_map_image(path, spec["size"], spec["clusters"], spec["seed"])
            stamp.write_text(want)
            print(f"{time.perf_counter() - t:.1f} s")
        paths[name] = path
    return paths


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
            *self.argv, "-r", "--fork", "-e", "8", "-f", "qcow2",
            "-k", str(self.socket), "--pid-file", str(self.pidfile), str(self.image),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=60, stdin=subprocess.DEVNULL)
        for _ in range(100):  # --fork returns once listening; the pid file may lag a little
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                break
            time.sleep(0.05)
        self.pid = int(self.pidfile.read_text())

    def stop(self) -> None:
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(self.pid, 0)
                time.sleep(0.05)
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid = 0


# --- measurements -----------------------------------------------------------


@dataclass
class Test:
    name: str
    image: str
    unit: str  # "s" (lower is better) or "IOPS" (higher is better)
    note: str


def timed(cmd: list[str], timeout: float, out=subprocess.DEVNULL) -> float:
    t = time.perf_counter()
    subprocess.run(
        cmd, check=True, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=timeout
    )
    return time.perf_counter() - t


def measure(test: Test, server: Server, args, scratch: Path) -> tuple[float, str | None]:
    """One run of ``test`` against ``server``: (value, map output or None)."""
    if test.name == "seq read":
        return timed(["nbdcopy", server.uri, "null:"], args.timeout), None
    if test.name.startswith("randread"):
        depth = int(test.name.removeprefix("randread qd"))
        out = scratch / "fio.json"
        cmd = [
            "fio", "--name=randread", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randread",
            "--bs=4k", f"--iodepth={depth}", f"--runtime={args.fio_runtime}", "--time_based",
            "--output-format=json", f"--output={out}",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=args.fio_runtime + args.timeout, stdin=subprocess.DEVNULL)  # fmt: skip
        job = json.loads(out.read_text())["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio job error {job['error']}")
        return job["read"]["iops"], None
    which = "--map" if test.name == "map" else "--map=qemu:allocation-depth"
    out = scratch / "map.txt"
    with open(out, "w") as f:
        value = timed(["nbdinfo", which, server.uri], args.timeout, out=f)
    return value, out.read_text()


def fmt_value(unit: str, v: float | None) -> str:
    if v is None:
        return "FAILED"
    return f"{v:.3f} s" if unit == "s" else f"{v:,.0f} IOPS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="5 rounds, 10 s fio runs (about 5 minutes)")
    p.add_argument("--rounds", type=int, help="rounds per test (default 3, --full 5)")
    p.add_argument("--fio-runtime", type=int, help="seconds per fio run (default 3, --full 10)")
    p.add_argument("--seq-size", type=parse_size, default=parse_size("1G"), help="sequential image size (1G)")
    p.add_argument("--map-size", type=parse_size, default=parse_size("1T"), help="map image size (1T)")
    p.add_argument("--map-clusters", type=int, default=100_000, help="allocated clusters in the map image")
    p.add_argument("--seed", type=int, default=1, help="seed for the map image's cluster places")
    p.add_argument("--only", help="comma-separated subset of: seq,qd1,qd32,map,depth")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2-nbd-bench"), help="images (kept)")
    p.add_argument("--ours", help="command for our server (default: qcow2-nbd next to this Python)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one client run fails")
    p.add_argument("--json", type=Path, help="also write all samples here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every sample")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (5 if args.full else 3)
    args.fio_runtime = args.fio_runtime or (10 if args.full else 3)

    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (run: bash scripts/setup.sh)", file=sys.stderr)
        return 1
    if args.ours:
        ours = shlex.split(args.ours)
    else:
        here = Path(sys.executable).parent / "qcow2-nbd"
        ours = [str(here)] if here.exists() else [shutil.which("qcow2-nbd") or "qcow2-nbd"]

    tests = [
        Test("seq read", "seq", "s", f"nbdcopy URI null:, {human(args.seq_size)}"),
        Test("randread qd1", "seq", "IOPS", f"fio nbd 4k, {args.fio_runtime} s"),
        Test("randread qd32", "seq", "IOPS", f"fio nbd 4k, {args.fio_runtime} s"),
        Test("map", "map", "s", f"nbdinfo --map, {human(args.map_size)}, {args.map_clusters} clusters"),
        Test("map depth", "map", "s", "nbdinfo --map=qemu:allocation-depth"),
    ]
    keys = {"seq": "seq read", "qd1": "randread qd1", "qd32": "randread qd32"}
    keys |= {"map": "map", "depth": "map depth"}
    if args.only:
        wanted = {keys[k.strip()] for k in args.only.split(",")}
        tests = [t for t in tests if t.name in wanted]

    print("qcow2-nbd vs qemu-nbd")
    print(f"  qemu-nbd:  {first_line(['qemu-nbd', '--version'])}")
    print(f"  ours:      {shlex.join(ours)}")
    print(f"  clients:   {first_line(['nbdcopy', '--version'])}, {first_line(['fio', '--version'])}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"  machine:   {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}")
    print(f"  Python:    {platform.python_version()} ({sys.executable})")
    print(f"  rounds:    {args.rounds}, order alternating; medians; page cache warm; Unix sockets")

    images = ensure_images(args.workdir, args)
    for name in {t.image for t in tests}:
        warm_page_cache(images[name])

    samples: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    mismatch: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qcow2-nbd-bench-") as tmp:
        rundir = Path(tmp)
        servers: dict[tuple[str, str], Server] = {}
        try:
            for image in sorted({t.image for t in tests}):
                for label, argv_ in (("qemu", ["qemu-nbd", "-A", "-t"]), ("ours", ours)):
                    s = Server(label, argv_, images[image], rundir)
                    servers[label, image] = s
                    s.start()
            t0 = time.perf_counter()
            for rnd in range(args.rounds):
                order = ("qemu", "ours") if rnd % 2 == 0 else ("ours", "qemu")
                for test in tests:
                    outputs = {}
                    for label in order:
                        key = (test.name, label)
                        if key in errors:
                            continue
                        try:
                            value, output = measure(test, servers[label, test.image], args, rundir)
                        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as e:
                            detail = getattr(e, "stderr", None) or ""
                            errors[key] = f"{e} {detail.strip()[-300:]}".strip()
                            print(f"  {test.name} / {label}: FAILED: {errors[key]}", file=sys.stderr)
                            continue
                        samples.setdefault(key, []).append(value)
                        outputs[label] = output
                        if args.verbose:
                            print(f"  round {rnd + 1} {test.name:14} {label:5} {fmt_value(test.unit, value)}")
                    if outputs.get("qemu") is not None and outputs.get("ours") is not None:
                        if outputs["qemu"] != outputs["ours"] and test.name not in mismatch:
                            mismatch.append(test.name)
                print(f"  round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            for s in servers.values():
                s.stop()

    print()
    print("Medians of the rounds; ± is half the min-max range, relative to the median.")
    print("ratio = our time / qemu-nbd time; for IOPS rows qemu IOPS / our IOPS (time per request).")
    print("Below 1.00: qcow2-nbd is faster.")
    print()
    head = f"{'test':15} {'qemu-nbd':>21} {'qcow2-nbd':>21} {'ratio':>6}  what"
    print(head)
    print("-" * len(head))
    for t in tests:
        med: dict[str, float | None] = {}
        cells = {}
        for label in ("qemu", "ours"):
            vals = samples.get((t.name, label))
            if not vals or (t.name, label) in errors:
                med[label] = None
                cells[label] = "FAILED"
                continue
            m = med[label] = statistics.median(vals)
            spread = (max(vals) - min(vals)) / 2 / m * 100 if m else 0.0
            cells[label] = f"{fmt_value(t.unit, m)} ±{spread:.0f}%"
        ratio = "-"
        if med["qemu"] and med["ours"]:
            r = med["ours"] / med["qemu"] if t.unit == "s" else med["qemu"] / med["ours"]
            ratio = f"{r:.2f}"
        extra = ""
        if t.name == "seq read" and med["qemu"] and med["ours"]:
            mib = args.seq_size / (1 << 20)
            extra = f" ({mib / med['qemu']:,.0f} vs {mib / med['ours']:,.0f} MiB/s)"
        print(f"{t.name:15} {cells['qemu']:>21} {cells['ours']:>21} {ratio:>6}  {t.note}{extra}")
    print()
    checked = [t.name for t in tests if t.name.startswith("map")]
    if checked:
        if mismatch:
            print(f"MAP OUTPUT DIFFERS from qemu-nbd's: {', '.join(mismatch)}")
        else:
            print(f"map outputs identical to qemu-nbd's: {', '.join(checked)}")
    if args.json:
        args.json.write_text(json.dumps({
            "rounds": args.rounds,
            "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.items()},
            "errors": {f"{k[0]}/{k[1]}": v for k, v in errors.items()},
            "map_mismatch": mismatch,
        }, indent=2))  # fmt: skip
    return 1 if errors or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
