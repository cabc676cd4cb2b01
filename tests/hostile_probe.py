"""Run every read-only command of ours on one image, in one process; print what each did.

``python3 tests/hostile_probe.py IMAGE`` runs ``qcow2 info``, ``qcow2 map``,
``qcow2 check`` (no repair) through the command line's own ``main`` and then
what the server does to serve the image (open read-only, block status of the
whole disk, every byte read as sparse runs), and prints one JSON object per
step: ``{"step", "rc", "stderr", "unexpected"}``.  ``unexpected`` is the
traceback of an exception the command did not turn into a message, or, for
the server's step, of an exception that is not an I/O error (the server
answers those with EIO; anything else is a bug).  The test runs this under
``prlimit --as`` and a timeout: memory and hangs are its business.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

CHUNK = 4 << 20  # bytes per READ, as a client would ask
MAX_READ = 1 << 30  # guest bytes read at most (a hostile size must not make the probe slow)


def _command(argv: list[str]) -> dict:
    from qcow2.cli.main import main

    err = io.StringIO()
    unexpected = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001 - the point is to catch anything
            rc, unexpected = None, traceback.format_exc()
    return {"step": argv[0], "rc": rc, "stderr": err.getvalue(), "unexpected": unexpected}


def _serve(image: str) -> dict:
    """What the server does for a client that maps the disk and reads it."""
    import qcow2
    from qcow2.errors import ImageError

    try:
        disk = qcow2.open_disk(image, read_only=True)
    except ImageError as e:
        return {"step": "serve", "rc": 1, "stderr": str(e), "unexpected": None}
    except OSError as e:
        return {"step": "serve", "rc": 1, "stderr": str(e), "unexpected": None}
    except BaseException:  # noqa: BLE001
        return {"step": "serve", "rc": None, "stderr": "", "unexpected": traceback.format_exc()}
    errors: list[str] = []
    unexpected = None
    try:
        end = min(disk.size, MAX_READ)
        for what, call in (
            ("block status", lambda o, n: disk.extent_map(o, n)),
            ("read", lambda o, n: disk.read_sparse(o, n)),
        ):
            offset = 0
            while offset < end:
                n = min(CHUNK, end - offset)
                try:
                    call(offset, n)
                except OSError as e:  # the server's EIO reply: allowed
                    errors.append(f"{what} at {offset}: {e}")
                offset += n
    except BaseException:  # noqa: BLE001
        unexpected = traceback.format_exc()
    finally:
        with contextlib.suppress(Exception):
            disk.close()
    return {"step": "serve", "rc": 0, "stderr": "\n".join(errors[:3]), "unexpected": unexpected}


def main() -> None:
    image = sys.argv[1]
    for argv in (["info", image], ["map", "--output=json", image], ["check", image]):
        print(json.dumps(_command(argv)), flush=True)
    print(json.dumps(_serve(image)), flush=True)


if __name__ == "__main__":
    main()
