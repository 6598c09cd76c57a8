"""Chunked multi-provider transfer over real gRPC on loopback.

Providers here are bare gRPC servers running the real ``TransferServicer`` over a real
``BlobStore`` (plaintext, so each test stays small); mutual TLS and the DHT are covered by
``test_distribution.py`` with whole nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest
from prometheus_client import CollectorRegistry
from pyrsia.v1 import transfer_pb2, transfer_pb2_grpc
from pyrsia_node.dht import Provider
from pyrsia_node.store import BlobStore
from pyrsia_node.transfer import (
    Downloader,
    DownloadFailed,
    NoProviders,
    Penalties,
    TransferMetrics,
    TransferServicer,
    add_to_server,
    decode_chunk,
    encode_chunk,
)

pytestmark = pytest.mark.timeout(60)
CHUNK = 64 * 1024


@dataclass
class Uploads:
    uploads_in_flight: int = 0


class SlowStore(BlobStore):
    """Reads take ``delay`` seconds per call (in the servicer's worker thread)."""

    delay = 0.0

    def open(self, digest: str) -> BinaryIO:
        handle = super().open(digest)
        delay = self.delay
        original = handle.read

        def slow_read(size: int = -1) -> bytes:
            time.sleep(delay)
            return original(size)

        handle.read = slow_read  # type: ignore[method-assign]
        return handle


class TamperingServicer(TransferServicer):
    """Flips a byte of every chunk after hashing it: corruption on the way."""

    async def Read(  # noqa: N802
        self, request: transfer_pb2.ReadRequest, context: Any
    ) -> AsyncIterator[bytes]:
        async for message in super().Read(request, context):
            chunk = decode_chunk(message)
            data = bytearray(chunk.data)
            data[0] ^= 0xFF
            yield encode_chunk(chunk.offset, data, chunk.sha256)


class SecondChunkTamperingServicer(TransferServicer):
    """Flips a byte of the second chunk of every stream after hashing it."""

    async def Read(  # noqa: N802
        self, request: transfer_pb2.ReadRequest, context: Any
    ) -> AsyncIterator[bytes]:
        index = 0
        async for message in super().Read(request, context):
            chunk = decode_chunk(message)
            data = bytearray(chunk.data)
            if index == 1:
                data[0] ^= 0xFF
            index += 1
            yield encode_chunk(chunk.offset, data, chunk.sha256)


@dataclass
class RunningProvider:
    provider: Provider
    server: grpc.aio.Server
    store: BlobStore
    servicer: TransferServicer


async def start_provider(
    tmp_path: Path,
    name: str,
    blobs: dict[str, bytes],
    store_class: type[BlobStore] = BlobStore,
    servicer_class: type[TransferServicer] = TransferServicer,
    **limits: int,
) -> RunningProvider:
    store = store_class(tmp_path / name)
    for digest, data in blobs.items():
        store.write_sync(digest, [data])
    servicer = servicer_class(store, Uploads(), TransferMetrics(CollectorRegistry()), **limits)
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    node_id = hashlib.sha256(name.encode()).hexdigest()
    provider = Provider(node_id, f"127.0.0.1:{port}", "", "peer")
    return RunningProvider(provider, server, store, servicer)


@pytest.fixture
async def channels() -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    opened: dict[str, grpc.aio.Channel] = {}
    yield opened
    for channel in opened.values():
        await channel.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[grpc.aio.Server]]:
    started: list[grpc.aio.Server] = []
    yield started
    for server in started:
        await server.stop(None)


def downloader(tmp_path: Path, channels: dict[str, grpc.aio.Channel], **options: Any) -> Downloader:
    def channel(address: str) -> grpc.aio.Channel:
        if address not in channels:
            channels[address] = grpc.aio.insecure_channel(address)
        return channels[address]

    options.setdefault("chunk_size", CHUNK)
    return Downloader(
        BlobStore(tmp_path / "downloader"),
        channel,
        Penalties(),
        TransferMetrics(CollectorRegistry()),
        **options,
    )


def blob(size: int, seed: int = 1) -> tuple[str, bytes]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    data = bytes(b ^ (i % 251) for i, b in enumerate(data[:4096])) + data[4096:]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


