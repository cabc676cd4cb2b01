#!/usr/bin/python3
"""QEMU_NBD_PROG for QEMU's iotests: qemu-nbd's command line mapped onto qcow2-nbd.

What differs between the two command lines, and nothing else, is mapped:

* ``-L``/``--list`` makes qemu-nbd a client (it lists a server's exports):
  that is left to the real qemu-nbd, pointed at whichever server runs.
* qemu-nbd exits after its last client unless ``-t``, and serves one client
  at a time unless ``-e N``: ``--exit-after-last`` and ``-e 1`` say so to ours.
* ``-v`` is dropped: qemu-nbd keeps its stderr with it, ours would log
  every client.

The one iotest that uses TLS (233) fails with qemu-nbd 7.2 itself, so
qemu-nbd's ``--object tls-creds-x509,id=ID`` / ``--tls-creds ID`` (ours:
``--tls-creds DIR``) is not mapped.

Environment: ``IOTESTS_SERVER=qemu`` runs the real qemu-nbd unchanged (the
baseline); ``IOTESTS_NBD_LOG=FILE`` appends one JSON line per start naming
the iotest that asked (found among this process's ancestors) and its argv;
``QCOW2_NBD_PYTHON`` is the interpreter with our dependencies (default: the
repository's .venv).  Our server runs this repository's code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REAL_QEMU_NBD = os.environ.get("IOTESTS_REAL_QEMU_NBD", "/usr/bin/qemu-nbd")
# qemu-nbd's options that take a value (its getopt string and long options)
SHORT_WITH_VALUE = set("bopckeflxTDB")
LONG_WITH_VALUE = {
    "bind", "port", "socket", "offset", "bitmap", "connect", "load-snapshot", "cache", "aio",
    "discard", "detect-zeroes", "shared", "format", "object", "export-name", "description",
    "tls-creds", "tls-hostname", "tls-authz", "trace", "pid-file", "selinux-label",
}  # fmt: skip


def split_options(argv: list[str]) -> list[tuple[str, str | None]]:
    """qemu-nbd's argv as (option, value) pairs; a positional argument is ("", arg)."""
    out: list[tuple[str, str | None]] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if name in LONG_WITH_VALUE and not eq:
                value = next(it, "")
            out.append(("--" + name, value if (eq or name in LONG_WITH_VALUE) else None))
        elif arg.startswith("-") and len(arg) > 1:
            for i, ch in enumerate(arg[1:], 1):
                if ch in SHORT_WITH_VALUE:
                    out.append(("-" + ch, arg[i + 1 :] or next(it, "")))
                    break
                out.append(("-" + ch, None))
        else:
            out.append(("", arg))
    return out


def translate(argv: list[str]) -> list[str]:
    opts = split_options(argv)
    names = {k for k, _ in opts}
    out: list[str] = []
    for key, value in opts:
        if key == "":
            out.append(value or "")
        elif key in ("-v", "--verbose"):
            continue
        elif value is None:
            out.append(key)
        else:
            out += [f"{key}={value}"] if key.startswith("--") else [key, value]
    if not names & {"-t", "--persistent"}:
        out.append("--exit-after-last")
    if not names & {"-e", "--shared"}:
        out += ["-e", "1"]
    return out


def asking_test() -> str:
    """The iotest among our ancestors (a path under qemu-iotests/), or "?"."""
    pid = os.getppid()
    while pid > 1:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        for arg in args:
            _, sep, name = arg.decode(errors="replace").rpartition("/qemu-iotests/")
            if sep and name != "check":
                return name
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return "?"


def main() -> None:
    argv = sys.argv[1:]
    log = os.environ.get("IOTESTS_NBD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": asking_test(), "argv": argv}) + "\n")
    listing = {"-L", "--list"} & {key for key, _ in split_options(argv)}
    if os.environ.get("IOTESTS_SERVER") == "qemu" or listing:
        os.execv(REAL_QEMU_NBD, [REAL_QEMU_NBD, *argv])
    python = os.environ.get("QCOW2_NBD_PYTHON") or str(ROOT / ".venv/bin/python")
    os.environ["PYTHONPATH"] = str(ROOT)  # not the iotests' path: it has a qcow2.py of its own
    os.execv(python, [python, "-m", "nbdserver", *translate(argv)])


if __name__ == "__main__":
    main()
