"""Cluster 0: the header, its extensions and the backing name, parsed and built.

:func:`parse_header` reads what an image says and refuses what we cannot
serve safely; :func:`build_header` writes cluster 0 the way QEMU's
``qcow2_update_header`` lays it out, for a new image or (through
:func:`rebuild_header`) for an existing one whose extensions change.  Both
work on bytes only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from construct import ConstructError

from ..errors import ImageError, shown
from . import layout as L

MAX_CLUSTER_BITS = 21
MIN_CLUSTER_BITS = 9
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56
MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS


@dataclass
class Header:
    """Everything cluster 0 says, with v2 values filled in as v3 defaults."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = L.V2_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: dict | None = None
    bitmaps_extension_offset: int = 0  # where the bitmaps extension's data starts
    crypto: dict | None = None
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    extension_offsets: list[int] = field(default_factory=list)  # each extension header, END included

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & L.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & L.COMPAT_LAZY_REFCOUNTS)

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit)) or L.FEATURE_NAMES.get((kind, bit)) or f"bit {bit}"


def parse_header(cluster0: bytes, filename: str) -> Header:
    """Parse the first cluster (or as much of it as the file has)."""
    where = f"{shown(filename)}: "
    try:
        common = L.HeaderV2.parse(cluster0)
    except ConstructError:
        raise ImageError(where + "not a qcow2 image (bad magic or truncated header)") from None
    if common.version not in (2, 3):
        raise ImageError(where + f"unsupported qcow2 version {common.version}")
    h = Header(**{k: v for k, v in common.items() if k not in ("magic", "_io")})
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(where + f"unsupported cluster size 2^{h.cluster_bits} (must be 512 B..2 MiB)")
    csize = h.cluster_size
    if h.version == 3:
        try:
            v3 = L.HeaderV3Fields.parse(cluster0[L.V2_HEADER_LENGTH :])
        except ConstructError:
            raise ImageError(where + "truncated v3 header") from None
        h.incompatible_features = v3.incompatible_features
        h.compatible_features = v3.compatible_features
        h.autoclear_features = v3.autoclear_features
        h.refcount_order = v3.refcount_order
        h.header_length = v3.header_length
        if h.header_length < L.V3_HEADER_LENGTH or h.header_length % 8:
            raise ImageError(where + f"invalid header length {h.header_length}")
        if h.header_length > csize:
            raise ImageError(where + "header length exceeds the cluster size")
        if h.header_length > L.COMPRESSION_TYPE_OFFSET:
            h.compression_type = cluster0[L.COMPRESSION_TYPE_OFFSET]
    _check_features(h, where)
    if h.refcount_order > 6:
        raise ImageError(where + f"refcount order {h.refcount_order} is out of range (max 6)")
    if h.crypt_method:
        raise ImageError(where + "encrypted images are not supported")
    if h.extended_l2 and h.cluster_bits < 14:
        raise ImageError(where + "extended L2 entries need clusters of at least 16 KiB")
    _check_tables(h, where)
    _parse_extensions(h, cluster0, where)
    if h.backing_file_offset:
        if (
            h.backing_file_offset > csize
            or h.backing_file_size > MAX_BACKING_NAME
            or (h.backing_file_offset + h.backing_file_size > csize)
        ):
            raise ImageError(where + "backing file name is too long or out of cluster 0")
        raw = cluster0[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
        h.backing_file = raw.decode("utf-8", "surrogateescape")
    if h.data_file_raw and not h.has_data_file:
        raise ImageError(where + "data_file_raw is set but the image has no external data file")
    return h


def _check_features(h: Header, where: str) -> None:
    unknown = h.incompatible_features & ~L.INCOMPAT_KNOWN
    if unknown:
        bits = ", ".join(
            f"bit {b}" + (f" ({h.feature_names[(0, b)]})" if (0, b) in h.feature_names else "")
            for b in range(64)
            if unknown >> b & 1
        )
        raise ImageError(where + f"unsupported incompatible feature {bits} (mask {unknown:#x})")
    has_ct_bit = bool(h.incompatible_features & L.INCOMPAT_COMPRESSION)
    if h.compression_type not in (0, 1):
        raise ImageError(where + f"unknown compression type {h.compression_type}")
    if has_ct_bit != (h.compression_type != 0):
        raise ImageError(where + "compression type field and incompatible bit 3 disagree")


def _check_tables(h: Header, where: str) -> None:
    csize = h.cluster_size
    if h.refcount_table_clusters == 0:
        raise ImageError(where + "Image does not contain a reference count table")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(where + f"Snapshot table too large ({h.nb_snapshots} snapshots)")
    for name in ("l1_table_offset", "refcount_table_offset", "snapshots_offset"):
        value = getattr(h, name)
        if value % csize or value >= MAX_HOST_OFFSET:
            raise ImageError(
                where + f"{name.replace('_', ' ')} {value:#x} is invalid (unaligned or too large)"
            )
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(where + f"active L1 table too large ({h.l1_size} entries)")
    if h.refcount_table_clusters * csize > MAX_REFTABLE_BYTES:
        raise ImageError(where + "refcount table too large")
    entry = 16 if h.extended_l2 else 8
    l2_span = csize * (csize // entry)
    if h.l1_size < -(-h.size // l2_span):
        raise ImageError(where + f"L1 table is too small for a {h.size}-byte disk")
    if h.size >= MAX_HOST_OFFSET:
        raise ImageError(where + "virtual size too large")


def _parse_extensions(h: Header, cluster0: bytes, where: str) -> None:
    pos = h.header_length
    end = h.backing_file_offset or h.cluster_size
    end = min(end, len(cluster0))
    while pos + 8 <= end:
        ext = L.ExtensionHeader.parse(cluster0[pos : pos + 8])
        h.extension_offsets.append(pos)
        if ext.type == L.EXT_END:
            return
        data_start = pos + 8
        if ext.length > end - data_start:
            raise ImageError(where + f"header extension {ext.type:#x} overruns cluster 0")
        data = cluster0[data_start : data_start + ext.length]
        if ext.type == L.EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif ext.type == L.EXT_DATA_FILE:
            h.data_file = data.decode("utf-8", "surrogateescape")
        elif ext.type == L.EXT_FEATURE_TABLE:
            size = L.FEATURE_NAME_ENTRY_SIZE
            for i in range(len(data) // size):
                entry = L.FeatureNameEntry.parse(data[i * size : i * size + size])
                h.feature_names[(entry.type, entry.bit)] = entry.name.rstrip(b"\0").decode("utf-8", "replace")
        elif ext.type == L.EXT_BITMAPS:
            if len(data) != L.BitmapsExtension.sizeof():
                raise ImageError(where + "bitmaps_ext: Invalid extension length")
            b = L.BitmapsExtension.parse(data)
            h.bitmaps = {k: v for k, v in b.items() if k != "_io"}
            h.bitmaps_extension_offset = data_start
            if h.autoclear_features & L.AUTOCLEAR_BITMAPS:
                _check_bitmaps_extension(h, where)
        elif ext.type == L.EXT_CRYPTO:
            if len(data) < 16:
                raise ImageError(where + "crypto header extension is too short")
            c = L.CryptoExtension.parse(data)
            h.crypto = {"offset": c.offset, "length": c.length}
        else:
            h.unknown_extensions.append((ext.type, bytes(data)))
        pos = data_start + ((ext.length + 7) & ~7)


MAX_BITMAPS = 65535  # QEMU's QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS


def _check_bitmaps_extension(h: Header, where: str) -> None:
    """QEMU's checks, in its order and words: an image it refuses, we refuse (a huge count
    would otherwise cost a walk of that many directory entries)."""
    b = h.bitmaps
    if b["reserved"]:
        raise ImageError(where + "bitmaps_ext: Reserved field is not zero")
    if b["nb_bitmaps"] > MAX_BITMAPS:
        raise ImageError(
            where + f"bitmaps_ext: Image has {b['nb_bitmaps']} bitmaps, "
            f"exceeding the QEMU supported maximum of {MAX_BITMAPS}"
        )
    if b["nb_bitmaps"] == 0:
        raise ImageError(where + "found bitmaps extension with zero bitmaps")
    if b["bitmap_directory_offset"] % h.cluster_size:
        raise ImageError(where + "bitmaps_ext: invalid bitmap directory offset")
    if b["bitmap_directory_size"] > MAX_BITMAP_DIRECTORY_SIZE:
        raise ImageError(
            where + f"bitmaps_ext: bitmap directory size ({b['bitmap_directory_size']}) "
            f"exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})"
        )


# -- building cluster 0 of a new image --------------------------------------------------

_FEATURE_TABLE = sorted(L.FEATURE_NAMES.items())  # QEMU's order: incompatible, compatible, autoclear


class HeaderTooLarge(ValueError):
    """Cluster 0 cannot hold the header, its extensions and the backing name."""


def _extension(kind: int, data: bytes) -> bytes:
    pad = -len(data) % 8
    return L.ExtensionHeader.build({"type": kind, "length": len(data)}) + data + bytes(pad)


def build_header(
    *,
    version: int,
    cluster_bits: int,
    size: int,
    l1_size: int,
    l1_offset: int,
    reftable_offset: int,
    reftable_clusters: int,
    incompatible: int,
    compatible: int,
    autoclear: int,
    refcount_order: int,
    compression_type: int,
    backing_file: str | None,
    backing_format: str | None,
    data_file: str | None,
    nb_snapshots: int = 0,
    snapshots_offset: int = 0,
    bitmaps: dict | None = None,
    unknown_extensions: list[tuple[int, bytes]] | tuple = (),
) -> bytes:
    """Cluster 0 as QEMU's qcow2_update_header writes it (extensions in QEMU's order:
    backing format, data file, feature table, bitmaps, then those it does not know, kept).

    Raises :class:`HeaderTooLarge` when it does not fit in one cluster.
    """
    cs = 1 << cluster_bits
    fixed = {
        "version": version,
        "backing_file_offset": 0,
        "backing_file_size": 0,
        "cluster_bits": cluster_bits,
        "size": size,
        "crypt_method": 0,
        "l1_size": l1_size,
        "l1_table_offset": l1_offset,
        "refcount_table_offset": reftable_offset,
        "refcount_table_clusters": reftable_clusters,
        "nb_snapshots": nb_snapshots,
        "snapshots_offset": snapshots_offset,
    }
    body = bytearray()
    if version >= 3:
        body += L.HeaderV3Fields.build(
            {
                "incompatible_features": incompatible,
                "compatible_features": compatible,
                "autoclear_features": autoclear,
                "refcount_order": refcount_order,
                "header_length": L.V3_HEADER_WITH_COMPRESSION,
            }
        )
        body += L.HeaderV3Optional.build({"compression_type": compression_type})
    if backing_format:
        body += _extension(L.EXT_BACKING_FORMAT, backing_format.encode())
    if data_file is not None:
        body += _extension(L.EXT_DATA_FILE, os.fsencode(data_file))
    if version >= 3 and cs > 4096:
        table = b"".join(
            L.FeatureNameEntry.build({"type": kind, "bit": bit, "name": name.encode().ljust(46, b"\0")})
            for (kind, bit), name in _FEATURE_TABLE
        )
        body += _extension(L.EXT_FEATURE_TABLE, table)
    if bitmaps is not None:
        body += _extension(L.EXT_BITMAPS, L.BitmapsExtension.build({**bitmaps, "reserved": 0}))
    for kind, data in unknown_extensions:
        body += _extension(kind, data)
    body += _extension(L.EXT_END, b"")
    if backing_file is not None:
        name = os.fsencode(backing_file)
        fixed["backing_file_offset"] = L.V2_HEADER_LENGTH + len(body)
        fixed["backing_file_size"] = len(name)
        body += name
    out = L.HeaderV2.build(fixed) + body
    if len(out) > cs:
        raise HeaderTooLarge("cluster 0 cannot hold the header and the backing file name")
    return out + bytes(cs - len(out))


def rebuild_header(h: Header) -> bytes:
    """Cluster 0 of an existing image written again from ``h``, as QEMU rewrites it whenever
    the header changes shape (the bitmaps extension appearing or going): QEMU's own
    header length and feature table; the bitmaps extension when ``h.bitmaps`` has bitmaps."""
    bitmaps = h.bitmaps if h.bitmaps and h.bitmaps["nb_bitmaps"] else None
    return build_header(
        version=h.version,
        cluster_bits=h.cluster_bits,
        size=h.size,
        l1_size=h.l1_size,
        l1_offset=h.l1_table_offset,
        reftable_offset=h.refcount_table_offset,
        reftable_clusters=h.refcount_table_clusters,
        incompatible=h.incompatible_features,
        compatible=h.compatible_features,
        autoclear=h.autoclear_features,
        refcount_order=h.refcount_order,
        compression_type=h.compression_type,
        backing_file=h.backing_file,
        backing_format=h.backing_format,
        data_file=h.data_file,
        nb_snapshots=h.nb_snapshots,
        snapshots_offset=h.snapshots_offset,
        bitmaps=bitmaps,
        unknown_extensions=h.unknown_extensions,
    )
