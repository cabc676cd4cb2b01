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
# and for the VM-boot test (tests/test_vm_boot.py builds a bootable disk, boots it from the server):
#   qemu-system-x86 the guest machine, run under TCG (SeaBIOS comes with it); also what QEMU's
#                   iotests start (tests/qemu_iotests.py), and qemu-storage-daemon
#   busybox-static  the guest's whole userland: one static binary, in the initramfs and on the root
#   syslinux        the boot loader, installed into the FAT partition's image file through mtools
#   syslinux-common syslinux's MBR code and ldlinux
#   mtools          mcopy: the kernel and initramfs into the FAT image, no mount
#   dosfstools      mkfs.fat: the FAT boot partition
#   e2fsprogs       mke2fs -d: the ext4 root filled from a directory, no mount; debugfs reads it back
# and for the Docker test (tests/test_docker.py builds the Dockerfile and runs the image):
#   docker.io       the Docker engine (dockerd) and client; the test starts dockerd if none runs
#   debootstrap     a Debian base image for the Dockerfile when no image registry answers
# and for QEMU's iotests (tests/qemu_iotests.py):
#   dpkg-dev        dpkg-source, with which apt-get source unpacks QEMU's iotests
APT_PACKAGES=(qemu-utils libnbd-bin file python3-libnbd python3-venv fio nbdkit util-linux ca-certificates openssl
              systemd qemu-system-x86 busybox-static syslinux syslinux-common mtools dosfstools e2fsprogs
              docker.io debootstrap dpkg-dev)
# The VM-boot test's guest kernel: the package linux-image-cloud-amd64 points to (virtio and ext4,
# small), downloaded as a .deb into VM_DEBS and never installed: installing a kernel would run
# initramfs and boot-loader hooks on this machine.
VM_KERNEL=linux-image-cloud-amd64
VM_DEBS=$ROOT/.cache/vm

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

# The kernel package linux-image-cloud-amd64 depends on now (linux-image-6.1.0-NN-cloud-amd64).
guest_kernel_package() {
    apt-cache depends "$VM_KERNEL" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

# Download it into VM_DEBS unless it is there; older ones are removed.  apt-cache takes a second
# here (no binary cache), so it is asked only when the package lists changed since the last look.
fetch_guest_kernel() {
    local pkg looked=$VM_DEBS/.looked
    if [[ -f $looked ]] && compgen -G "$VM_DEBS/*.deb" >/dev/null \
        && [[ -z $(find /var/lib/apt/lists -maxdepth 1 -newer "$looked" -print -quit) ]]; then
        return 0
    fi
    pkg=$(guest_kernel_package)
    if [[ -z $pkg ]]; then
        quiet "${APT[@]}" update
        pkg=$(guest_kernel_package)
        [[ -n $pkg ]] || { log "cannot tell which kernel package $VM_KERNEL depends on"; return 1; }
    fi
    if compgen -G "$VM_DEBS/${pkg}_*.deb" >/dev/null; then
        touch "$looked"
        return 0
    fi
    log "downloading the VM-boot test's guest kernel: $pkg"
    mkdir -p "$VM_DEBS.new"
    rm -f "$VM_DEBS.new"/*.deb
    # a stale package list names a file the mirror no longer has: update once and try again
    if ! (cd "$VM_DEBS.new" && quiet apt-get -q download "$pkg"); then
        quiet "${APT[@]}" update
        (cd "$VM_DEBS.new" && quiet apt-get -q download "$pkg")
    fi
    rm -rf "$VM_DEBS"
    mv "$VM_DEBS.new" "$VM_DEBS"
    touch "$looked"
}

if [[ ${SKIP_APT:-0} != 1 ]]; then
    if ! command -v dpkg-query >/dev/null; then
        log "this script installs Debian packages; set SKIP_APT=1 on other systems"
        exit 1
    fi
    SUDO=()
    ((EUID == 0)) || SUDO=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    APT=("${SUDO[@]}" apt-get -q -y -o DPkg::Lock::Timeout=300)
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]})); then
        if ((EUID != 0)) && ! command -v sudo >/dev/null; then
            log "need root to install: ${missing[*]}"
            exit 1
        fi
        log "installing Debian packages: ${missing[*]}"
        quiet "${APT[@]}" update
        quiet "${APT[@]}" install --no-install-recommends "${missing[@]}"
    fi
    fetch_guest_kernel
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
