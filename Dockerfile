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
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

COPY pyproject.toml README.md /src/
COPY qcow2/ /src/qcow2/
COPY nbdserver/ /src/nbdserver/
RUN pip install /src && rm -rf /src

WORKDIR /images
VOLUME /images
EXPOSE 10809
# The server stops cleanly on SIGTERM (docker stop).
ENTRYPOINT ["qcow2-nbd", "--bind", "0.0.0.0", "--port", "10809", "--confine", "/images"]
CMD ["--help"]
