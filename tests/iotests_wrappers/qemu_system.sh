#!/usr/bin/env bash
# QEMU_PROG for QEMU's iotests.  Their harness starts every VM with
# "-accel qtest", an accelerator module Debian does not ship; TCG runs the
# same VMs (the tests drive them over QMP and never boot a guest).
set -euo pipefail
args=()
prev=
for arg in "$@"; do
    if [[ $prev == -accel && $arg == qtest ]]; then arg=tcg; fi
    args+=("$arg")
    prev=$arg
done
exec "${IOTESTS_REAL_QEMU:-/usr/bin/qemu-system-x86_64}" "${args[@]}"
