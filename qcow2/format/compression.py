"""Decompression of compressed clusters (zlib raw deflate, zstd), bounded to one cluster."""

from __future__ import annotations

import io
import zlib
from functools import cache

ZLIB = 0
ZSTD = 1


@cache
def _zstandard():
    """zstandard, loaded at the first zstd cluster: most images have none, and start-up is shorter."""
    import zstandard

    return zstandard


@cache
def _zstd_decompressor():
    return _zstandard().ZstdDecompressor()


def decompress_cluster(raw: bytes, cluster_size: int, compression_type: int) -> bytes | None:
    """One cluster from ``raw`` (trailing bytes ignored), or None if the stream is bad or short."""
    if compression_type == ZLIB:
        try:
            out = zlib.decompressobj(-15).decompress(raw, cluster_size)
        except zlib.error:
            return None
    else:
        try:
            reader = _zstd_decompressor().stream_reader(io.BytesIO(raw), read_across_frames=True)
            out = reader.read(cluster_size)
            while len(out) < cluster_size:
                more = reader.read(cluster_size - len(out))
                if not more:
                    break
                out += more
        except _zstandard().ZstdError:
            return None
    return out if len(out) == cluster_size else None
