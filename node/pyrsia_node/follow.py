"""Following a blob while this node downloads it, so a client need not wait for the end.

``FollowedStore`` is the node's blob store as its peer-to-peer downloader sees it: every
``put_stream`` also hands the bytes, in order, to the ``BlobFeed`` objects registered for
that digest. The registry uses a feed to stream a cold layer to the pulling client while
the download from the authorities is still running (``follow_blob``).

Invariants:
- A feed's bytes are *unverified* until ``BlobFeed.verified`` returns: it returns only
  after the store accepted the whole blob (its SHA-256 matched the digest) and raises
  otherwise. The registry holds the last chunk back until then, so a client never gets a
  complete body of bytes whose digest failed; the download is stored and announced only
  after verification, as without a feed.
- Memory is bounded: a reader more than ``limit`` bytes behind the download is detached
  (the download never waits for a client) and reads the rest from the store once verified.
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

    def end(self, error: BaseException | None) -> None:
        """The download stored the blob (``error`` None) or failed with ``error``."""
        if not self.detached:
            self._queue.put_nowait(None)
        if self._verified.done():
            return
        if error is None:
            self._verified.set_result(None)
        else:
            self._verified.set_exception(error)
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
        """Return once the store accepted the whole blob; raise what the download raised."""
        await asyncio.shield(self._verified)


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
        self, digest: str, chunks: AsyncIterable[Chunk], max_size: int | None = None
    ) -> int:
        # A feed follows one download: a repeated attempt (after a digest failure) is not fed.
        feeds = self._feeds.pop(digest, [])
        if not feeds:
            return await super().put_stream(digest, chunks, max_size)
        for feed in feeds:
            if max_size is not None:
                feed.start(max_size)

        async def tee() -> AsyncIterator[Chunk]:
            async for chunk in chunks:
                for feed in feeds:
                    feed.feed(chunk)
                yield chunk

        try:
            size = await super().put_stream(digest, tee(), max_size)
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
