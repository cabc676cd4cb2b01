"""Per-client overlays: every client of an export writes into a qcow2 overlay of its own.

For VM farms: many machines boot from one golden image, each writing into a
copy-on-write layer of its own, and the image itself is never written (it
is opened read-only once, locked against writers, and its one open chain --
files, tables, cache -- is shared by every overlay).

- A client that asks for the export's own name gets a *throwaway* overlay:
  created in the temporary directory, unlinked as soon as it is open, gone
  when the client leaves (qemu-nbd ``-s`` gives all clients one such overlay;
  here each has its own).
- With a directory, any other name that is a plain file name (letters,
  digits, ``.``, ``_``, ``-``) is an overlay *kept* there as ``NAME.qcow2``:
  created at first use, taken up again at the next connection, one client at
  a time.  LIST shows the export and the overlays the directory holds.

Opening happens after the client's GO (in a worker thread); a failure
reaches the client as ERR_UNKNOWN with the reason.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace

from qcow2.chain import ChainDisk
from qcow2.create import run_create
from qcow2.hostfile import HostFile
from qcow2.opening import ConfinedOpener, open_overlay

from .export import Export

log = logging.getLogger("nbdserver")

OVERLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SUFFIX = ".qcow2"


class ClientOverlays:
    """Gives the clients of ``template`` (an export of the read-only ``base``) overlays of their own.

    ``template`` describes what clients see (its name, description, options;
    its disk is a throwaway overlay made once at start-up, so that flags and
    block sizes are those of a real one, and so that a directory or a
    temporary directory we cannot write fails the start, not the first client).
    """

    def __init__(
        self,
        image: str,
        fmt: str,
        base: ChainDisk,
        template: Export,
        directory: str | None = None,
        confine: list[str] | None = None,
    ) -> None:
        if directory is not None and not os.path.isdir(directory):
            raise ValueError(f"{directory}: not a directory")
        self.image = os.path.abspath(image)
        self.fmt = fmt
        self.base = base
        self.directory = os.path.abspath(directory) if directory is not None else None
        self.confine = confine or []
        self.in_use: set[str] = set()  # kept overlays with a client now
        self._lock = threading.Lock()  # in_use is changed by worker threads
        self.template = replace(template, disk=self._throwaway(), per_client=True, multi_conn=False)

    def close(self) -> None:
        """Close the image (after every client's overlay, and the template's, is closed)."""
        self.base.close()

    # -- what the handshake sees -----------------------------------------------------

    def exports(self, others: Mapping[str, Export]) -> Mapping[str, Export]:
        return _Exports(self, others)

    def template_for(self, name: str) -> Export | None:
        if name == self.template.name:
            return self.template
        if self.directory is not None and OVERLAY_NAME.match(name):
            return replace(self.template, name=name, description="")
        return None

    def kept_names(self) -> list[str]:
        if self.directory is None:
            return []
        names = (f[: -len(SUFFIX)] for f in os.listdir(self.directory) if f.endswith(SUFFIX))
        return sorted(n for n in names if OVERLAY_NAME.match(n) and n != self.template.name)

    # -- a client's own export (called in worker threads) ----------------------------

    def attach(self, name: str) -> Export:
        """Open the overlay of a client that chose ``name``; ValueError/OSError say why not."""
        template = self.template_for(name)
        if template is None:
            raise ValueError(f"no export {name!r}")
        if name == self.template.name:
            return replace(template, disk=self._throwaway())
        with self._lock:
            if name in self.in_use:
                raise ValueError(f"overlay {name!r} is in use by another client")
            self.in_use.add(name)
        try:
            return replace(template, disk=self._kept(name))
        except BaseException:
            with self._lock:
                self.in_use.discard(name)
            raise

    def detach(self, export: Export) -> None:
        """The client has gone: write its overlay back and close it (a throwaway one vanishes)."""
        try:
            export.disk.close()
        finally:
            with self._lock:
                self.in_use.discard(export.name)

    def _opener(self, path: str):
        return ConfinedOpener(self.confine, path) if self.confine else HostFile

    def _throwaway(self) -> ChainDisk:
        fd, path = tempfile.mkstemp(prefix="qcow2-nbd-client-", suffix=SUFFIX)
        os.close(fd)
        try:
            run_create(path, None, backing=self.image, backing_fmt=self.fmt, quiet=True)
            return open_overlay(path, self.base.top, self._opener(path))
        finally:
            os.unlink(path)

    def _kept(self, name: str) -> ChainDisk:
        assert self.directory is not None
        path = os.path.join(self.directory, name + SUFFIX)
        if not os.path.exists(path):
            # Made under another name and renamed: a crash never leaves half an overlay under NAME.
            # Mode 0666 less the umask, as qemu-img creates files.
            tmp = os.path.join(self.directory, f".{name}.{secrets.token_hex(8)}.new")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            try:
                run_create(tmp, None, backing=self.image, backing_fmt=self.fmt, quiet=True)
                os.rename(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            log.info("new overlay %s", path)
        return open_overlay(path, self.base.top, self._opener(path))


class _Exports(Mapping[str, Export]):
    """The server's exports with the per-client ones: what a client may name, and LIST."""

    def __init__(self, overlays: ClientOverlays, others: Mapping[str, Export]) -> None:
        self.overlays = overlays
        self.others = others

    def __getitem__(self, name: str) -> Export:
        export = self.others.get(name) or self.overlays.template_for(name)
        if export is None:
            raise KeyError(name)
        return export

    def __iter__(self) -> Iterator[str]:
        yield from self.others
        yield from (n for n in self.overlays.kept_names() if n not in self.others)

    def __len__(self) -> int:
        return sum(1 for _ in self)
