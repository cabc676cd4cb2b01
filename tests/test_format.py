"""The format layer alone (no QEMU, no files): codecs, header layout, L2 entry rules.

Expected values come from the qcow2 specification and the worked examples in
shared/reference/qcow2-format.md (§2 header offsets, §5.4 cluster types,
§6 subcluster types, §7.1 compressed descriptors, §8.1 refcount packing),
not from our own output.
"""

from __future__ import annotations

import random

import pytest

from qcow2.errors import ImageError
from qcow2.format import layout as L
from qcow2.format.header import build_header, parse_header
from qcow2.format.l2 import (
    COMPRESSED,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOCATED,
    UNALLOCATED_PLAIN,
    ZERO_ALLOCATED,
    ZERO_PLAIN,
    L2Layout,
    L2Table,
)
from qcow2.format.refblock import RefcountCodec, decode_refcounts, encode_refcounts

WIDTHS = [1, 2, 4, 8, 16, 32, 64]


# --- refcount blocks ---------------------------------------------------------------------


def spec_entry(block: bytes, i: int, bits: int) -> int:
    """§8.1: big-endian integers from 8 bits up; narrower ones from the least significant bits."""
    if bits >= 8:
        w = bits // 8
        return int.from_bytes(block[i * w : i * w + w], "big")
    return (block[i * bits // 8] >> ((i * bits) % 8)) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", WIDTHS)
def test_refcount_codec_round_trip_every_width(bits: int) -> None:
    order = bits.bit_length() - 1
    cluster = 512
    codec = RefcountCodec(order, cluster)
    assert codec.per_block == cluster * 8 // bits and codec.max_value == (1 << bits) - 1
    rng = random.Random(bits)
    values = [
        min(codec.max_value, rng.choice([0, 1, 2, codec.max_value, rng.randrange(codec.max_value + 1)]))
        for _ in range(codec.per_block)
    ]
    block = codec.encode(values)
    assert len(block) == cluster
    assert [spec_entry(block, i, bits) for i in range(codec.per_block)] == values
    assert list(decode_refcounts(block, bits)) == values
    assert list(codec.decode(block)) == values
    # single entries in place: the others stay, the changed byte range covers the entry
    work = bytearray(block)
    for i in rng.sample(range(codec.per_block), 20):
        new = rng.randrange(codec.max_value + 1)
        lo, hi = codec.set(work, i, new)
        values[i] = new
        assert codec.get(work, i) == new == spec_entry(work, i, bits)
        assert lo <= i * bits // 8 < hi <= lo + max(1, bits // 8)
    assert list(codec.decode(work)) == values


def test_refcount_codec_short_values_are_padded_and_sub_byte_packing_is_lsb_first() -> None:
    assert encode_refcounts([1, 0, 1, 1, 0, 0, 0, 1], 1) == bytes([0b10001101])
    assert encode_refcounts([1, 2, 3, 0], 2) == bytes([0b00111001])
    assert encode_refcounts([0xA, 0x5], 4) == bytes([0x5A])
    assert encode_refcounts([1, 0x1234], 16) == b"\x00\x01\x12\x34"
    codec = RefcountCodec(4, 512)  # 16-bit
    assert codec.encode([7]) == b"\x00\x07" + bytes(510)


# --- the header ----------------------------------------------------------------------------

SPEC_OFFSETS = {  # §2.1 / §2.2 / §2.3: byte offset of each field
    "magic": 0,
    "version": 4,
    "backing_file_offset": 8,
    "backing_file_size": 16,
    "cluster_bits": 20,
    "size": 24,
    "crypt_method": 32,
    "l1_size": 36,
    "l1_table_offset": 40,
    "refcount_table_offset": 48,
    "refcount_table_clusters": 56,
    "nb_snapshots": 60,
    "snapshots_offset": 64,
    "incompatible_features": 72,
    "compatible_features": 80,
    "autoclear_features": 88,
    "refcount_order": 96,
    "header_length": 100,
    "compression_type": 104,
}


def test_header_field_offsets_derived_from_the_layout_match_the_spec() -> None:
    assert {name: off for name, (off, _) in L.HEADER_FIELDS.items()} == SPEC_OFFSETS
    assert (L.V2_HEADER_LENGTH, L.V3_HEADER_LENGTH) == (72, 104)
    assert L.header_field_bytes("l1_size", 5) == (36, b"\0\0\0\5")
    assert L.header_field_bytes("incompatible_features", 1) == (72, b"\0" * 7 + b"\1")


def _header(**over) -> bytes:
    fields = dict(
        version=3,
        cluster_bits=16,
        size=1 << 30,
        l1_size=2,
        l1_offset=0x30000,
        reftable_offset=0x10000,
        reftable_clusters=1,
        incompatible=0,
        compatible=0,
        autoclear=0,
        refcount_order=4,
        compression_type=0,
        backing_file=None,
        backing_format=None,
        data_file=None,
    )
    fields.update(over)
    return build_header(**fields)


@pytest.mark.parametrize("version", [2, 3])
def test_header_build_then_parse(version: int) -> None:
    v3 = version == 3
    raw = _header(
        version=version,
        backing_file="base image.qcow2",
        backing_format="qcow2",
        incompatible=(L.INCOMPAT_COMPRESSION | L.INCOMPAT_EXTL2) if v3 else 0,
        compatible=L.COMPAT_LAZY_REFCOUNTS if v3 else 0,
        compression_type=1 if v3 else 0,
        refcount_order=5 if v3 else 4,
        l1_size=4,
    )
    assert len(raw) == 65536 and raw[:4] == b"QFI\xfb"
    h = parse_header(raw, "x.qcow2")
    assert (h.version, h.cluster_size, h.size, h.l1_size, h.l1_table_offset) == (
        version,
        65536,
        1 << 30,
        4,
        0x30000,
    )
    assert (h.refcount_table_offset, h.refcount_table_clusters) == (0x10000, 1)
    assert (h.backing_file, h.backing_format) == ("base image.qcow2", "qcow2")
    if v3:
        assert h.extended_l2 and h.lazy_refcounts and h.compression_type == 1 and h.refcount_order == 5
        assert h.header_length == 112  # QEMU writes the compression byte and its padding
        assert h.feature_names[(0, 4)] == "extended L2 entries"  # the feature table (clusters > 4 KiB)
    else:
        assert h.header_length == 72 and h.refcount_order == 4
        assert raw[h.backing_file_offset : h.backing_file_offset + h.backing_file_size] == b"base image.qcow2"


def test_header_patched_by_field_name_reads_back() -> None:
    raw = bytearray(_header())
    for name, value in (
        ("l1_size", 8),
        ("l1_table_offset", 0x70000),
        ("incompatible_features", L.INCOMPAT_DIRTY),
    ):
        offset, data = L.header_field_bytes(name, value)
        raw[offset : offset + len(data)] = data
    h = parse_header(bytes(raw), "x.qcow2")
    assert (h.l1_size, h.l1_table_offset, h.dirty) == (8, 0x70000, True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cluster_bits", 8, "cluster size"),
        ("version", 4, "version 4"),
        ("crypt_method", 2, "encrypted"),
        ("l1_table_offset", 0x30001, "l1 table offset"),
        ("incompatible_features", 1 << 9, "bit 9"),
    ],
)
def test_header_parse_refuses_with_the_reason(field: str, value: int, message: str) -> None:
    raw = bytearray(_header())
    offset, data = L.header_field_bytes(field, value)
    raw[offset : offset + len(data)] = data
    with pytest.raises(ImageError, match=message):
        parse_header(bytes(raw), "bad.qcow2")


# --- L2 entries ---------------------------------------------------------------------------

STD = L2Layout(16, extended=False, has_data_file=False, version=3)
DATA_FILE = L2Layout(16, extended=False, has_data_file=True, version=3)
EXT = L2Layout(16, extended=True, has_data_file=False, version=3)


@pytest.mark.parametrize(
    ("layout", "entry", "expected"),
    [  # §5.4 and the raw values seen in practice
        (STD, 0, UNALLOCATED_PLAIN),
        (STD, 0x8000000000050000, NORMAL),
        (STD, 0x0000000000050000, NORMAL),  # shared with a snapshot
        (STD, 0x0000000000000001, ZERO_PLAIN),
        (STD, 0x8000000000060001, ZERO_ALLOCATED),
        (STD, 0x4000000000050000, COMPRESSED),
        (DATA_FILE, 0x8000000000000000, NORMAL),  # guest cluster 0 of a data-file image
        (STD, 0x8000000000000000, UNALLOCATED_PLAIN),
        (EXT, 0x0000000000000001, UNALLOCATED_PLAIN),  # bit 0 means nothing with extended L2
    ],
)
def test_cluster_types(layout: L2Layout, entry: int, expected) -> None:
    assert layout.cluster_type(entry) == expected


ALLOC = 0xFFFFFFFF
ZEROS = 0xFFFFFFFF << 32


@pytest.mark.parametrize(
    ("entry", "bitmap", "sc", "expected"),
    [  # §6: (type, subclusters from sc with that type)
        (0x8000000000050000, ALLOC, 0, (NORMAL, 32)),
        (0x8000000000050000, 0x0000FFFF, 3, (NORMAL, 13)),
        (0x8000000000050000, 0x0000FFFF, 16, (UNALLOCATED_ALLOCATED, 16)),
        (0x8000000000050000, 0x000F0000 << 32, 16, (ZERO_ALLOCATED, 4)),
        (0x8000000000050000, (1 << 32) | 1, 0, (INVALID, 0)),  # allocated and zero at once
        (0, 0, 5, (UNALLOCATED_PLAIN, 27)),
        (0, ZEROS, 0, (ZERO_PLAIN, 32)),
        (0, 0x00FF << 32, 8, (UNALLOCATED_PLAIN, 24)),
        (0, 1, 0, (INVALID, 0)),  # allocation bits without a host cluster
        (0x4000000000050000, 0, 7, (COMPRESSED, 25)),
    ],
)
def test_subcluster_types(entry: int, bitmap: int, sc: int, expected) -> None:
    assert EXT.range_type(entry, bitmap, sc) == expected


def test_compressed_descriptor_decoding() -> None:
    # §7.1 worked example, 64 KiB clusters: 747 bytes from 0x50115, ending at the sector boundary
    assert STD.compressed_range(0x4040000000050115) == (0x50115, 747)
    assert STD.compressed_clusters(0x4040000000050115) == (5, 1)
    # 2 MiB clusters: x = 49; 3 extra sectors from 0x1FFF00 cross into the next cluster
    big = L2Layout(21, extended=False, has_data_file=False, version=3)
    entry = (1 << 62) | (3 << 49) | 0x1FFF00
    assert big.compressed_range(entry) == (0x1FFF00, 4 * 512 - 0x100)
    assert big.compressed_clusters(entry) == (0, 2)


def test_l2_table_decodes_whole_and_packs_back() -> None:
    rng = random.Random(7)
    entries = [rng.choice([0, 0, 0x8000000000050000 + (i << 16), 1]) for i in range(EXT.entries)]
    bitmaps = [rng.choice([0, ALLOC, ZEROS]) for _ in range(EXT.entries)]
    raw = b"".join(e.to_bytes(8, "big") + b.to_bytes(8, "big") for e, b in zip(entries, bitmaps, strict=True))
    table = L2Table(raw, extended=True)
    assert list(table.entries) == entries and list(table.bitmaps) == bitmaps
    assert table.used == [i for i in range(EXT.entries) if entries[i] or bitmaps[i]]
    assert table.pack() == raw and table.pack(3, 2) == raw[48:80]
    table.set(0, 0, 0)
    table.set(EXT.entries - 1, 0x8000000000990000, ALLOC)
    assert 0 not in table.used and EXT.entries - 1 in table.used
    assert table.next_used(0) == (table.used[0] if table.used else EXT.entries)
