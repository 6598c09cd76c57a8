"""Peer-to-peer distribution for one node: the DHT, the transfer service, provider choice.

``attach(node)`` builds a ``Distribution`` for a ``Node``; the node registers its gRPC
services before its server starts and starts its background work after. Then
``fetch_blob(digest)`` makes a blob present in the node's store:

1. already in the store: done;
2. otherwise ask the DHT who provides it, rank the providers by their scraped quality
   score (power of two choices, unreachable last) and download from them;
3. only when no peer provides it (or every provider failed): an authority fetches it from
   upstream through its ``origin`` hook, a peer asks the authorities (which do that once
   for any number of concurrent askers) and downloads from them;
4. announce the blob in the DHT, so the next downloader can use this node.

Concurrent ``fetch_blob`` calls for one digest share one download. Every blob in the store
is announced at start and re-announced every ``republish_interval``.

What it must never do: contact an upstream registry from a peer, or make a blob visible
before its digest verified (``BlobStore.put_stream`` guarantees the latter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING

import grpc
from pyrsia.v1 import dht_pb2_grpc

from pyrsia_node.dht import Dht, DhtServicer, Provider
from pyrsia_node.follow import FollowedStore
from pyrsia_node.metrics import ScoreScraper
from pyrsia_node.transfer import (
    Acquire,
    Downloader,
    DownloadFailed,
    NoProviders,
    Penalties,
    TransferError,
    TransferMetrics,
    TransferServicer,
    add_to_server,
    tune_allocator,
)

if TYPE_CHECKING:
    from pyrsia_node.server import Node

log = logging.getLogger(__name__)


class BlobUnavailable(TransferError):
    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"blob {digest} could not be fetched: {reason}")
        self.digest = digest


class Distribution:
    """The distribution side of one node; the single owner of its DHT and downloads."""

    def __init__(
        self,
        node: Node,
        *,
        origin: Acquire | None = None,
        republish_interval: float = 180.0,
        provider_ttl_seconds: int = 600,
        rng: random.Random | None = None,
    ) -> None:
        tune_allocator()  # the node serves and receives megabyte chunks (see its docstring)
        self.node = node
        self.origin = origin
        self.republish_interval = republish_interval
        self._rng = rng or random.Random()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.metrics = TransferMetrics(node.metrics.registry)
        self.dht = Dht(
            node.identity,
            node.genesis,
            node.self_info,
            node.config.bootstrap,
            self._channel,
            ttl_seconds=provider_ttl_seconds,
            republish_interval=republish_interval,
            is_authority=lambda node_id: node_id in node._authorities_in_force(),
        )
        self.penalties = Penalties()
        # The downloader stores through ``followed``, so the registry can stream a blob to
        # a client while it downloads (``pyrsia_node.follow``).
        self.followed = FollowedStore(node.store)
        self.downloader = Downloader(self.followed, self._channel, self.penalties, self.metrics)
        self.transfer = TransferServicer(
            node.store,
            node,
            self.metrics,
            acquire=self._acquire_for_peer if node.config.role == "authority" else None,
        )
        self.scraper = ScoreScraper()
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.node.channel(address)
            self._channels[address] = channel
        return channel

    def register(self, server: grpc.aio.Server) -> None:
        """Add the Dht and Transfer services; call before ``server.start()``."""
        dht_pb2_grpc.add_DhtServicer_to_server(DhtServicer(self.dht), server)
        add_to_server(self.transfer, server)

    async def start(self) -> None:
        """Start joining the DHT and announcing every stored blob; returns at once."""
        self._tasks = [asyncio.create_task(self._maintain(), name="distribution")]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._background, *self._fetching.values()]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.dht.close()
        await self.scraper.close()
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)

    async def _maintain(self) -> None:
        """Keep the routing table fed and every stored blob announced."""
        last_publish = float("-inf")
        while True:
            for info in self.node.peering.table.connected():
                self.dht.learn(info)
            if not len(self.dht.table) and self.dht.seeds:
                await self.dht.bootstrap()
            if len(self.dht.table) and time.monotonic() - last_publish >= self.republish_interval:
                last_publish = time.monotonic()
                self.dht.provided.update(await asyncio.to_thread(self.node.store.digests))
                await self.dht.republish()
            await asyncio.sleep(1.0)

    async def announce(self, digest: str) -> None:
        """Tell the network this node holds ``digest`` (call after storing it)."""
        stored = await self.dht.provide(digest)
        log.info("announced %s to %d nodes", digest[:19], stored)

    async def _acquire_for_peer(self, digest: str) -> None:
        """On an authority, a peer's request for a blob no peer has: fetch it from upstream."""
        if self.origin is None:
            raise BlobUnavailable(digest, "this authority has no upstream origin configured")
        await self.fetch_blob(digest)

    async def fetch_blob(self, digest: str) -> None:
        """Make ``digest`` present in the local store (see the module docstring for how)."""
        if self.node.store.has(digest):
            return
        task = self._fetching.get(digest)
        if task is None:
            task = asyncio.create_task(self._fetch(digest), name=f"fetch {digest[:19]}")
            self._fetching[digest] = task
            task.add_done_callback(lambda _: self._fetching.pop(digest, None))
        await asyncio.shield(task)

    async def _rank(self, providers: list[Provider]) -> list[Provider]:
        by_id = {p.node_id: p for p in providers}
        order = await self.scraper.rank(
            [(p.node_id, p.metrics_address) for p in providers], self._rng
        )
        return [by_id[node_id] for node_id in order]

    def _authorities(self) -> list[Provider]:
        """The authorities in force (genesis changed by committed governance), at the
        addresses their genesis entry or ADD record gives; those without one are skipped."""
        return [
            Provider(a.node_id, a.grpc_address, a.metrics_address, "authority")
            for a in self.node._current_authorities()
            if a.node_id != self.node.identity.node_id and a.grpc_address
        ]

    async def _fetch(self, digest: str) -> None:
        reasons: list[str] = []
        providers = await self.dht.find_providers(digest)
        fetched = False
        if providers:
            try:
                await self.downloader.download(digest, await self._rank(providers))
                fetched = True
            except (NoProviders, DownloadFailed) as exc:
                reasons.append(str(exc))
        if not fetched and self.node.config.role == "authority":
            if self.origin is None:
                raise BlobUnavailable(digest, "no provider, and no upstream origin configured")
            await self.origin(digest)
        elif not fetched:
            authorities = await self._rank(self._authorities())
            try:
                await self.downloader.download(digest, authorities, acquire=True)
            except (NoProviders, DownloadFailed) as exc:
                reasons.append(str(exc))
                raise BlobUnavailable(digest, "; ".join(reasons)) from exc
        task = asyncio.create_task(self._announce_quietly(digest), name="announce")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _announce_quietly(self, digest: str) -> None:
        try:
            await self.announce(digest)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not announce %s: %s", digest[:19], exc.code().name)


def attach(node: Node, origin: Acquire | None = None) -> Distribution:
    """Distribution for ``node``. In ``Node.start()``: ``self.distribution.register(server)``
    before ``server.start()`` and ``await self.distribution.start()`` after it; in
    ``Node.stop()``: ``await self.distribution.stop()`` before the gRPC server stops."""
    return Distribution(node, origin=origin)
