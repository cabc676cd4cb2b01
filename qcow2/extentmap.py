"""Block status of a chain as arrays: whole L2 tables at a time, layers merged by array operations.

:func:`qcow2.status.status_above` answers one extent at a time, as QEMU's
block layer does; asking it for a whole disk costs a Python call per extent
on every layer.  Here the same answer is computed per *window* of the disk:
each layer describes the window as runs (``bounds``, ``codes``), a qcow2
layer by classifying every L2 entry of the window in one vectorised pass,
then the layers are merged top-down: where a layer leaves a run undecided
(not ALLOCATED) the layer below decides it.  The rules are those of
``status_above``: past the end of a shorter backing file a run reads as
zeros allocated at that depth; what no layer allocates reads as zeros at
depth 0.  Layers with no fast path (raw files, metadata-preallocated images,
external data files, extended L2, a table that needs a closer look) give
their runs through :func:`~qcow2.status.layer_status`, one extent at a time,
so every layer answers exactly as before.

numpy is imported here only; the server imports this module on the first map.
"""

from __future__ import annotations

import sys

import numpy as np

from .contract import EXTENT_DATA, EXTENT_ZERO
from .format import layout as L
from .status import ALLOCATED, DATA, ZERO, Layer, layer_status

_LITTLE_ENDIAN = sys.byteorder == "little"
CODE_MASK = DATA | ZERO | ALLOCATED
_DATA_CODE = np.uint8(DATA | ALLOCATED)
_ZERO_CODE = np.uint8(ZERO | ALLOCATED)

# A layer with nothing below it (no backing support) that allocates nothing and does not
# read as zeros either: an NBD hole not known to be zero.  Decided, at no depth, neither bit.
NOT_ALLOCATED_CODE = np.uint8(0x80)

Runs = tuple[np.ndarray, np.ndarray]  # bounds (int64, n+1), codes (uint8, n); code 0: undecided


def generic_runs(layer: Layer, start: int, end: int) -> Runs:
    """A layer's runs over ``[start, end)`` through its one-extent-at-a-time status."""
    bounds, codes = [start], []
    pos = start
    while pos < end:
        st = layer_status(layer, pos, end - pos)
        if st.length <= 0:
            break
        flags = st.flags
        if flags & ALLOCATED:
            codes.append(flags & CODE_MASK)
        else:  # undecided, unless no layer can be below this one
            codes.append(0 if layer.supports_backing else NOT_ALLOCATED_CODE)
        pos += st.length
        bounds.append(pos)
    if pos < end:  # nothing more to say: undecided
        codes.append(0)
        bounds.append(end)
    return np.array(bounds, dtype=np.int64), np.array(codes, dtype=np.uint8)


def classify_standard(entries: np.ndarray, cluster_size: int, zero_flag: bool) -> np.ndarray | None:
    """A code per standard L2 entry (qcow2_get_cluster_type), or None where one needs a closer
    look (the one-extent path then raises the error QEMU reports)."""
    compressed = (entries & np.uint64(L.QCOW_OFLAG_COMPRESSED)) != 0
    plain = ~compressed
    offsets = entries & np.uint64(L.L2E_OFFSET_MASK)
    zero = plain & ((entries & np.uint64(L.QCOW_OFLAG_ZERO)) != 0)
    normal = plain & ~zero & (offsets != 0)
    unaligned = (offsets & np.uint64(cluster_size - 1)) != 0
    if (unaligned & (normal | (zero & (offsets != 0)))).any() or (not zero_flag and zero.any()):
        return None
    codes = np.zeros(len(entries), dtype=np.uint8)
    codes[compressed | normal] = _DATA_CODE
    codes[zero] = _ZERO_CODE
    return codes


def qcow2_runs(image, start: int, end: int) -> Runs:
    """A qcow2 layer's runs over ``[start, end)``: every L2 entry in it classified at once.

    Only the non-empty entries are looked at (a table is found empty or not by
    one vectorised scan); the runs between them are undecided.  Tables come
    from the image's cache when there (it holds what writes changed and did
    not write back yet), else straight from the file, without filling the
    cache with a scan.
    """
    layout = image.layout
    if image.data_file is not None or layout.extended or image.metadata_preallocated():
        return generic_runs(image, start, end)
    cbits, bits = layout.cluster_bits, layout.bits
    cs = layout.cluster_size
    first_cluster, end_cluster = start >> cbits, ((end - 1) >> cbits) + 1
    l1 = image.meta.l1
    cached = image.meta.l2_tables.cached
    pread = image.file.pread
    indices, values = [], []
    for index in range(first_cluster >> bits, ((end_cluster - 1) >> bits) + 1):
        l2_offset = l1[index] & L.L1E_OFFSET_MASK if index < len(l1) else 0
        if not l2_offset:
            continue
        if l2_offset & (cs - 1):
            return generic_runs(image, start, end)  # it raises what QEMU reports
        table = cached(l2_offset)
        if table is not None:
            words, swap = np.frombuffer(table.entries, dtype=np.uint64), False
        else:  # big-endian on disk; an entry is zero in either byte order
            words, swap = np.frombuffer(pread(l2_offset, cs), dtype=np.uint64), _LITTLE_ENDIAN
        used = np.flatnonzero(words)
        if len(used):
            indices.append(used + (index << bits))
            values.append(words[used].byteswap() if swap else words[used])
    if not indices:
        return np.array([start, end], dtype=np.int64), np.zeros(1, dtype=np.uint8)
    clusters = np.concatenate(indices)
    entries = np.concatenate(values)
    inside = (clusters >= first_cluster) & (clusters < end_cluster)
    clusters, entries = clusters[inside], entries[inside]
    codes = classify_standard(entries, cs, layout.zero_flag)
    if codes is None:
        return generic_runs(image, start, end)
    return _sparse_runs(clusters, codes, cbits, start, end)


