# qcow2-nbd in a container: serves an image from the /images volume on TCP 10809.
#
#   docker build -t qcow2-nbd .
#   docker run --rm -p 10809:10809 -v "$PWD:/images:ro" qcow2-nbd -r disk.qcow2
#   nbdinfo nbd://127.0.0.1:10809
#
# Arguments after the image name go to qcow2-nbd (paths are relative to
# /images).  Backing and data files must be inside the volume too: the
# server is started with --confine /images and refuses an image that names
# any other file.  Drop -r and :ro to export read-write.  Only the server is
# installed: no QEMU, no libnbd.
#
# Build arguments, for machines without a registry or PyPI (CI uses both):
#   BASE            any Debian-like image with python3 (3.11 or newer) and its venv
#                   module, e.g. one made with debootstrap and `docker import`
#                   (scripts/docker-base.sh)
#   PIP_FIND_LINKS  where pip finds the wheels (a directory served over HTTP) ...
#   PIP_NO_INDEX    ... and, set to 1, that it must not ask PyPI
ARG BASE=python:3.11-slim
FROM $BASE

ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

COPY pyproject.toml README.md /src/
COPY qcow2/ /src/qcow2/
COPY nbdserver/ /src/nbdserver/
# A venv: the same on python:slim and on Debian's python3 (which refuses system-wide pip installs).
RUN python3 -m venv /opt/qcow2-nbd \
    && /opt/qcow2-nbd/bin/pip install -q /src \
    && rm -rf /src \
    && /opt/qcow2-nbd/bin/qcow2-nbd --help >/dev/null

WORKDIR /images
VOLUME /images
EXPOSE 10809
# The server stops cleanly on SIGTERM (docker stop).
ENTRYPOINT ["/opt/qcow2-nbd/bin/qcow2-nbd", "--bind", "0.0.0.0", "--port", "10809", "--confine", "/images"]
CMD ["--help"]
