"""QEMU's option-list syntax (``a=1,b=2``), shared by ``qcow2 create -o`` and ``qcow2-nbd --export``.

Its own module so that the server's start-up does not load the image creator for it.
"""

from __future__ import annotations


def split_option_list(text: str) -> list[str]:
    """``a=1,b=2`` split on single commas; a doubled comma is a literal comma (QEMU's syntax)."""
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return items
