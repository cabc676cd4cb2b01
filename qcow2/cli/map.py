"""``qemu-img map``: per-layer block status walked down the chain, merged, printed.

Follows qemu-img's ``get_block_status``: each layer answers for itself and the
walk descends only while a layer says neither data nor zero, so ``depth`` is
where the answer was found and ``present`` whether that layer owns the range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..status import ALLOCATED, DATA, OFFSET_VALID, ZERO, Layer, layer_status

CHUNK = 1 << 30


@dataclass(slots=True)
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None

    def mergeable(self, nxt: MapEntry) -> bool:
        if (self.zero, self.data, self.depth, self.present) != (nxt.zero, nxt.data, nxt.depth, nxt.present):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        if self.offset is not None and self.offset + self.length != nxt.offset:
            return False
        return self.filename == nxt.filename


def block_status_entry(top: Layer, offset: int, length: int) -> MapEntry:
    layer, depth = top, 0
    while True:
        st = layer_status(layer, offset, length)
        length = st.length
        flags = st.flags
        if flags & (ZERO | DATA):
            break
        layer = layer.backing
        if layer is None:
            flags = 0
            break
        depth += 1
    has_offset = bool(flags & OFFSET_VALID)
    return MapEntry(
        offset,
        length,
        depth,
        bool(flags & ALLOCATED),
        bool(flags & ZERO),
        bool(flags & DATA),
        st.host_offset if has_offset else None,
        st.file.filename if has_offset and st.file is not None else None,
    )


def map_entries(top: Layer, human: bool = False) -> Iterator[MapEntry]:
    """Merged entries over the whole disk, as qemu-img map computes them.

    In human mode, qemu-img folds every non-data entry into "zero" before
    merging (it prints only data), which changes what merges.
    """
    size = top.size
    offset = 0
    curr: MapEntry | None = None
    while offset < size:
        nxt = block_status_entry(top, offset, min(CHUNK, size - offset))
        offset += nxt.length
        if curr is not None:
            if curr.mergeable(nxt):
                curr.length += nxt.length
                continue
            if human and (not nxt.data or nxt.zero):
                nxt.data, nxt.zero = False, True
            yield curr
        curr = nxt
    if curr is not None:
        yield curr


def format_json(entries: Iterator[MapEntry]) -> str:
    parts = []
    for e in entries:
        text = (
            f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth},'
            f' "present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}'
        )
        if e.offset is not None:
            text += f', "offset": {e.offset}'
        parts.append(text + "}")
    return "[" + ",\n".join(parts) + "]\n"


def format_human(entries: Iterator[MapEntry]) -> Iterator[str]:
    """Lines of qemu-img's human output; raises where qemu-img stops with an error."""
    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"
    for e in entries:
        if e.data and e.offset is None:
            raise ValueError("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            yield f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}{e.filename or ''}\n"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _hex(v: int) -> str:
    return hex(v) if v else "0"
