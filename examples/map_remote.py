#!/usr/bin/python3
"""Map a remote NBD export with the libnbd Python binding.

    /usr/bin/python3 examples/map_remote.py nbd+unix:///?socket=/tmp/qcow2-nbd-demo/nbd.sock
    /usr/bin/python3 examples/map_remote.py nbd://127.0.0.1:10809

Asks for both meta contexts qcow2-nbd offers (and qemu-nbd -A too),
walks the whole export with NBD_CMD_BLOCK_STATUS and prints the extents of
each context, neighbours with the same value merged.  Needs Debian's
python3-libnbd (`import nbd`), so run it with /usr/bin/python3 or with the
project's venv, which sees the system site-packages.
"""

import sys

import nbd

CONTEXTS = ("base:allocation", "qemu:allocation-depth")
MAX_REQUEST = 2**32 - 2**20  # NBD lengths are 32-bit; stay aligned


def describe(context: str, value: int) -> str:
    if context == "base:allocation":
        words = []
        if value & nbd.STATE_HOLE:
            words.append("hole")
        if value & nbd.STATE_ZERO:
            words.append("zero")
        return ",".join(words) or "data"
    if value == 0:
        return "absent"
    return "local" if value == 1 else f"backing depth {value}"


def walk(h: nbd.NBD, size: int, contexts: list[str]) -> dict[str, list[list[int]]]:
    """Extents per context as [offset, length, value], merged and cut at ``size``."""
    found: dict[str, list[list[int]]] = {c: [] for c in contexts}
    reply: dict[str, list[int]] = {}  # one request's extents, per context

    def extent(metacontext, start, entries, error):
        if metacontext in found and metacontext not in reply:
            reply[metacontext] = list(entries)
        return 0

    offset = 0
    while offset < size:
        reply.clear()
        h.block_status(min(size - offset, MAX_REQUEST), offset, extent)
        missing = [c for c in contexts if not reply.get(c)]
        if missing:
            raise RuntimeError(f"server sent no extents for {', '.join(missing)} at {offset}")
        # Contexts may answer for different lengths: keep what all of them
        # covered, and ask again from there.
        end = min(size, min(offset + sum(reply[c][0::2]) for c in contexts))
        for c in contexts:
            pos = offset
            for length, value in zip(reply[c][0::2], reply[c][1::2], strict=True):
                length = min(length, end - pos)
                if length <= 0:
                    break
                runs = found[c]
                if runs and runs[-1][2] == value and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1][1] += length
                else:
                    runs.append([pos, length, value])
                pos += length
        offset = end
    return found


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} NBD-URI", file=sys.stderr)
        return 2
    h = nbd.NBD()
    for c in CONTEXTS:
        h.add_meta_context(c)
    h.connect_uri(sys.argv[1])
    try:
        size = h.get_size()
        contexts = [c for c in CONTEXTS if h.can_meta_context(c)]
        if not contexts:
            print("the server offers neither context", file=sys.stderr)
            return 1
        print(f"export size {size} bytes; contexts: {', '.join(contexts)}")
        for c, runs in walk(h, size, contexts).items():
            print(f"\n{c}:")
            print(f"{'offset':>14} {'length':>14} {'value':>5}  meaning")
            for offset, length, value in runs:
                print(f"{offset:>14} {length:>14} {value:>5}  {describe(c, value)}")
    finally:
        h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
