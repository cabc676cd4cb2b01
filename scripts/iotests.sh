#!/usr/bin/env bash
# QEMU's iotests with qemu-nbd and with our server: every NBD test qemu-nbd
# passes must pass with ours (tests/qemu_iotests.py says how).
#
#   bash scripts/iotests.sh [--modes nbd-raw,nbd-qcow2,file-raw,file-qcow2|all] [-v] [TEST...]
#
# Fetches Debian's source of the installed QEMU once (kept in
# /var/tmp/qcow2-nbd-iotests).  The test suite runs the same thing as
# tests/test_qemu_iotests.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
VENV=${VENV:-$PWD/.venv}
exec "$VENV/bin/python" tests/qemu_iotests.py "$@"