async def test_download_from_several_providers_assembles_correct_bytes(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(3 * 1024 * 1024 + 123)
    running = [await start_provider(tmp_path, f"p{i}", {digest: data}) for i in range(3)]
    servers.extend(r.server for r in running)
    d = downloader(tmp_path, channels, segment_chunks=2)
    report = await d.download(digest, [r.provider for r in running])
    assert await d.store.read(digest) == data
    assert len(report.chunks_by_provider) == 3, "all three providers should have served"
    assert sum(report.chunks_by_provider.values()) == -(-len(data) // CHUNK)


async def test_never_more_streams_than_the_provider_advertises(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(2 * 1024 * 1024)
    SlowStore.delay = 0.01
    running = await start_provider(
        tmp_path, "p", {digest: data}, store_class=SlowStore, max_in_flight=2
    )
    servers.append(running.server)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, running.servicer.active)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    d = downloader(tmp_path, channels, segment_chunks=1, max_in_flight_per_provider=8)
    await d.download(digest, [running.provider])
    watcher.cancel()
    assert peak == 2
    assert await d.store.read(digest) == data


async def test_killed_provider_is_replaced_and_download_resumes(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(4 * 1024 * 1024, seed=2)
    SlowStore.delay = 0.01
    doomed = await start_provider(tmp_path, "doomed", {digest: data}, store_class=SlowStore)
    backup = await start_provider(tmp_path, "backup", {digest: data})
    servers.append(backup.server)
    d = downloader(tmp_path, channels, max_providers=1, segment_chunks=16)
    download = asyncio.create_task(d.download(digest, [doomed.provider, backup.provider]))
    for _ in range(500):
        if doomed.servicer.reads_served:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)
    await doomed.server.stop(None)
    report = await asyncio.wait_for(download, 20)
    assert await d.store.read(digest) == data
    assert report.chunks_by_provider[doomed.provider.node_id] > 0
    assert report.chunks_by_provider[backup.provider.node_id] > 0
    total_chunks = -(-len(data) // CHUNK)
    assert sum(report.chunks_by_provider.values()) == total_chunks, "nothing fetched twice"
    assert not d.penalties.is_penalised(doomed.provider.node_id)


async def test_stalled_provider_is_replaced(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(512 * 1024, seed=3)
    SlowStore.delay = 5.0
    stalled = await start_provider(tmp_path, "stalled", {digest: data}, store_class=SlowStore)
    good = await start_provider(tmp_path, "good", {digest: data})
    servers.extend([stalled.server, good.server])
    d = downloader(tmp_path, channels, max_providers=1, stall_timeout=0.3)
    started = time.monotonic()
    report = await d.download(digest, [stalled.provider, good.provider])
    assert time.monotonic() - started < 4
    assert await d.store.read(digest) == data
    assert report.chunks_by_provider == {good.provider.node_id: 8}


async def test_chunk_not_matching_its_hash_gets_provider_penalised(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(1024 * 1024, seed=4)
    bad = await start_provider(tmp_path, "bad", {digest: data}, servicer_class=TamperingServicer)
    good = await start_provider(tmp_path, "good", {digest: data})
    servers.extend([bad.server, good.server])
    d = downloader(tmp_path, channels)
    report = await d.download(digest, [bad.provider, good.provider])
    assert await d.store.read(digest) == data
    assert d.penalties.is_penalised(bad.provider.node_id)
    assert not d.penalties.is_penalised(good.provider.node_id)
    assert bad.provider.node_id not in report.chunks_by_provider
    assert d.metrics.bad_chunks._value.get() >= 1


async def test_provider_with_consistently_wrong_bytes_is_found_by_the_whole_digest(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    """The liar hashes its wrong bytes correctly; only the blob digest can expose it.

    One byte of every chunk is wrong, so whichever segments the liar serves are wrong (with
    one wrong byte, the honest provider could serve that segment and nothing be caught)."""
    digest, data = blob(1024 * 1024, seed=5)
    liar = await start_provider(tmp_path, "liar", {})
    wrong = bytearray(data)
    for offset in range(1000, len(wrong), CHUNK):
        wrong[offset] ^= 1
    path = liar.store.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(wrong))
    honest = await start_provider(tmp_path, "honest", {digest: data})
    servers.extend([liar.server, honest.server])
    d = downloader(tmp_path, channels, segment_chunks=2)
    await d.download(digest, [liar.provider, honest.provider])
    assert await d.store.read(digest) == data
    assert d.penalties.is_penalised(liar.provider.node_id)
    assert not d.penalties.is_penalised(honest.provider.node_id)
    assert not any(p.name.startswith(str(os.getpid())) for p in (d.store.root / "tmp").iterdir())


async def test_corruption_the_chunk_sample_misses_is_caught_by_the_whole_digest(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    """Only the first chunk of a stream is hashed; the rest are covered by the blob digest."""
    digest, data = blob(1024 * 1024, seed=7)
    bad = await start_provider(
        tmp_path, "bad", {digest: data}, servicer_class=SecondChunkTamperingServicer
    )
    good = await start_provider(tmp_path, "good", {digest: data})
    servers.extend([bad.server, good.server])
    d = downloader(tmp_path, channels, segment_chunks=2)
    await d.download(digest, [bad.provider, good.provider])
    assert await d.store.read(digest) == data
    assert d.penalties.is_penalised(bad.provider.node_id)
    assert not d.penalties.is_penalised(good.provider.node_id)


async def test_nothing_partial_is_visible_when_every_provider_fails(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(256 * 1024, seed=6)
    bad = await start_provider(tmp_path, "bad", {digest: data}, servicer_class=TamperingServicer)
    servers.append(bad.server)
    d = downloader(tmp_path, channels)
    with pytest.raises(DownloadFailed, match="does not match its stated sha256"):
        await d.download(digest, [bad.provider])
    assert not d.store.has(digest)
    with pytest.raises(NoProviders, match="penalised"):
        await d.download(digest, [bad.provider])


async def test_busy_provider_says_try_another(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(128 * 1024, seed=7)
    busy = await start_provider(tmp_path, "busy", {digest: data}, max_uploads=0)
    idle = await start_provider(tmp_path, "idle", {digest: data})
    servers.extend([busy.server, idle.server])
    async with grpc.aio.insecure_channel(busy.provider.grpc_address) as channel:
        call = transfer_pb2_grpc.TransferStub(channel).Read(
            transfer_pb2.ReadRequest(digest=digest, offset=0, length=10, chunk_size=CHUNK)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (caught.value.details() or "").startswith("busy:")
    assert "try another provider" in (caught.value.details() or "")

    d = downloader(tmp_path, channels, max_providers=1)
    report = await asyncio.wait_for(d.download(digest, [busy.provider, idle.provider]), 10)
    assert report.chunks_by_provider == {idle.provider.node_id: 2}
    assert not d.penalties.is_penalised(busy.provider.node_id)
    assert busy.servicer.reads_served == 0


async def test_uploads_in_flight_are_counted_on_the_node(
    tmp_path: Path, channels: dict[str, grpc.aio.Channel], servers: list[grpc.aio.Server]
) -> None:
    digest, data = blob(1024 * 1024, seed=8)
    SlowStore.delay = 0.02
    running = await start_provider(tmp_path, "p", {digest: data}, store_class=SlowStore)
    servers.append(running.server)
    uploads = running.servicer._uploads
    seen = 0

    async def watch() -> None:
        nonlocal seen
        while True:
            seen = max(seen, uploads.uploads_in_flight)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    d = downloader(tmp_path, channels, segment_chunks=2)
    await d.download(digest, [running.provider])
    watcher.cancel()
    assert seen >= 1
    assert uploads.uploads_in_flight == 0


async def test_provider_without_the_blob_answers_not_found(
    tmp_path: Path, servers: list[grpc.aio.Server]
) -> None:
    """Also when it is an authority whose upstream cannot supply it: NOT_FOUND, not UNKNOWN."""
    digest, _ = blob(1024, seed=9)

    async def failing_acquire(wanted: str) -> None:
        raise NoProviders(wanted)

    store = BlobStore(tmp_path / "authority")
    servicer = TransferServicer(
        store, Uploads(), TransferMetrics(CollectorRegistry()), acquire=failing_acquire
    )
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servers.append(server)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = transfer_pb2_grpc.TransferStub(channel)
        for acquire in (False, True):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Stat(transfer_pb2.StatRequest(digest=digest, acquire=acquire))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no usable provider" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Read(
                transfer_pb2.ReadRequest(digest=digest, offset=0, length=10, chunk_size=CHUNK)
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
