"""qcow2-nbd against qemu-nbd (default and tuned) and nbdkit: same images, same clients, same run.

    .venv/bin/python benchmarks/compare.py            # 4 rounds, 2 s fio runs (~15 minutes)
    .venv/bin/python benchmarks/compare.py --full     # 5 rounds, 10 s fio runs
    .venv/bin/python benchmarks/compare.py --only map,chain,chaindepth
    .venv/bin/python benchmarks/compare.py --before 'env PYTHONPATH=/tmp/old .venv/bin/python -P -m nbdserver'

Images are built with QEMU's tools (qemu-img, qemu-io) and kept in --workdir:

    read   2 GiB of random data, every cluster allocated (and its raw equivalent)
    map    1 TiB, 100k scattered 64 KiB data clusters
    chain  3 qcow2 layers of 10 GiB, 20k / 15k / 10k scattered clusters (base first)
    src    1 GiB of random data with zero runs, the source of the sequential write
    full   src converted with every cluster allocated, for in-place writes

The servers (see nbdbench/servers.py) are qemu-nbd as people run it (-t -A),
qemu-nbd tuned (io_uring, 128 MiB L2 cache per layer), nbdkit's file plugin on
the raw equivalent, ours, and with ``--before`` ours at an earlier commit.  All
serve over Unix sockets with -e 64 (room for the 32-client load).  Every round
starts fresh servers, in an order that rotates from round to round, and runs
each figure against each server in that order; the servers of one round are
paired: ratios are computed per round, then the median is printed.

Every write figure includes the final flush (nbdcopy --flush, fio
--end_fsync=1); new images for writes go to --fresh-dir (tmpfs by default, so
the disk's own noise stays out).  Checks on the way: map outputs of the qcow2
servers must equal qemu-nbd's; after each sequential write the image must equal
the source (qemu-img compare) and ours must pass qemu-img check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbdbench.images import Images, fsync_file, run, warm_page_cache  # noqa: E402
from nbdbench.loads import Figure, Sample, figures, measure  # noqa: E402
from nbdbench.servers import Server  # noqa: E402

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdkit", "nbdcopy", "nbdinfo", "fio")
ALLOC_SIZE = 64 << 30  # the new images the allocating random writes go to
NAMES = {"qemu": "qemu-nbd", "tuned": "qemu tuned", "nbdkit": "nbdkit file", "ours": "qcow2-nbd",
         "before": "before"}  # fmt: skip


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    return int(float(t[: len(t) - len(unit)]) * units[unit])


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="5 rounds, 10 s fio runs, 32768 allocating writes")
    p.add_argument("--rounds", type=int, help="rounds (default 4, --full 5)")
    p.add_argument("--fio-runtime", type=int, help="seconds per timed fio run (default 2, --full 10)")
    p.add_argument(
        "--alloc-writes", type=int, help="writes per allocating fio run (default 16384, --full 32768)"
    )
    p.add_argument("--read-size", type=parse_size, default=parse_size("2G"), help="read image (2G)")
    p.add_argument("--write-size", type=parse_size, default=parse_size("1G"), help="sequential write (1G)")
    p.add_argument("--map-size", type=parse_size, default=parse_size("1T"), help="map image (1T)")
    p.add_argument("--map-clusters", type=int, default=100_000, help="data clusters in the map image")
    p.add_argument("--chain-size", type=parse_size, default=parse_size("10G"), help="each chain layer (10G)")
    p.add_argument("--chain-clusters", default="20000,15000,10000", help="clusters per layer, base first")
    p.add_argument("--seed", type=int, default=1, help="seed of every image's data and layout")
    p.add_argument(
        "--only", help="comma-separated figure keys (see --list) or groups: read, map, chain, write"
    )
    p.add_argument("--list", action="store_true", help="list the figures and their keys")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/qcow2-nbd-bench"), help="images (kept)")
    p.add_argument("--fresh-dir", type=Path, help="new images for writes (default /dev/shm, else workdir)")
    p.add_argument("--ours", help="command for our server (default: qcow2-nbd next to this Python)")
    p.add_argument("--before", help="also run this server (ours at an earlier commit) in every round")
    p.add_argument("--skip", default="", help="comma-separated servers to leave out: tuned, nbdkit")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one client run fails")
    p.add_argument("--json", type=Path, help="also write all samples here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every sample")
    a = p.parse_args(argv)
    a.workdir = a.workdir.resolve()
    a.rounds = a.rounds or (5 if a.full else 4)
    a.fio_runtime = a.fio_runtime or (10 if a.full else 2)
    a.alloc_writes = a.alloc_writes or (32768 if a.full else 16384)
    a.chain_clusters = [int(x) for x in a.chain_clusters.split(",")]
    if a.fresh_dir is None:
        shm = Path("/dev/shm")
        a.fresh_dir = shm if shm.is_dir() and shutil.disk_usage(shm).free > 4 * a.write_size else a.workdir
    a.parser = p
    return a


def select(a, figs: list[Figure]) -> list[Figure]:
    if not a.only:
        return figs
    wanted = {k.strip() for k in a.only.split(",")}
    known = {f.key for f in figs if not f.derived} | {f.group for f in figs}
    if wanted - known:
        a.parser.error(f"--only: unknown {', '.join(sorted(wanted - known))} (see --list)")
    chosen = [f for f in figs if not f.derived and (f.key in wanted or f.group in wanted)]
    groups = {f.group for f in chosen}
    return [f for f in figs if f in chosen or (f.derived and f.group in groups)]


class Run:
    """All rounds of one benchmark run, and what they collected."""

    def __init__(
        self, a, labels: tuple[str, ...], commands: dict[str, list[str]], figs: list[Figure]
    ) -> None:
        self.a, self.labels, self.commands, self.figs = a, labels, commands, figs
        self.images = Images(a.workdir, a)
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.mismatch: set[str] = set()
        self.written_ok: dict[str, list[bool]] = {label: [] for label in labels}
        self.check_clean: list[bool] = []
        self.allocated: dict[tuple[str, str], float] = {}

    def record(self, fig: str, label: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault((fig, label), []).append(value)

    def fail(self, fig: str, label: str, e: BaseException) -> None:
        detail = (getattr(e, "stderr", None) or "").strip()[-300:]
        self.errors[fig, label] = f"{e} {detail}".strip()
        print(f"  {fig} / {label}: FAILED: {self.errors[fig, label]}", file=sys.stderr)

    def image_for(self, group: str, label: str) -> Path:
        return self.images.raw(group) if label == "nbdkit" else self.images.qcow2(group)

    def prepare(self) -> None:
        groups = {f.group for f in self.figs}
        for name in [g for g in ("read", "map", "chain") if g in groups] + (
            ["src", "full"] if "write" in groups else []
        ):
            self.images.ensure(name)
        for name in groups - {"write"}:
            for path in [self.images.qcow2(name), self.images.raw(name)] + sorted(
                self.images.dir.glob(f"{name}-[0-9].qcow2")
            ):
                warm_page_cache(path)
        if "write" in groups:
            warm_page_cache(self.images.raw("src"))
            if any(f.name.startswith("randwrite inplace") for f in self.figs):
                for label in self.labels:
                    self.images.writable_copy("full", label, label == "nbdkit")

    def round(self, rnd: int, rundir: Path) -> None:
        order = self.labels[rnd % len(self.labels) :] + self.labels[: rnd % len(self.labels)]
        for group in ("read", "map", "chain"):
            figs = [f for f in self.figs if f.group == group]
            if figs:
                self.served_group(group, figs, order, rundir)
        for fig in (f for f in self.figs if f.group == "write" and not f.derived):
            for label in order:
                if label in fig.servers and (fig.name, label) not in self.errors:
                    self.write_run(fig, label, rundir)

    def served_group(self, group: str, figs: list[Figure], order: tuple[str, ...], rundir: Path) -> None:
        """Fresh servers on one image for this round; every figure of the group against each."""
        names = {f.name for f in figs}
        servers: dict[str, Server] = {}
        try:
            for label in order:
                s = Server(label, self.image_for(group, label), rundir, self.commands.get(label, []),
                           layers=len(self.a.chain_clusters) if group == "chain" else 1)  # fmt: skip
                try:
                    s.start()
                except (subprocess.SubprocessError, RuntimeError, OSError) as e:
                    for f in figs:
                        self.fail(f.name, label, e)
                    continue
                servers[label] = s
                if group == "read":
                    self.record("start to listening", label, s.started_in * 1000)
                    self.record("RSS idle", label, s.memory()["VmRSS"] / (1 << 20))
            for fig in figs:
                if fig.derived:
                    continue
                outputs: dict[str, str] = {}
                for label in order:
                    if label not in fig.servers or label not in servers or (fig.name, label) in self.errors:
                        continue
                    try:
                        sample = measure(fig, servers[label], self.a, rundir, self.images.raw("src"))
                    except (subprocess.SubprocessError, RuntimeError, OSError) as e:
                        self.fail(fig.name, label, e)
                        continue
                    self.took(fig, label, sample)
                    if sample.output is not None and label != "nbdkit":
                        outputs[label] = sample.output
                    if fig.name == "randread qd1" and "CPU per read qd1" in names:
                        self.record("CPU per read qd1", label, sample.cpu_per_op and sample.cpu_per_op * 1e6)
                reference = outputs.get("qemu")
                if reference is not None and any(o != reference for o in outputs.values()):
                    self.mismatch.add(fig.name)
            if "peak RSS after maps" in names:
                for label, s in servers.items():
                    self.record("peak RSS after maps", label, s.memory()["VmHWM"] / (1 << 20))
        finally:
            for s in servers.values():
                s.stop(kill=True)

    def took(self, fig: Figure, label: str, sample: Sample) -> None:
        self.record(fig.name, label, sample.value)
        if self.a.verbose:
            print(f"    {fig.name:24} {label:7} {sample.value:,.3f} {fig.unit}", flush=True)

    def write_run(self, fig: Figure, label: str, rundir: Path) -> None:
        """One write run: a new image (or the server's own fully allocated copy)."""
        a, raw = self.a, label == "nbdkit"
        fresh: Path | None = None
        if fig.name.startswith("randwrite inplace"):
            image = self.images.writable_copy("full", label, raw)
        else:
            size = a.write_size if fig.name == "seq write" else ALLOC_SIZE
            fresh = image = a.fresh_dir / f"fresh-{label}{'.raw' if raw else '.qcow2'}"
            image.unlink(missing_ok=True)
            if raw:
                with open(image, "wb") as f:
                    f.truncate(size)
            else:
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)])
        s = Server(label, image, rundir, self.commands.get(label, []), writable=True)
        inspect = fig.name == "seq write" or (fig.name, label) not in self.allocated
        try:
            s.start()
            sample = measure(fig, s, a, rundir, self.images.raw("src"))
        except (subprocess.SubprocessError, RuntimeError, OSError) as e:
            self.fail(fig.name, label, e)
            s.stop(kill=True)
            if fresh:
                fresh.unlink(missing_ok=True)
            return
        # an image looked at afterwards is closed cleanly; a thrown-away one is killed
        s.stop(kill=not inspect and fresh is not None)
        self.took(fig, label, sample)
        if fig.name == "randwrite alloc qd1":
            self.record("CPU per alloc write qd1", label, sample.cpu_per_op and sample.cpu_per_op * 1e6)
        if fig.name == "seq write":
            self.verify_seq_write(label, image, raw)
        elif fresh and inspect and not raw:
            self.allocated[fig.name, label] = data_clusters(image) / a.alloc_writes
        if fresh:
            fresh.unlink(missing_ok=True)
        else:
            fsync_file(image)  # the next run does not pay for this one's writeback

    def verify_seq_write(self, label: str, image: Path, raw: bool) -> None:
        src = self.images.raw("src")
        cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw" if raw else "qcow2",
                              str(src), str(image)], capture_output=True, text=True)  # fmt: skip
        self.written_ok[label].append(cmp.returncode == 0)
        if cmp.returncode:
            print(
                f"  seq write / {label}: image differs from the source: {cmp.stdout}{cmp.stderr}",
                file=sys.stderr,
            )
        if label in ("ours", "before"):
            chk = subprocess.run(
                ["qemu-img", "check", "-q", "-f", "qcow2", str(image)], capture_output=True, text=True
            )
            self.check_clean.append(chk.returncode == 0)
            if chk.returncode:
                print(f"  seq write / {label}: qemu-img check: {chk.stdout}{chk.stderr}", file=sys.stderr)


