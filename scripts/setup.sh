#!/usr/bin/env bash
# Install everything qcow2-nbd needs to run, demo and test on Debian 12.
#
#   bash scripts/setup.sh
#
# Root (or sudo) on Debian 12 "bookworm".  Idempotent and quick when there
# is nothing to do: the Debian packages are checked with dpkg-query first,
# and pip runs again only when pyproject.toml changes.
#
# Environment:
#   VENV=path           virtualenv to create (default: .venv in the repo)
#   SKIP_APT=1          do not touch Debian packages
#   FORCE_PIP=1         reinstall the Python package even if up to date
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}

# What the server, the demo, the examples, the benchmark and the tests use:
#   qemu-utils      qemu-img / qemu-io / qemu-nbd (build test images, reference answers)
#   libnbd-bin      nbdinfo, nbdcopy, nbdsh (clients)
#   file            nbdinfo runs file(1) for its "content" line; without it
#                   nbdinfo 1.14 prints garbage there
#   python3-libnbd  the libnbd Python binding (`import nbd`, for tests and examples)
#   python3-venv    the venv module, with pip for it
#   fio             the benchmark's random-read load (nbd engine)
#   nbdkit          the benchmark's C baseline (file plugin on the raw equivalent)
#   util-linux      fallocate (test images with punched holes)
#   ca-certificates pip talks HTTPS to PyPI
#   openssl         the TLS tests make their CA and certificates with it
#   systemd         systemd-socket-activate and systemd-analyze for the systemd tests
#   qemu-system-x86 QEMU's iotests (tests/qemu_iotests.py): the VM some NBD tests start, and
#                   qemu-storage-daemon (from qemu-system-common)
#   dpkg-dev        dpkg-source, with which apt-get source unpacks QEMU's iotests
APT_PACKAGES=(qemu-utils libnbd-bin file python3-libnbd python3-venv fio nbdkit util-linux ca-certificates openssl
              systemd qemu-system-x86 dpkg-dev)

log() { printf 'setup: %s\n' "$*" >&2; }

# Run a command quietly; print its output only if it fails.
quiet() {
    local out
    out=$(mktemp)
    if ! "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        log "FAILED: $*"
        return 1
    fi
    rm -f "$out"
}

missing_packages() {
    local p status
    for p in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $status == ii* ]] || printf '%s\n' "$p"
    done
}

if [[ ${SKIP_APT:-0} != 1 ]]; then
    if ! command -v dpkg-query >/dev/null; then
        log "this script installs Debian packages; set SKIP_APT=1 on other systems"
        exit 1
    fi
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]})); then
        SUDO=()
        if ((EUID != 0)); then
            command -v sudo >/dev/null || { log "need root to install: ${missing[*]}"; exit 1; }
            SUDO=(sudo)
        fi
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        APT=("${SUDO[@]}" apt-get -q -y -o DPkg::Lock::Timeout=300)
        quiet "${APT[@]}" update
        quiet "${APT[@]}" install --no-install-recommends "${missing[@]}"
    fi
fi

PY=/usr/bin/python3
[[ -x $PY ]] || { log "$PY not found"; exit 1; }

# --system-site-packages: the libnbd binding is a Debian package, not on PyPI.
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    quiet "$PY" -m venv --system-site-packages "$VENV"
fi

stamp=$VENV/.qcow2-nbd-setup
want=$(cat pyproject.toml <("$VENV/bin/python" -VV) | sha256sum | cut -d' ' -f1)
if [[ ${FORCE_PIP:-0} == 1 || ! -f $stamp || $(cat "$stamp") != "$want" ]] \
    || ! "$VENV/bin/python" -c 'import qcow2, nbdserver, pytest, pytest_asyncio' 2>/dev/null \
    || [[ ! -x $VENV/bin/ruff ]]; then
    log "installing qcow2-nbd and its test tools into $VENV"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # compat: a plain path entry, as an installed package has, instead of an import hook
    # that costs every start of the server 20 ms (pathlib, importlib.util).
    quiet "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" --config-settings editable_mode=compat
    printf '%s\n' "$want" >"$stamp"
fi

# The binding must be visible from the venv (Debian's python3-libnbd).
if [[ ${SKIP_APT:-0} != 1 ]] && ! "$VENV/bin/python" -c 'import nbd' 2>/dev/null; then
    log "warning: 'import nbd' fails in $VENV (was it made without --system-site-packages?)"
    log "         remove $VENV and run this script again"
    exit 1
fi
log "ready: $VENV"
