"""Decompression of compressed clusters (zlib raw deflate, zstd), bounded to one cluster."""

from __future__ import annotations

import io
import zlib

import zstandard

ZLIB = 0
ZSTD = 1

_zstd = zstandard.ZstdDecompressor()


def decompress_cluster(raw: bytes, cluster_size: int, compression_type: int) -> bytes | None:
    """One cluster from ``raw`` (trailing bytes ignored), or None if the stream is bad or short."""
    try:
        if compression_type == ZLIB:
            out = zlib.decompressobj(-15).decompress(raw, cluster_size)
        else:
            reader = _zstd.stream_reader(io.BytesIO(raw), read_across_frames=True)
            out = reader.read(cluster_size)
            while len(out) < cluster_size:
                more = reader.read(cluster_size - len(out))
                if not more:
                    break
                out += more
    except (zlib.error, zstandard.ZstdError):
        return None
    return out if len(out) == cluster_size else None
