"""The downloader's own ``Chunk`` decoder and the provider's chunk-hash cache."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrsia.v1 import transfer_pb2
from pyrsia_node.transfer import (
    ChunkDecodeError,
    ChunkHashes,
    ReceivedChunk,
    decode_chunk,
    encode_chunk,
    tune_allocator,
)

chunks = st.builds(
    transfer_pb2.Chunk,
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=2048),
    sha256=st.binary(max_size=40),
)


@given(st.lists(chunks, min_size=1, max_size=3))
def test_decoder_reads_what_protobuf_reads_including_merged_messages(
    parts: list[transfer_pb2.Chunk],
) -> None:
    # Concatenated messages merge in protobuf: the last occurrence of each field wins.
    raw = b"".join(part.SerializeToString() for part in parts)
    expected = transfer_pb2.Chunk.FromString(raw)
    assert decode_chunk(raw) == ReceivedChunk(expected.offset, expected.data, expected.sha256)


@given(chunks)
def test_encoder_writes_what_protobuf_writes(chunk: transfer_pb2.Chunk) -> None:
    raw = encode_chunk(chunk.offset, chunk.data, chunk.sha256)
    assert raw == chunk.SerializeToString(deterministic=True)
    assert decode_chunk(raw) == ReceivedChunk(chunk.offset, chunk.data, chunk.sha256)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@given(chunks, st.integers(4, 2**29 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=16))
def test_unknown_fields_of_every_wire_type_are_skipped(
    chunk: transfer_pb2.Chunk, field: int, number: int, value: bytes
) -> None:
    unknown = (
        varint(field << 3 | 0) + varint(number)
        + varint(field << 3 | 1) + number.to_bytes(8, "little")
        + varint(field << 3 | 2) + varint(len(value)) + value
        + varint(field << 3 | 5) + (number & 0xFFFFFFFF).to_bytes(4, "little")
    )  # fmt: skip
    raw = unknown + chunk.SerializeToString() + unknown
    parsed = transfer_pb2.Chunk.FromString(raw)
    assert (parsed.offset, parsed.data, parsed.sha256) == (chunk.offset, chunk.data, chunk.sha256)
    assert decode_chunk(raw) == ReceivedChunk(chunk.offset, chunk.data, chunk.sha256)


@given(chunks.filter(lambda c: len(c.data) > 0))
def test_truncated_message_is_refused(chunk: transfer_pb2.Chunk) -> None:
    raw = transfer_pb2.Chunk(data=chunk.data, sha256=chunk.sha256).SerializeToString()
    cut = raw[: 2 + len(chunk.data) // 2]
    with pytest.raises(ChunkDecodeError, match="truncated"):
        decode_chunk(cut)


def test_group_wire_type_is_refused() -> None:
    with pytest.raises(ChunkDecodeError, match="wire type 3"):
        decode_chunk(bytes([0x0B]))


def test_chunk_hashes_are_kept_per_blob_and_range_and_oldest_blob_goes_first() -> None:
    hashes = ChunkHashes(max_blobs=2)
    first = hashes.of("sha256:" + "a" * 64)
    first[(0, 4)] = hashlib.sha256(b"abcd").digest()
    assert hashes.of("sha256:" + "a" * 64)[(0, 4)] == hashlib.sha256(b"abcd").digest()
    assert (0, 3) not in hashes.of("sha256:" + "a" * 64)  # a shorter range is another key
    hashes.of("sha256:" + "b" * 64)
    hashes.of("sha256:" + "a" * 64)  # most recently used again
    hashes.of("sha256:" + "c" * 64)  # evicts b, the least recently used
    assert hashes.of("sha256:" + "a" * 64)[(0, 4)] == hashlib.sha256(b"abcd").digest()
    assert hashes.of("sha256:" + "b" * 64) == {}


def test_allocator_tuning_applies_where_glibc_is() -> None:
    libc = ctypes.util.find_library("c")
    assert tune_allocator() is (libc is not None and hasattr(ctypes.CDLL(libc), "mallopt"))
