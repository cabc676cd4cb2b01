"""Random backing chains built by qemu, compared end to end against qemu.

Every choice comes from ``random.Random(seed)``: number of layers, per layer
the format (raw only at the bottom), qcow2 version, cluster size, extended L2,
compression type, refcount width, external data file, preallocation, virtual
size (layers may be shorter or longer than the one above), and a sequence of
qemu-io operations with aligned and unaligned offsets and lengths.

Seeds: ``SEEDS`` below, plus any listed in ``QCOW2_NBD_SEEDS`` (comma or space
separated; ``a-b`` ranges allowed), e.g. ``QCOW2_NBD_SEEDS=1000-1199 pytest -k random``.
A failure prints the seed and the qemu-img/qemu-io commands that rebuild the chain.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest
from images import Image, KiB, MiB, Recipe
from servers import assert_same, compare_image

SEEDS = list(range(40))


def _env_seeds() -> list[int]:
    out: list[int] = []
    for tok in os.environ.get("QCOW2_NBD_SEEDS", "").replace(",", " ").split():
        if "-" in tok.lstrip("-"):
            a, b = tok.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(tok))
    return out


ALL_SEEDS = list(dict.fromkeys(SEEDS + _env_seeds()))


@dataclass
class Layer:
    name: str
    fmt: str  # "raw" or "qcow2"
    size: int
    cs: int = 64 * KiB
    compat: str = "1.1"
    extended_l2: bool = False
    compression: str = "zlib"
    refcount_bits: int = 16
    data_file: str | None = None
    preallocation: str = "off"
    ops: list[str] = field(default_factory=list)

    @property
    def granule(self) -> int:
        """Smallest unit the layer allocates (subcluster with extended L2)."""
        return self.cs // 32 if self.extended_l2 else self.cs

    def describe(self) -> str:
        if self.fmt == "raw":
            return f"{self.name}: raw, {self.size} bytes"
        return (
            f"{self.name}: qcow2 compat={self.compat} cs={self.cs} ext_l2={self.extended_l2} "
            f"compression={self.compression} refcount_bits={self.refcount_bits} "
            f"data_file={self.data_file} prealloc={self.preallocation} size={self.size}"
        )


def _size(rng: random.Random, cs: int, raw: bool) -> int:
    """A virtual size: sometimes a cluster multiple, often not."""
    n_clusters = rng.randint(3, 24)
    if cs >= 2 * MiB:
        n_clusters = rng.randint(2, 3)
    base = n_clusters * cs
    kind = rng.random()
    if kind < 0.3:
        return base
    if raw and kind < 0.6:
        return base + rng.randint(1, cs - 1)  # raw files may end anywhere (e.g. 100000)
    return base + rng.randint(1, max(1, cs // 512 - 1)) * 512 if cs > 512 else base + 512


def _offset_len(rng: random.Random, size: int, layer: Layer) -> tuple[int, int]:
    g = rng.choice([layer.cs, layer.granule, 512, 1, 1])
    off = rng.randrange(0, max(1, size // g)) * g
    if off >= size:
        off = 0
    max_len = min(size - off, 4 * layer.cs)
    if g == 1:
        length = rng.randint(1, max(1, max_len))
    else:
        length = rng.randint(1, max(1, max_len // g)) * g
    return off, max(1, min(length, size - off))


def _ops(rng: random.Random, layer: Layer) -> list[str]:
    size = layer.size
    if layer.fmt == "raw":
        size = size // 512 * 512  # keep raw writes inside the (possibly unaligned) file
    n = rng.randint(0, 10)
    clusters = (size + layer.cs - 1) // layer.cs
    pristine = set(range(clusters))
    can_compress = layer.fmt == "qcow2" and layer.data_file is None and layer.preallocation == "off"
    ops = []
    for _ in range(n):
        kinds = ["write", "write", "write", "zero", "zero_unmap", "discard"]
        if can_compress and pristine:
            kinds += ["compress", "compress"]
        kind = rng.choice(kinds)
        if kind == "compress":
            first = rng.choice(sorted(pristine))
            count = 1
            while count < 3 and first + count in pristine and rng.random() < 0.4:
                count += 1
            off = first * layer.cs
            length = min(count * layer.cs, size - off)
            if length % 512:
                continue  # qemu-io wants sector multiples for -c
            pattern = "" if rng.random() < 0.2 else f" -P 0x{rng.randint(1, 255):02x}"
            ops.append(f"write -c{pattern} {off} {length}")
        else:
            off, length = _offset_len(rng, size, layer)
            if kind == "write":
                ops.append(f"write -P 0x{rng.randint(1, 255):02x} {off} {length}")
            elif kind == "zero":
                ops.append(f"write -z {off} {length}")
            elif kind == "zero_unmap":
                ops.append(f"write -z -u {off} {length}")
            else:
                ops.append(f"discard {off} {length}")
        first_c, last_c = off // layer.cs, (off + length - 1) // layer.cs
        pristine.difference_update(range(first_c, last_c + 1))
    return ops


def plan_chain(seed: int) -> list[Layer]:
    """Bottom layer first."""
    rng = random.Random(seed)
    n_layers = rng.randint(1, 4)
    layers: list[Layer] = []
    for i in range(n_layers):
        if i == 0 and n_layers > 1 and rng.random() < 0.3:
            cs = rng.choice([4 * KiB, 64 * KiB])
            layer = Layer(f"l{i}.raw", "raw", _size(rng, cs, raw=True), cs=cs)
        else:
            cs = rng.choice([512, 4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 64 * KiB, 2 * MiB])
            if cs == 2 * MiB and rng.random() < 0.5:
                cs = 64 * KiB
            layer = Layer(f"l{i}.qcow2", "qcow2", _size(rng, cs, raw=False), cs=cs)
            if rng.random() < 0.2:
                layer.compat = "0.10"
            else:
                layer.extended_l2 = cs >= 16 * KiB and rng.random() < 0.4
                layer.compression = "zstd" if rng.random() < 0.35 else "zlib"
                layer.refcount_bits = rng.choice([1, 2, 4, 8, 16, 16, 32, 64])
                if rng.random() < 0.12:
                    layer.data_file = f"l{i}.data"
                has_backing = i > 0
                if (not has_backing or layer.extended_l2) and rng.random() < 0.15:
                    layer.preallocation = "metadata"
        layer.ops = _ops(rng, layer)
        layers.append(layer)
    return layers


def build_chain(rc: Recipe, layers: list[Layer]) -> Image:
    prev: Layer | None = None
    for layer in layers:
        rc.note(layer.describe())
        if layer.fmt == "raw":
            rc.run("truncate", "-s", str(layer.size), layer.name)
        else:
            opts: dict[str, object] = {"cluster_size": layer.cs, "compat": layer.compat}
            if layer.compat != "0.10":
                opts.update(
                    extended_l2=layer.extended_l2,
                    compression_type=layer.compression,
                    refcount_bits=layer.refcount_bits,
                )
                if layer.data_file:
                    opts["data_file"] = layer.data_file
                if layer.preallocation != "off":
                    opts["preallocation"] = layer.preallocation
            rc.create(
                layer.name,
                layer.size,
                backing=prev.name if prev else None,
                backing_fmt=prev.fmt if prev else None,
                **opts,
            )
        rc.io(layer.name, *layer.ops, fmt=layer.fmt)
        prev = layer
    assert prev is not None
    return rc.image(prev.name, fmt=prev.fmt)


@pytest.mark.parametrize("seed", ALL_SEEDS)
def test_random_chain(seed, recipe, tmp_path):
    layers = plan_chain(seed)
    image = build_chain(recipe, layers)
    cmp = compare_image(image, tmp_path / "cmp", map_=True, nbd=True)
    cmp.context.append(
        f"random chain seed={seed} (rerun: QCOW2_NBD_SEEDS={seed} "
        f"pytest 'tests/test_random_chains.py::test_random_chain[{seed}]')"
    )
    cmp.context += ["layers (bottom first):"] + ["  " + layer.describe() for layer in layers]
    assert_same(cmp, f"random chain, seed {seed}")


def test_random_plans_cover_the_options():
    """The default seeds must exercise every knob at least once (guards the generator)."""
    layers = [layer for s in SEEDS for layer in plan_chain(s)]
    seen = {
        "raw base": any(x.fmt == "raw" for x in layers),
        "v2": any(x.compat == "0.10" for x in layers),
        "extended L2": any(x.extended_l2 for x in layers),
        "zstd": any(x.compression == "zstd" for x in layers),
        "data file": any(x.data_file for x in layers),
        "prealloc metadata": any(x.preallocation == "metadata" for x in layers),
        "2M clusters": any(x.cs == 2 * MiB for x in layers),
        "512 clusters": any(x.cs == 512 for x in layers),
        "refcount 1": any(x.refcount_bits == 1 and x.fmt == "qcow2" for x in layers),
        "refcount 64": any(x.refcount_bits == 64 for x in layers),
        "write -c": any(op.startswith("write -c") for x in layers for op in x.ops),
        "write -z -u": any(op.startswith("write -z -u") for x in layers for op in x.ops),
        "discard": any(op.startswith("discard") for x in layers for op in x.ops),
        "4 layers": any(len(plan_chain(s)) == 4 for s in SEEDS),
        "unaligned raw size": any(x.fmt == "raw" and x.size % 512 for x in layers),
    }
    missing = [k for k, v in seen.items() if not v]
    assert not missing, f"default seeds never exercise: {missing}"
