#!/usr/bin/env bash
# A Docker base image for the Dockerfile when no image registry is reachable:
# Debian 12 with python3 and its venv module, made with debootstrap from the
# Debian mirror and loaded with `docker import`.
#
#   bash scripts/docker-base.sh [TAG]     # default qcow2-nbd-base:bookworm; prints TAG
#   docker build --build-arg BASE=qcow2-nbd-base:bookworm -t qcow2-nbd .
#
# Does nothing when TAG exists already.  Needs root, debootstrap and a running dockerd.
# Environment: MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

TAG=${1:-qcow2-nbd-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG"
    exit 0
fi
root=$(mktemp -d /var/tmp/qcow2-nbd-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "docker-base: debootstrap bookworm into $root" >&2
if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$MIRROR" \
    >"$root.log" 2>&1; then
    tail -20 "$root.log" >&2
    rm -f "$root.log"
    exit 1
fi
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
echo "$TAG"
