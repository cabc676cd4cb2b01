"""Images qemu-nbd refuses to serve: our server must refuse them too, at startup.

With ``--fork`` the command must exit non-zero (qemu-nbd does), say why on
stderr (naming an unknown incompatible bit), and leave no server running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket

import pytest
from servers import PYTHON, ServerError, our_nbd, qemu_nbd, run
from test_cli_refuse import UNKNOWN_BITS, _damage, build_unknown, mentions_bit


def _expect_refusal(server_cm) -> str:
    try:
        with server_cm as srv:
            pass
    except ServerError as e:
        return str(e)
    raise AssertionError(f"{srv.describe()}\nstarted serving an image it must refuse")


@pytest.mark.parametrize("case", list(UNKNOWN_BITS))
def test_server_refuses_unknown_incompatible_bits(case, recipe, tmp_path):
    bits = UNKNOWN_BITS[case]
    image = recipe.image(build_unknown(recipe, bits))
    qemu_msg = _expect_refusal(qemu_nbd(image, tmp_path / "q"))
    msg = _expect_refusal(our_nbd(image, tmp_path / "o"))
    assert "Traceback" not in msg, msg
    for b in bits:
        assert mentions_bit(msg.split("stderr:", 1)[-1], b), (
            f"our server's refusal does not name bit {b}:\n{msg}\n--- qemu-nbd:\n{qemu_msg}"
        )


@pytest.mark.parametrize("kind", ["truncated-header", "missing-backing", "cluster-bits-22", "l1-too-small"])
def test_server_refuses_damaged_images(kind, recipe, tmp_path):
    image = recipe.image(_damage(recipe, kind))
    _expect_refusal(qemu_nbd(image, tmp_path / "q"))
    msg = _expect_refusal(our_nbd(image, tmp_path / "o"))
    assert "Traceback" not in msg, msg


def test_no_server_left_behind_after_refusal(recipe, tmp_path):
    image = recipe.image(build_unknown(recipe, [5]))
    sock = tmp_path / "s.sock"
    pidfile = tmp_path / "s.pid"
    argv = [
        PYTHON,
        "-m",
        "nbdserver",
        "-r",
        "-f",
        "qcow2",
        "-k",
        str(sock),
        "--fork",
        "--pid-file",
        str(pidfile),
    ]
    r = run([*argv, image.path], image.cwd)
    assert r.rc not in (0, None), f"started serving an image with incompatible bit 5:\n{r.err}"
    left = []
    if pidfile.exists() and pidfile.read_text().strip():
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 0)
            left.append(f"pid {pid} from the pid file is alive")
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if sock.exists():
        with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
            s.connect(str(sock))
            left.append(f"{sock} accepts connections")
    assert not left, "refused start left a server behind: " + "; ".join(left)
