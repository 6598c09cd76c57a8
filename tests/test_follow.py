"""Feeds of a blob while a node downloads it: when a reader may vouch for the bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pyrsia_node import store as store_module
from pyrsia_node.follow import BlobFeed, FeedDetached, FollowedStore
from pyrsia_node.store import BlobStore, DigestMismatch

CHUNK = 1 << 20


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
        await asyncio.sleep(0)


@pytest.fixture
def commit_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every store commit (fsync, rename) until the test sets the event."""
    gate = threading.Event()
    commit = store_module._TempBlob.commit

    def gated(self: store_module._TempBlob) -> None:
        gate.wait(10)
        commit(self)

    monkeypatch.setattr(store_module._TempBlob, "commit", gated)
    yield gate
    gate.set()


async def read_all(feed: BlobFeed) -> bytes:
    return b"".join([bytes(chunk) async for chunk in feed.chunks()])


async def test_a_reader_with_every_byte_is_released_before_the_blob_is_stored(
    tmp_path: Path, commit_gate: threading.Event
) -> None:
    store = FollowedStore(BlobStore(tmp_path))
    data = os.urandom(3 * CHUNK)
    digest = digest_of(data)
    feed = BlobFeed(digest)
    store.register(feed)
    download = asyncio.create_task(store.put_stream(digest, chunks_of(data), len(data)))
    async with asyncio.timeout(10):
        assert await read_all(feed) == data
        await feed.verified()
    assert not store.has(digest)  # the store is still making it durable
    commit_gate.set()
    assert await download == len(data)
    assert store.has(digest)


async def test_a_detached_reader_is_released_only_once_the_blob_is_stored(
    tmp_path: Path, commit_gate: threading.Event
) -> None:
    store = FollowedStore(BlobStore(tmp_path))
    data = os.urandom(3 * CHUNK)
    digest = digest_of(data)
    feed = BlobFeed(digest, limit=CHUNK)
    store.register(feed)
    all_fed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        async for chunk in chunks_of(data):
            yield chunk
        all_fed.set()

    download = asyncio.create_task(store.put_stream(digest, source(), len(data)))
    async with asyncio.timeout(10):
        await all_fed.wait()  # the reader has not started: the download outran it
    assert feed.detached
    with pytest.raises(FeedDetached):
        async with asyncio.timeout(10):
            await read_all(feed)
    released = asyncio.create_task(feed.verified())
    await asyncio.sleep(0.2)
    assert not released.done()  # it must read the rest from the store, which has nothing yet
    commit_gate.set()
    async with asyncio.timeout(10):
        await released
        await download
    assert store.has(digest)


async def test_bytes_that_fail_the_digest_are_never_vouched_for(tmp_path: Path) -> None:
    store = FollowedStore(BlobStore(tmp_path))
    data = os.urandom(2 * CHUNK)
    digest = digest_of(data)
    feed = BlobFeed(digest)
    store.register(feed)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(DigestMismatch):
        await store.put_stream(digest, chunks_of(bad), len(bad))
    async with asyncio.timeout(10):
        assert await read_all(feed) == bad
        with pytest.raises(DigestMismatch):
            await feed.verified()
    assert not store.has(digest)
