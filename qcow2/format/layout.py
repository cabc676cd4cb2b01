"""On-disk structures of qcow2, declared like the spec's tables.

The ``construct`` definitions are the one description of the header and of
the structures read once (extensions, snapshot and bitmap directories); the
byte offset of every header field is derived from them (:data:`HEADER_FIELDS`),
so code that patches a field names it instead of hard-coding where it lives.
Per-entry hot paths (L1/L2/refcount tables) use precompiled ``struct``
formats and arrays instead (see :mod:`.l2` and :mod:`.refblock`).
"""

from __future__ import annotations

import struct

from construct import (
    Bytes,
    Const,
    Construct,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
    this,
)

MAGIC = b"QFI\xfb"

# Header, bytes 0-71: common to v2 and v3.
HeaderV2 = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

# Header, bytes 72-103: mandatory in v3.
HeaderV3Fields = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

# Header, bytes 104-111: optional (present when header_length says so); QEMU writes all 8.
HeaderV3Optional = Struct(
    "compression_type" / Int8ub,
    Padding(7),
)


def _field_offsets(*parts: Struct) -> dict[str, tuple[int, Construct]]:
    """Each named field of consecutive fixed-size structs: (byte offset, its construct)."""
    fields: dict[str, tuple[int, Construct]] = {}
    pos = 0
    for part in parts:
        for sub in part.subcons:
            if sub.name:
                fields[sub.name] = (pos, sub)
            pos += sub.sizeof()
    return fields


HEADER_FIELDS = _field_offsets(HeaderV2, HeaderV3Fields, HeaderV3Optional)
V2_HEADER_LENGTH = HeaderV2.sizeof()  # 72
V3_HEADER_LENGTH = V2_HEADER_LENGTH + HeaderV3Fields.sizeof()  # 104
V3_HEADER_WITH_COMPRESSION = V3_HEADER_LENGTH + HeaderV3Optional.sizeof()  # 112, what QEMU writes
COMPRESSION_TYPE_OFFSET = HEADER_FIELDS["compression_type"][0]


def header_field_bytes(name: str, value: int) -> tuple[int, bytes]:
    """Where header field ``name`` lives and its on-disk bytes for ``value``."""
    offset, sub = HEADER_FIELDS[name]
    return offset, sub.build(value)


# Header extension: type, length, data padded to 8 bytes.
ExtensionHeader = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FeatureNameEntry = Struct(
    "type" / Int8ub,  # 0 incompatible, 1 compatible, 2 autoclear
    "bit" / Int8ub,
    "name" / Bytes(46),  # NUL-padded; any bytes (QEMU prints them as they are)
)
FEATURE_NAME_ENTRY_SIZE = FeatureNameEntry.sizeof()

BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,  # must be 0
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

BitmapDirectoryEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
    "extra_data" / Bytes(this.extra_data_size),
    "name" / Bytes(this.name_size),
)
BITMAP_ENTRY_FIXED_SIZE = 24  # the fields before extra_data

CryptoExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
)
SNAPSHOT_FIXED_SIZE = 40  # the fields before extra_data

# The start of a snapshot's extra data, as far as QEMU knows it (it keeps whatever follows).
SnapshotExtraData = Struct(
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,  # 2**64-1: none recorded
)
SNAPSHOT_EXTRA_SIZE = SnapshotExtraData.sizeof()  # 24, what QEMU writes

# Feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

# L1/L2/refcount-table entry masks (QEMU's names in comments).
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF
SUBCLUSTER_ZERO_MASK = 0xFFFFFFFF << 32
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_ALL_ONES = 1

U64 = struct.Struct(">Q")
