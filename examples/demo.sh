#!/usr/bin/env bash
# Build a small qcow2 chain with QEMU's tools and serve it with qcow2-nbd.
#
#   bash examples/demo.sh          # Unix socket (default)
#   bash examples/demo.sh --tcp    # TCP 127.0.0.1:10809
#
# Installs what it needs first (scripts/setup.sh), prints the nbdinfo
# commands to look at the export from another terminal, then runs the
# server in the foreground until Ctrl-C.  DEMO_DIR picks where the images
# go (default /tmp/qcow2-nbd-demo; rebuilt on every run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
bash scripts/setup.sh
VENV=${VENV:-$ROOT/.venv}

tcp=0
case ${1:-} in
    --tcp) tcp=1 ;;
    "") ;;
    *) echo "usage: $0 [--tcp]" >&2; exit 2 ;;
esac

DIR=${DEMO_DIR:-/tmp/qcow2-nbd-demo}
mkdir -p "$DIR"
cd "$DIR"
rm -f base.qcow2 top.qcow2 nbd.sock

io() { qemu-io -f qcow2 "$@" >/dev/null; }

# base.qcow2, 64 MiB: data at 0-2M and 8-9M, a zero cluster run at 16M.
qemu-img create -q -f qcow2 base.qcow2 64M
io -c 'write -P 0x11 0 2M' -c 'write -P 0x22 8M 1M' -c 'write -z 16M 1M' base.qcow2

# top.qcow2 over it: new data partly over the base's, zero clusters that
# hide base data (8M-8.5M), a lone data cluster at 32M, and a discarded
# range (zero clusters again) over base data at 1.5M.  Everything else is
# unallocated here: it comes from the base, or is a hole in both.
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
io -c 'write -P 0x33 1M 512k' -c 'write -z 8M 512k' -c 'write -P 0x44 32M 64k' \
   -c 'discard 1536k 256k' -c 'write -P 0x55 48M 128k' top.qcow2

if ((tcp)); then
    URI=nbd://127.0.0.1:10809
    LISTEN=(-b 127.0.0.1 -p 10809)
else
    URI="nbd+unix:///?socket=$DIR/nbd.sock"
    LISTEN=(-k "$DIR/nbd.sock")
fi

cat <<INFO

Serving $DIR/top.qcow2 (backing file base.qcow2) read-only at
  $URI

In another terminal:
  nbdinfo '$URI'
  nbdinfo --map '$URI'
  nbdinfo --map=qemu:allocation-depth '$URI'
  /usr/bin/python3 $ROOT/examples/map_remote.py '$URI'

(--map is base:allocation: data, hole, zero; allocation-depth: 1 = top.qcow2,
2 = base.qcow2, 0 = absent; map_remote.py asks for both over one connection.)

The same questions asked of QEMU directly, for comparison:
  qemu-img map --output=json $DIR/top.qcow2
  $VENV/bin/qcow2 map --output=json $DIR/top.qcow2

Ctrl-C stops the server.
INFO

# Foreground; Ctrl-C reaches the server, and the script ends with it.
exec "$VENV/bin/qcow2-nbd" "${LISTEN[@]}" -r -D "qcow2-nbd demo" top.qcow2
