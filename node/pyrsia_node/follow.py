"""Following a blob while this node downloads it, so a client need not wait for the end.

``FollowedStore`` is the node's blob store as its peer-to-peer downloader sees it: every
``put_stream`` also hands the bytes, in order, to the ``BlobFeed`` objects registered for
that digest. The registry uses a feed to stream a cold layer to the pulling client while
the download from the authorities is still running (``follow_blob``).

Invariants:
- A feed's bytes are *unverified* until ``BlobFeed.verified`` returns: it returns only
  after the whole blob's SHA-256 matched the digest and raises otherwise. The registry
  holds the last chunk back until then, so a client never gets a complete body of bytes
  whose digest failed; the download is stored and announced only after verification, as
  without a feed. A reader that has every byte is not kept waiting for the store's fsync
  and rename (the store makes the blob durable after the digest matched).
- Memory is bounded: a reader more than ``limit`` bytes behind the download is detached
  (the download never waits for a client) and reads the rest from the store: for it,
  ``verified`` returns only once the store holds the blob.
- A feed follows one download; one registered after that download began storing is never
  fed and reports so (``BlobFeed.size`` stays unresolved until the fetch ends).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pyrsia_node.store import BlobStore

DEFAULT_LIMIT = 32 << 20
Chunk = bytes | memoryview  # a memoryview here views immutable bytes: safe to keep


class FeedDetached(Exception):
    """The reader fell too far behind the download; read the rest from the store."""


class BlobFeed:
    """The bytes of one blob as a download stores them (see the module invariants)."""

    def __init__(self, digest: str, limit: int = DEFAULT_LIMIT) -> None:
        self.digest = digest
        self.limit = limit
        loop = asyncio.get_running_loop()
        self.size: asyncio.Future[int] = loop.create_future()
        self._verified: asyncio.Future[None] = loop.create_future()
        self._stored: asyncio.Future[None] = loop.create_future()
        for outcome in (self._verified, self._stored):
            outcome.add_done_callback(_consume)  # a reader that left never awaits them
        self._queue: asyncio.Queue[Chunk | None] = asyncio.Queue()
        self._buffered = 0
        self.detached = False

    def feed(self, chunk: Chunk) -> None:
        if self.detached:
            return
        if self._buffered + len(chunk) > self.limit:
            self.detached = True
            self._queue.put_nowait(None)
            return
        self._buffered += len(chunk)
        self._queue.put_nowait(chunk)

    def start(self, size: int) -> None:
        if not self.size.done():
            self.size.set_result(size)

    def verify(self) -> None:
        """The whole blob was fed and its digest matched (it is not stored yet)."""
        if not self._verified.done():
            if not self.detached:
                self._queue.put_nowait(None)
            self._verified.set_result(None)

    def end(self, error: BaseException | None) -> None:
        """The download stored the blob (``error`` None) or failed with ``error``."""
        if not self._verified.done():
            if not self.detached:
                self._queue.put_nowait(None)
            if error is None:
                self._verified.set_result(None)
            else:
                self._verified.set_exception(error)
        if not self._stored.done():
            if error is None:
                self._stored.set_result(None)
            else:
                self._stored.set_exception(error)
        if not self.size.done():
            self.size.cancel()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The bytes in order until the end of the blob; raises ``FeedDetached`` when the
        reader fell behind (the bytes yielded so far stay valid)."""
        while (chunk := await self._queue.get()) is not None:
            self._buffered -= len(chunk)
            yield chunk
        if self.detached:
            raise FeedDetached(self.digest)

    async def verified(self) -> None:
        """Return once the whole blob's digest matched, and for a detached reader (it reads
        the rest from the store) once the store holds it; raise what the download raised."""
        await asyncio.shield(self._verified)
        if self.detached:
            await asyncio.shield(self._stored)


class FollowedStore(BlobStore):
    """``store`` as a downloader sees it: ``put_stream`` also feeds registered feeds."""

    def __init__(self, store: BlobStore) -> None:
        super().__init__(store.root, store.verify_on_read)
        self._feeds: dict[str, list[BlobFeed]] = {}

    def register(self, feed: BlobFeed) -> None:
        self._feeds.setdefault(feed.digest, []).append(feed)

    def unregister(self, feed: BlobFeed) -> None:
        feeds = self._feeds.get(feed.digest, [])
        if feed in feeds:
            feeds.remove(feed)
        if not feeds:
            self._feeds.pop(feed.digest, None)

    async def put_stream(
        self,
        digest: str,
        chunks: AsyncIterable[Chunk],
        max_size: int | None = None,
        *,
        verified: Callable[[], None] | None = None,
    ) -> int:
        # A feed follows one download: a repeated attempt (after a digest failure) is not fed.
        feeds = self._feeds.pop(digest, [])
        if not feeds:
            return await super().put_stream(digest, chunks, max_size, verified=verified)
        for feed in feeds:
            if max_size is not None:
                feed.start(max_size)

        async def tee() -> AsyncIterator[Chunk]:
            async for chunk in chunks:
                for feed in feeds:
                    feed.feed(chunk)
                yield chunk

        def verify() -> None:
            for feed in feeds:
                feed.verify()
            if verified is not None:
                verified()

        try:
            size = await super().put_stream(digest, tee(), max_size, verified=verify)
        except BaseException as exc:
            for feed in feeds:
                feed.end(exc)
            raise
        for feed in feeds:
            feed.end(None)
        return size


Follow = Callable[[str], Awaitable[BlobFeed | None]]


def follower(
    store: FollowedStore, fetch: Callable[[str], Awaitable[None]], limit: int = DEFAULT_LIMIT
) -> Follow:
    """The registry's ``follow``: start ``fetch(digest)`` with a feed registered for it and
    return the feed once the download begins storing (its ``size`` is known), or None once
    the blob became present without a download this feed could follow. Raises what
    ``fetch`` raised when it failed before that."""

    async def follow(digest: str) -> BlobFeed | None:
        feed = BlobFeed(digest, limit)
        store.register(feed)
        fetching = asyncio.ensure_future(fetch(digest))
        waiting: set[asyncio.Future[Any]] = {fetching, feed.size}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fetching.cancel()
            store.unregister(feed)
            raise
        if feed.size.done() and not feed.size.cancelled():
            # The feed reports the outcome (``verified``); the fetch's own is not needed.
            fetching.add_done_callback(_consume)
            return feed
        store.unregister(feed)
        await fetching
        return None

    return follow


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def read_from(path: Path, offset: int, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
    """The bytes of ``path`` from ``offset`` on, read in a worker thread."""

    async def chunks() -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    return chunks()
