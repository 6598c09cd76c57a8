"""The block store: every committed block on disk, only the latest in memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from pyrsia_node.consensus import Block, CommitCertificate
from pyrsia_node.consensus.blocks import BlockStore, BlockStoreError

CHAIN = "pyrsia-blocks"


def chain(records_per_block: list[int], size: int = 1000) -> list[tuple[Block, CommitCertificate]]:
    """Blocks 1.. with the given record counts, each record `size` bytes, all distinct."""
    blocks, prev, n = [], bytes(32), 0
    for height, count in enumerate(records_per_block, 1):
        records = tuple(n.to_bytes(8, "big") * (size // 8) for n in range(n, n + count))
        n += count
        block = Block(CHAIN, height, prev, b"\x01" * 32, records)
        blocks.append((block, CommitCertificate(height, 0, block.hash, ())))
        prev = block.hash
    return blocks


def test_blocks_come_back_after_a_reopen_in_order(tmp_path: Path) -> None:
    blocks = chain([3, 0, 5, 1])
    store = BlockStore(tmp_path / "blocks", cache_bytes=0)
    for block, cert in blocks:
        store.append(block, cert)
    for opened in (store, BlockStore(tmp_path / "blocks", cache_bytes=0)):
        assert (opened.height, opened.records) == (4, 9)
        assert [opened.get(h) for h in range(1, 5)] == blocks
        assert list(opened) == blocks
        assert opened.range(2, 2) == blocks[1:3]
        assert opened.range(3, 100) == blocks[2:]
        assert opened.range(5, 10) == []
        with pytest.raises(KeyError):
            opened.get(5)


def test_a_range_can_be_bounded_in_record_bytes(tmp_path: Path) -> None:
    blocks = chain([2, 0, 3, 1, 4])  # records of 1,000 bytes
    store = BlockStore(tmp_path / "blocks", cache_bytes=0)
    for block, cert in blocks:
        store.append(block, cert)
    assert store.range(1, 10, max_bytes=2_500) == blocks[:3]  # 2,000 then 5,000 bytes
    assert store.range(2, 10, max_bytes=1) == blocks[1:3]  # the empty block, then one more
    assert store.range(5, 10, max_bytes=1) == blocks[4:]  # one block at least
    assert store.range(1, 2, max_bytes=10**6) == blocks[:2]
    # A cache of 0 bytes still keeps the last block; a default one keeps these 10 KB.
    assert [store.cached(h) for h in range(1, 6)] == [False] * 4 + [True]
    assert all(BlockStore(tmp_path / "blocks").cached(h) for h in range(1, 6))


def test_record_positions_map_to_heights(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    for block, cert in chain([0, 0, 3, 0, 2], size=8):
        store.append(block, cert)
    # Records 0-2 are in block 3, 3-4 in block 5; index 5 is past the chain.
    assert [store.height_of_record(i) for i in range(6)] == [3, 3, 3, 5, 5, 6]
    assert [store.records_before(h) for h in range(1, 7)] == [0, 0, 0, 3, 3, 5]


def test_appends_must_extend_the_chain(tmp_path: Path) -> None:
    blocks = chain([1, 1])
    store = BlockStore(tmp_path / "blocks")
    store.append(*blocks[0])
    with pytest.raises(BlockStoreError, match="does not follow"):
        store.append(*chain([1, 1, 1])[2])
    other = chain([2, 1])[1]  # height 2 of another chain
    with pytest.raises(BlockStoreError, match="does not extend"):
        store.append(*other)
    store.append(*blocks[1])
    assert store.height == 2


def test_old_blocks_are_read_from_disk_and_checked(tmp_path: Path) -> None:
    """Only the latest blocks stay in memory: an old one is read back from the file, so a
    byte changed there since it was written is noticed, while the latest is still served."""
    blocks = chain([4] * 20)
    store = BlockStore(tmp_path / "blocks", cache_bytes=8_000)  # two blocks of 4 KB
    for block, cert in blocks:
        store.append(block, cert)
    data = bytearray(store.path.read_bytes())
    data[100] ^= 0xFF  # inside block 1's first record
    store.path.write_bytes(bytes(data))
    with pytest.raises(BlockStoreError, match="height 1 changed on disk"):
        store.get(1)
    assert store.get(20) == blocks[19]
    # Reopened, the damaged frame ends the readable chain (as a torn write would).
    assert BlockStore(tmp_path / "blocks").height == 0


def test_memory_does_not_grow_with_the_chain(tmp_path: Path) -> None:
    """4 MB of records appended (each block dropped by the caller once stored) and read
    back by a reopened store: each store holds its 100 KB cache and 16 bytes a height."""
    tracemalloc.start()
    try:
        store = BlockStore(tmp_path / "blocks", cache_bytes=100_000)
        for height in range(1, 401):
            block, cert = chain([10])[0] if height == 1 else next_block(store)
            store.append(block, cert)
        appended, _ = tracemalloc.get_traced_memory()
        reopened = BlockStore(tmp_path / "blocks", cache_bytes=100_000)
        both, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (reopened.height, reopened.records) == (400, 4000)
    assert appended < 400_000
    assert both < 800_000


def next_block(store: BlockStore) -> tuple[Block, CommitCertificate]:
    """A block of 10 distinct 1000-byte records extending `store`'s chain."""
    previous, _ = store.get(store.height)
    records = tuple(n.to_bytes(8, "big") * 125 for n in range(store.records, store.records + 10))
    block = Block(CHAIN, store.height + 1, previous.hash, b"\x01" * 32, records)
    return block, CommitCertificate(block.height, 0, block.hash, ())
