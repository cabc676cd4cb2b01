"""The ``qcow2`` command line (placeholder until map/info land)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("qcow2: not implemented yet", file=sys.stderr)
    return 1