def _sparse_runs(clusters: np.ndarray, codes: np.ndarray, cbits: int, start: int, end: int) -> Runs:
    """Runs over ``[start, end)`` from the sorted clusters that have a code; the rest is 0."""
    if not len(clusters):
        return np.array([start, end], dtype=np.int64), np.zeros(1, dtype=np.uint8)
    begins = np.concatenate(([True], (clusters[1:] != clusters[:-1] + 1) | (codes[1:] != codes[:-1])))
    first = np.flatnonzero(begins)
    run_start = clusters[first].astype(np.int64) << cbits
    run_end = np.concatenate((clusters[first[1:] - 1], clusters[-1:])).astype(np.int64) + 1 << cbits
    n = len(first)
    bounds = np.empty(2 * n + 2, dtype=np.int64)
    bounds[0] = start
    bounds[1:-1:2] = np.maximum(run_start, start)
    bounds[2:-1:2] = np.minimum(run_end, end)
    bounds[-1] = end
    seg_codes = np.zeros(2 * n + 1, dtype=np.uint8)
    seg_codes[1::2] = codes[first]
    keep = bounds[1:] > bounds[:-1]  # drop empty gaps (runs that touch)
    seg_starts, seg_codes = bounds[:-1][keep], seg_codes[keep]
    differs = np.concatenate(([0], np.flatnonzero(seg_codes[1:] != seg_codes[:-1]) + 1))
    return np.append(seg_starts[differs], end), seg_codes[differs]


def merge_chain(top: Layer, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bounds, flags, depth) of the chain under ``top`` over ``[start, end)``, as an
    :class:`~qcow2.contract.ExtentMap` holds them.

    ``flags`` holds EXTENT_DATA / EXTENT_ZERO; ``depth`` is 1 for the top layer,
    0 where no layer allocates (which reads as zeros, unless the bottom layer says
    it does not know: :data:`NOT_ALLOCATED_CODE`).
    """
    bounds, codes = top.status_runs(start, end)
    depth = np.where(codes & ALLOCATED, 1, 0).astype(np.uint32)
    layer, d = top.backing, 1
    while layer is not None:
        undecided = np.flatnonzero(codes == 0)
        if not len(undecided):
            break
        d += 1
        lo, hi = int(bounds[undecided[0]]), int(bounds[undecided[-1] + 1])
        below_end = min(hi, layer.size)
        if lo < below_end:
            lb, lc = layer.status_runs(lo, below_end)
            if below_end < hi:  # past the end of a shorter backing file: zeros, allocated there
                lb, lc = np.append(lb, hi), np.append(lc, _ZERO_CODE)
        else:
            lb, lc = np.array([lo, hi], dtype=np.int64), np.array([_ZERO_CODE], dtype=np.uint8)
        bounds, codes, depth = _overlay(bounds, codes, depth, lb, lc, d)
        layer = layer.backing
    zero = ((codes & ZERO) != 0) | (codes == 0)
    flags = np.where(codes & DATA, EXTENT_DATA, 0) | np.where(zero, EXTENT_ZERO, 0)
    return bounds, flags.astype(np.uint8), depth


def _overlay(bounds, codes, depth, lb, lc, d):
    """Runs of the upper layers with their undecided parts filled from the layer below."""
    merged = np.concatenate((bounds, lb))  # two sorted arrays: a merge sort, then no repeats
    merged.sort(kind="stable")
    merged = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
    starts = merged[:-1]
    upper = np.searchsorted(bounds, starts, side="right") - 1
    lower = np.searchsorted(lb, starts, side="right") - 1
    up_codes = codes[upper]
    inside = (lower >= 0) & (lower < len(lc))
    low_codes = np.zeros(len(starts), dtype=np.uint8)
    low_codes[inside] = lc[lower[inside]]
    take = (up_codes == 0) & inside
    new_codes = np.where(take, low_codes, up_codes).astype(np.uint8)
    new_depth = np.where(take & ((low_codes & ALLOCATED) != 0), np.uint32(d), depth[upper]).astype(np.uint32)
    differs = (new_codes[1:] != new_codes[:-1]) | (new_depth[1:] != new_depth[:-1])
    keep = np.concatenate(([0], np.flatnonzero(differs) + 1))
    return np.append(merged[keep], merged[-1]), new_codes[keep], new_depth[keep]
