"""``qcow2 info``: what an image is, with qemu-img info's field names where they exist.

The persistent bitmaps are listed as qemu-img info lists them (name,
granularity, flags ``in-use`` and ``auto`` as the directory has them), in
JSON and, nested values in qemu-img's indented layout, in the text.
"""

from __future__ import annotations

from ..format.bitmaps import BME_FLAG_AUTO, BME_FLAG_IN_USE
from ..image import Qcow2Image
from ..remote import NbdLayer

_BITMAP_FLAGS = ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto"))  # QEMU's order


def bitmaps_info(layer) -> list[dict]:
    """qemu-img info's ``bitmaps`` list (empty when the image has none)."""
    return [
        {
            "flags": [name for flag, name in _BITMAP_FLAGS if b.entry.flags & flag],
            "name": b.name,
            "granularity": 1 << b.entry.granularity_bits,
        }
        for b in layer.meta.bitmaps.bitmaps
    ]


def layer_info(layer) -> dict:
    if isinstance(layer, NbdLayer):  # no allocated size ("disk size: unavailable"), no dirty flag
        return {"filename": layer.filename, "format": "raw", "virtual-size": layer.size}
    if not isinstance(layer, Qcow2Image):
        return {
            "filename": layer.filename,
            "format": "raw",
            "virtual-size": layer.size,
            "actual-size": layer.allocated_bytes(),
            "dirty-flag": False,
        }
    h = layer.header
    info: dict = {"filename": layer.filename, "format": "qcow2", "virtual-size": layer.size}
    if not isinstance(layer.file, NbdLayer):
        info["actual-size"] = layer.file.allocated_bytes()
    info |= {"cluster-size": layer.cluster_size, "dirty-flag": h.dirty}
    specific: dict = {
        "compat": "1.1" if h.version == 3 else "0.10",
        "version": h.version,
        "compression-type": "zstd" if h.compression_type else "zlib",
        "lazy-refcounts": h.lazy_refcounts,
    }
    bitmaps = bitmaps_info(layer)
    if bitmaps:
        specific["bitmaps"] = bitmaps
    specific |= {
        "refcount-bits": 1 << h.refcount_order,
        "corrupt": h.corrupt,
        "extended-l2": h.extended_l2,
        "snapshots": h.nb_snapshots,
        "incompatible-features": h.incompatible_features,
        "compatible-features": h.compatible_features,
        "autoclear-features": h.autoclear_features,
        "features": [
            h.feature_name(kind, bit)
            for kind, mask in enumerate(
                (h.incompatible_features, h.compatible_features, h.autoclear_features)
            )
            for bit in range(64)
            if mask >> bit & 1
        ],
    }
    if h.data_file is not None:
        specific["data-file"] = h.data_file
        specific["data-file-raw"] = h.data_file_raw
    info["format-specific"] = {"type": "qcow2", "data": specific}
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        # QEMU resolves a relative host path; a protocol name (an NBD URL) stays as written
        below = layer.backing
        file = below.file if isinstance(below, Qcow2Image) else below
        remote = below is None or isinstance(file, NbdLayer)
        info["full-backing-filename"] = h.backing_file if remote else below.filename
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    return info


def image_info(top) -> list[dict]:
    """One description per image of the chain, top first."""
    chain = []
    layer = top
    while layer is not None:
        chain.append(layer_info(layer))
        layer = layer.backing
    chain[0]["backing-chain"] = [info["filename"] for info in chain[1:]]
    return chain


def format_info(chain: list[dict]) -> str:
    out = []
    for info in chain:
        lines = [
            f"image: {info['filename']}",
            f"file format: {info['format']}",
            f"virtual size: {info['virtual-size']} bytes",
            f"disk size: {info['actual-size']} bytes" if "actual-size" in info else "disk size: unavailable",
        ]
        if "cluster-size" in info:
            lines.append(f"cluster_size: {info['cluster-size']}")
        if "backing-filename" in info:
            lines.append(
                f"backing file: {info['backing-filename']} (actual path: {info['full-backing-filename']})"
            )
            if "backing-filename-format" in info:
                lines.append(f"backing file format: {info['backing-filename-format']}")
        spec = info.get("format-specific", {}).get("data")
        if spec:
            lines.append("Format specific information:")
            for k, v in spec.items():
                lines += _dump(k, v, 1)
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _dump(key: str, value, depth: int) -> list[str]:
    """One value as qemu-img prints it: lists and objects nested, four spaces a level,
    list items as ``[i]:``."""
    pad = "    " * depth
    if isinstance(value, list):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        return [f"{pad}{key}: {_v(value)}"]
    return [f"{pad}{key}:"] + [line for k, v in items for line in _dump(k, v, depth + 1)]


def _v(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
