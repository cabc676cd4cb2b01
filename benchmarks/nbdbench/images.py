"""The benchmark's images, built by QEMU's own tools and kept between runs.

Each image has a spec (a small dict); an image is rebuilt only when its spec
changes.  Every qcow2 image has a raw equivalent with the same guest content,
for nbdkit's file plugin (C, no qcow2): what a plain file served over NBD costs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

CLUSTER = 64 * 1024


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def fsync_file(path: Path) -> None:
    """Write the file's dirty page cache out now, so no later run pays for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm_page_cache(path: Path) -> None:
    """Read the allocated parts of a file once so that no server pays for the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end:
                n = min(8 << 20, end - pos)
                os.pread(fd, n, pos)
                pos += n
    finally:
        os.close(fd)


def random_raw(path: Path, size: int, seed: int, zero_every: int = 0) -> None:
    """``size`` seeded random bytes in 64 MiB chunks; with ``zero_every`` = n,
    every n-th chunk is written as real zeros (not a hole: a client has to look
    to find them)."""
    rng = random.Random(seed)
    chunk = min(64 << 20, size)
    with open(path, "wb") as f:
        for i, off in enumerate(range(0, size, chunk)):
            n = min(chunk, size - off)
            f.write(bytes(n) if zero_every and i % zero_every == zero_every - 1 else rng.randbytes(n))


def qcow2_from_raw(raw: Path, path: Path, *extra: str) -> None:
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", *extra, str(raw), str(path)])


def raw_from_image(image: Path, raw: Path) -> None:
    """The guest view of a qcow2 image (or chain) as a sparse raw file."""
    run(["qemu-img", "convert", "-q", "-O", "raw", str(image), str(raw)])


def scattered_raw(path: Path, size: int, clusters: int, rng: random.Random, exclude=()) -> list[int]:
    """A sparse raw file with 4 KiB of data in ``clusters`` random 64 KiB clusters.

    Converting it is the quickest way to a qcow2 image with that many scattered
    data clusters (``qemu-img convert`` skips holes; one qemu-io write per
    cluster is about five times slower)."""
    picks = sorted(rng.sample(range(size // CLUSTER), clusters))
    payload = rng.randbytes(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for c in picks:
            os.pwrite(fd, payload, c * CLUSTER)
    finally:
        os.close(fd)
    return picks


def build_map(path: Path, raw: Path, size: int, clusters: int, seed: int) -> None:
    """A qcow2 image with ``clusters`` data clusters at random places."""
    scattered_raw(raw, size, clusters, random.Random(seed))
    qcow2_from_raw(raw, path)


def build_chain(top: Path, raw: Path, size: int, counts: list[int], seed: int) -> None:
    """A chain of len(counts) qcow2 layers, base first, each with counts[i]
    clusters written at random places (by qemu-io, into the overlay)."""
    rng = random.Random(seed)
    layers = [top.with_name(f"{top.stem}-{i}.qcow2") for i in range(len(counts) - 1)] + [top]
    base_raw = top.with_name(f"{top.stem}-base.raw")
    scattered_raw(base_raw, size, counts[0], rng)
    try:
        qcow2_from_raw(base_raw, layers[0])
    finally:
        base_raw.unlink()
    for below, layer, count in zip(layers, layers[1:], counts[1:], strict=False):
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                below.name,
                str(layer),
                str(size),
            ]
        )
        picks = sorted(rng.sample(range(size // CLUSTER), count))
        pattern = 0x11 * (layers.index(layer) % 15 + 1)
        cmds = "".join(f"write -q -P {pattern} {c * CLUSTER} {CLUSTER}\n" for c in picks)
        run(["qemu-io", "-f", "qcow2", str(layer)], input=cmds, stdout=subprocess.DEVNULL)
    raw_from_image(top, raw)


class Images:
    """Paths of the images a run needs, built on first use."""

    def __init__(self, workdir: Path, args) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        a = args
        self.specs = {
            "read": {"size": a.read_size, "seed": a.seed, "kind": "random, fully allocated"},
            "map": {"size": a.map_size, "clusters": a.map_clusters, "seed": a.seed},
            "chain": {"size": a.chain_size, "clusters": a.chain_clusters, "seed": a.seed},
            "src": {"size": a.write_size, "seed": a.seed, "kind": "random, every 8th 64 MiB zero"},
        }
        self.specs["full"] = {"from": self.specs["src"], "convert": "-S 0"}

    def qcow2(self, name: str) -> Path:
        return self.dir / f"{name}.qcow2"

    def raw(self, name: str) -> Path:
        return self.dir / f"{name}.raw"

    def ensure(self, name: str) -> None:
        spec = json.dumps(self.specs[name], sort_keys=True)
        stamp = self.dir / f"{name}.json"
        files = [self.raw(name)] + ([] if name == "src" else [self.qcow2(name)])
        if stamp.exists() and stamp.read_text() == spec and all(f.exists() for f in files):
            return
        stamp.unlink(missing_ok=True)
        s = self.specs[name]
        t = time.perf_counter()
        print(f"building {name} ({json.dumps(s)}) ...", end=" ", flush=True)
        qcow2, raw = self.qcow2(name), self.raw(name)
        if name == "read":
            random_raw(raw, s["size"], s["seed"])
            qcow2_from_raw(raw, qcow2, "-S", "0")
        elif name == "map":
            build_map(qcow2, raw, s["size"], s["clusters"], s["seed"])
        elif name == "chain":
            build_chain(qcow2, raw, s["size"], s["clusters"], s["seed"])
        elif name == "src":
            random_raw(raw, s["size"], s["seed"], zero_every=8)
        elif name == "full":
            self.ensure("src")
            qcow2_from_raw(self.raw("src"), qcow2, "-S", "0")
            shutil.copyfile(self.raw("src"), raw)
        stamp.write_text(spec)
        print(f"{time.perf_counter() - t:.1f} s", flush=True)

    def writable_copy(self, name: str, label: str, raw: bool) -> Path:
        """A per-server copy of a fully allocated image for in-place writes, kept
        while it still checks clean (rewrites keep it fully allocated)."""
        self.ensure(name)
        source = self.raw(name) if raw else self.qcow2(name)
        copy = self.dir / f"{name}-{label}{source.suffix}"
        stamp = self.dir / f"{name}-{label}.json"
        want = (self.dir / f"{name}.json").read_text()
        ok = copy.exists() and stamp.exists() and stamp.read_text() == want
        if ok and not raw and subprocess.run(["qemu-img", "check", "-q", str(copy)]).returncode:
            ok = False
        if not ok:
            stamp.unlink(missing_ok=True)
            print(f"copying {source} to {copy} ...", flush=True)
            shutil.copyfile(source, copy)
            fsync_file(copy)
            stamp.write_text(want)
        return copy
