"""Discard: clusters the guest no longer needs, released as QEMU's qcow2_co_pdiscard does.

Only whole clusters are discarded (the generic layer's split by cluster
alignment); on an image with a backing file (or v2) a discarded cluster
becomes a zero cluster so that the backing file does not show through.
"""

from __future__ import annotations

from ..format import layout as L
from ..format.l2 import ALL_ZEROES, COMPRESSED, NORMAL, ZERO_ALLOCATED, SubclusterType
from .core import L2Update, aligned_pieces


class Discard:
    """``trim`` for one image, and the cluster discard that zero writes and shrinking use."""

    def __init__(self, core: L2Update) -> None:
        self.core = core
        self.image = core.image
        self.layout = core.layout

    def trim(self, offset: int, length: int) -> None:
        """The generic split by cluster alignment, then QEMU's qcow2_co_pdiscard per piece."""
        for piece, num in aligned_pieces(offset, length, self.layout.cluster_size):
            self._pdiscard(piece, num)

    def _pdiscard(self, offset: int, length: int) -> None:
        img = self.image
        cs = self.layout.cluster_size
        if img.header.version < 3 and img.backing is not None:
            return
        if (offset | length) % cs and (offset % cs or offset + length != img.size):
            return
        self.discard_clusters(offset, length, full=False)

    def discard_clusters(self, offset: int, length: int, full: bool) -> None:
        """QEMU's qcow2_cluster_discard over whole clusters (the last may be the partial tail).

        ``full``: make the clusters plain holes whatever lies below (shrinking).
        """
        cs = self.layout.cluster_size
        nb = -(-length // cs)
        while nb > 0:
            done = self._discard_in_l2(offset, nb, full)
            nb -= done
            offset += done * cs

    def _discard_in_l2(self, offset: int, nb_clusters: int, full: bool) -> int:
        """QEMU's discard_in_l2_slice: zero clusters (or plain holes when ``full``)."""
        img = self.image
        extended, v3 = self.layout.extended, img.header.version >= 3
        hide_backing = img.backing is not None

        def rule(entry: int, bitmap: int, ctype: SubclusterType) -> tuple[int, int, bool]:
            if full:
                return 0, 0, True
            if hide_backing or ctype in (COMPRESSED, NORMAL, ZERO_ALLOCATED):
                if extended:
                    return 0, ALL_ZEROES, True
                return (L.QCOW_OFLAG_ZERO if v3 else 0), bitmap, True
            return entry, bitmap, True

        return self.core.rewrite(offset, nb_clusters, rule)
