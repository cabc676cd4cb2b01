"""On-disk structures of qcow2, declared like the spec's tables.

Used where a structure is read once (header, extensions, snapshot and bitmap
directories).  Per-entry hot paths (L1/L2/refcount tables) use the
precompiled ``struct`` formats at the bottom instead.
"""

from __future__ import annotations

import struct

from construct import (
    Bytes,
    Const,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PaddedString,
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

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
COMPRESSION_TYPE_OFFSET = 104  # one byte, present when header_length > 104

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
    "name" / PaddedString(46, "ascii"),
)

BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    Padding(4),
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

# L1/L2 entry masks (QEMU's names in comments).
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

U64 = struct.Struct(">Q")