def data_clusters(image: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return sum(e["length"] for e in json.loads(out) if e["data"]) // (64 * 1024)


def fmt(unit: str, v: float) -> str:
    if unit == "IOPS":
        return f"{v:,.0f}"
    if unit in ("ms", "us", "MiB"):
        return f"{v:,.1f}"
    return f"{v:.3f}"


def report(r: Run, a) -> bool:
    labels = r.labels
    others = [label for label in labels if label != "ours"]
    print()
    print("Medians of the rounds (± half the min-max range, relative to the median).")
    print("x<server> = how many times better ours is than that server: its time / ours, ours / its IOPS,")
    print("per round (one round's runs are paired), then the median.  Above 1.00: qcow2-nbd wins.")
    print()
    head = f"{'figure':25}{'unit':>5}" + "".join(f"{NAMES[label]:>17}" for label in labels)
    head += "".join(f"{'x' + label:>9}" for label in others) + "  what"
    print(head)
    print("-" * len(head))
    for fig in r.figs:
        if fig.derived and not any(k[0] == fig.name for k in r.samples):
            continue  # its source figure did not run
        cells, ratios = [], []
        for label in labels:
            vals = r.samples.get((fig.name, label))
            if label not in fig.servers:
                cells.append("-")
            elif (fig.name, label) in r.errors or not vals:
                cells.append("FAILED")
            else:
                m = statistics.median(vals)
                spread = (max(vals) - min(vals)) / 2 / m * 100 if m else 0.0
                cells.append(f"{fmt(fig.unit, m)} ±{spread:.0f}%")
        mine = r.samples.get((fig.name, "ours"), [])
        for label in others:
            theirs = r.samples.get((fig.name, label), [])
            bad = {(fig.name, "ours"), (fig.name, label)} & set(r.errors)
            if label not in fig.servers or bad or not mine or len(mine) != len(theirs):
                ratios.append("-")
                continue
            per = [fig.wins(m, t) for m, t in zip(mine, theirs, strict=True) if m and t]
            ratios.append(f"{statistics.median(per):.2f}" if per else "-")
        note = fig.note
        if fig.name.startswith("seq") and mine:
            size = a.write_size if fig.name == "seq write" else a.read_size
            note += f" (ours {size / (1 << 20) / statistics.median(mine):,.0f} MiB/s)"
        print(f"{fig.name:25}{fig.unit:>5}" + "".join(f"{c:>17}" for c in cells)
              + "".join(f"{x:>9}" for x in ratios) + f"  {note}")  # fmt: skip
    print()
    maps = [f.name for f in r.figs if "map" in f.name and not f.derived]
    ok = not r.errors
    if maps:
        if r.mismatch:
            ok = False
            print(f"MAP OUTPUT DIFFERS from qemu-nbd's: {', '.join(sorted(r.mismatch))}")
        else:
            print(f"map outputs of every qcow2 server identical to qemu-nbd's: {', '.join(maps)}")
    if any(f.name == "seq write" for f in r.figs):
        runs = ", ".join(f"{label} {sum(v)}/{len(v)}" for label, v in r.written_ok.items() if v)
        good = all(all(v) for v in r.written_ok.values()) and all(r.check_clean)
        ok = ok and good
        flag = "" if good else "SEQ WRITE CHECK FAILED: "
        print(f"{flag}seq write: image == source (qemu-img compare): {runs}; "
              f"qemu-img check clean on ours {sum(r.check_clean)}/{len(r.check_clean)}")  # fmt: skip
    for fig in r.figs:
        shares = [
            f"{label} {r.allocated[fig.name, label]:.1%}"
            for label in labels
            if (fig.name, label) in r.allocated
        ]
        if shares:
            print(
                f"{fig.name}: writes that allocated a new cluster (qemu-img map, round 1):",
                ", ".join(shares),
            )
    return ok


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    figs = select(a, figures(a))
    if a.list:
        for f in figures(a):
            print(
                f"{f.key:12} {f.group:6} {f.name:25} {'(read off the servers) ' if f.derived else ''}{f.note}"
            )
        return 0
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    missing = [t for t in TOOLS if not shutil.which(t) and not (t == "nbdkit" and "nbdkit" in skip)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (run: bash scripts/setup.sh)", file=sys.stderr)
        return 1
    if a.ours:
        ours = shlex.split(a.ours)
    else:
        here = Path(sys.executable).parent / "qcow2-nbd"
        ours = [str(here)] if here.exists() else [shutil.which("qcow2-nbd") or "qcow2-nbd"]
    commands = {"ours": ours}
    labels = tuple(label for label in ("qemu", "tuned", "nbdkit", "ours") if label not in skip)
    if a.before:
        labels += ("before",)
        commands["before"] = shlex.split(a.before)

    print("qcow2-nbd vs qemu-nbd, qemu-nbd tuned, nbdkit")
    print(f"  qemu-nbd:  {first_line(['qemu-nbd', '--version'])}")
    print(f"  nbdkit:    {first_line(['nbdkit', '--version'])}")
    print(f"  ours:      {shlex.join(ours)}")
    if a.before:
        print(f"  before:    {a.before}")
    print(f"  clients:   {first_line(['nbdcopy', '--version'])}, {first_line(['fio', '--version'])}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(
        f"  machine:   {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()},",
        f"Python {platform.python_version()}",
    )
    print(
        f"  rounds:    {a.rounds}, server order rotating; page cache warm; Unix sockets;",
        f"new images in {a.fresh_dir}",
    )
    load_before = loadavg()
    print(f"  load avg:  {load_before} (1/5/15 min) at start; other jobs on this machine skew the figures")

    r = Run(a, labels, commands, figs)
    r.prepare()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qcow2-nbd-bench-") as tmp:
        for rnd in range(a.rounds):
            r.round(rnd, Path(tmp))
            print(f"  round {rnd + 1}/{a.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    ok = report(r, a)
    print(f"load average (1/5/15 min): {load_before} at start, {loadavg()} at end")
    if a.json:
        a.json.write_text(json.dumps({
            "rounds": a.rounds,
            "samples": {f"{k[0]}/{k[1]}": v for k, v in r.samples.items()},
            "errors": {f"{k[0]}/{k[1]}": v for k, v in r.errors.items()},
            "map_mismatch": sorted(r.mismatch),
            "seq_write_same_as_source": r.written_ok,
            "allocating_share": {f"{k[0]}/{k[1]}": v for k, v in r.allocated.items()},
        }, indent=2))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
