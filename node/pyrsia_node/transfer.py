"""Blob transfer between nodes: the provider side (``TransferServicer``) and the downloader.

Wire contract: ``protos/pyrsia/v1/transfer.proto``. A downloader splits a blob into
segments of whole chunks and reads each segment as one server stream; several providers
serve different segments at once, each with at most ``min(our limit, its max_in_flight)``
streams open.

How bad bytes are caught (the choice, and why): without trusted per-chunk digests a single
chunk cannot be proven right, only the whole blob can. So there are two checks.
1. Every chunk carries the SHA-256 its provider computed over the bytes it read. The
   downloader hashes the first chunk of every Read stream (one chunk in ``segment_chunks``)
   and compares: a mismatch proves that provider (or the path from it) corrupts data, so it
   is dropped at once, penalised, and its segment resumes elsewhere. This check is a fast
   path, never the safety net: a lying provider states the hash of the bytes it sends and
   passes it anyway, and TLS already rejects bytes altered on the way. Hashing every chunk
   would be a second full hash pass over the blob for a check that decides nothing check 2
   does not decide; sampling keeps the quick exit for a provider that corrupts all it
   sends (bad disk or memory after it hashed) at an eighth of the cost.
2. The assembled blob is streamed in order into ``BlobStore.put_stream``, which hashes it
   and makes it visible only if the digest matches. If a single provider contributed, it is
   penalised. If several contributed and the digest fails, nobody can be blamed yet, so the
   download is repeated one provider at a time; a provider whose single-source download
   fails the digest is penalised. So every provider that sends wrong bytes is caught and
   penalised, and honest providers are never penalised for another's lie; a wrong chunk
   that check 1 did not sample costs time (a repeated download), never correctness.

Providers keep the hashes of the chunks they served (``ChunkHashes``), so serving one blob
to many downloaders hashes it once.

A penalised provider is excluded from downloads until its penalty expires (``Penalties``).
A busy provider answers RESOURCE_EXHAUSTED ("busy: ..."); it is replaced by another
provider if there is one and is not penalised.

What it must never do: make partial blobs visible, trust a provider's bytes before the
whole digest matched, or queue a downloader behind a provider's full upload slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import hashlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter
from pyrsia.v1 import transfer_pb2, transfer_pb2_grpc

from pyrsia_node.dht import Provider
from pyrsia_node.store import BlobNotFound, BlobStore, DigestMismatch, StoreError, check_digest

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 2 << 20  # stays well under gRPC's default 4 MiB message limit
BUSY_PREFIX = "busy:"
MAX_BUSY_RETRIES = 50  # busy replies one download tolerates before giving up on them


_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 8 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Let glibc's malloc reuse freed chunk-sized buffers instead of mapping fresh pages.

    Every chunk passes through several megabyte buffers (the read, the encoded message,
    gRPC's own copies). glibc serves such sizes with mmap or trims them back to the kernel
    after free, so each new buffer page-faults and is zeroed again: about 15% of a
    provider's CPU in a profile (``exc_page_fault``, ``clear_page_erms``). Serving sizes
    below ``mmap_threshold`` from the heap and keeping up to ``trim_threshold`` of free heap
    cut the provider's CPU per 256 MiB served by about a third (bench/RESULTS.md). The
    memory kept is bounded by the download window (64 MiB) and the chunks in flight.
    Process-wide and idempotent; returns False where there is no glibc ``mallopt``.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


class TransferError(Exception):
    """Base class of download failures."""


class NoProviders(TransferError):
    def __init__(self, digest: str) -> None:
        super().__init__(
            f"no usable provider for {digest}: none announced it, or all are penalised; "
            "check that a node holding it is connected"
        )
        self.digest = digest


class DownloadFailed(TransferError):
    def __init__(self, digest: str, reasons: Sequence[str]) -> None:
        joined = "; ".join(reasons) or "no provider answered"
        super().__init__(f"download of {digest} failed from every provider: {joined}")
        self.digest = digest
        self.reasons = tuple(reasons)


class _ProviderFailed(Exception):
    """One provider misbehaved or went away during a download."""

    def __init__(self, provider: Provider, reason: str, busy: bool = False) -> None:
        super().__init__(f"{provider.node_id[:16]} ({provider.grpc_address}): {reason}")
        self.provider = provider
        self.busy = busy


class _BadChunk(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class TransferMetrics:
    """Counters of the transfer layer; no labels, so no peer ids or artifact names."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.downloaded_bytes = Counter(
            "pyrsia_transfer_downloaded_bytes",
            "Blob bytes received from peers, before the whole-blob digest check",
            registry=registry,
        )
        self.uploaded_bytes = Counter(
            "pyrsia_transfer_uploaded_bytes", "Blob bytes served to peers", registry=registry
        )
        self.bad_chunks = Counter(
            "pyrsia_transfer_bad_chunks",
            "Chunks whose bytes did not match their stated SHA-256",
            registry=registry,
        )
        self.penalties = Counter(
            "pyrsia_transfer_provider_penalties",
            "Providers penalised for sending bytes that failed verification",
            registry=registry,
        )
        self.replacements = Counter(
            "pyrsia_transfer_provider_replacements",
            "Providers replaced mid-download after an error, a stall or bad bytes",
            registry=registry,
        )
        self.busy_replies = Counter(
            "pyrsia_transfer_busy_replies",
            "Read or Stat calls this node refused because all upload slots were taken",
            registry=registry,
        )


class UploadCounter(Protocol):
    """Whatever publishes the node's in-flight uploads (the ``Node`` itself)."""

    uploads_in_flight: int


Acquire = Callable[[str], Coroutine[object, object, None]]


class ChunkDecodeError(Exception):
    """A Read response that is not a well-formed ``Chunk`` message."""


@dataclass(frozen=True, slots=True)
class ReceivedChunk:
    """A ``Chunk`` decoded straight from its wire bytes (see ``decode_chunk``).

    ``data`` is a view into the received message, not a copy of it.
    """

    offset: int
    data: bytes | memoryview
    sha256: bytes


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(raw):
            raise ChunkDecodeError("truncated varint")
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
        if shift >= 70:
            raise ChunkDecodeError("varint longer than 10 bytes")


def decode_chunk(raw: bytes) -> ReceivedChunk:
    """Decode a serialized ``Chunk`` without copying its data, as protobuf would read it.

    Why not ``Chunk.FromString``: it copies the data into the message, and every read of
    ``chunk.data`` copies it again (upb); a chunk is megabytes. Semantics follow protobuf:
    fields in any order, the last occurrence wins, unknown fields are skipped.
    """
    offset, data, sha256 = 0, memoryview(b""), b""
    view = memoryview(raw)
    pos, size = 0, len(raw)
    while pos < size:
        key, pos = _varint(raw, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ChunkDecodeError("field number 0")
        if wire == 0:
            value, pos = _varint(raw, pos)
            if field == 1:
                offset = value
        elif wire == 2:
            length, pos = _varint(raw, pos)
            end = pos + length
            if end > size:
                raise ChunkDecodeError("truncated length-delimited field")
            if field == 2:
                data = view[pos:end]
            elif field == 3:
                sha256 = raw[pos:end]
            pos = end
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > size:
                raise ChunkDecodeError("truncated fixed-width field")
        else:
            raise ChunkDecodeError(f"unsupported wire type {wire}")
    return ReceivedChunk(offset, data, sha256)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(offset: int, data: bytes | memoryview, sha256: bytes) -> bytes:
    """The wire bytes of ``Chunk(offset, data, sha256)``, with one copy of ``data``.

    Fields in number order, as protobuf writes them; ``decode_chunk`` and protobuf both read
    it (tests/test_transfer_codec.py). The provider builds it in its reader thread, so the
    event loop only hands finished bytes to gRPC.
    """
    head = b"\x08" + _encode_varint(offset) if offset else b""
    if len(data):
        head += b"\x12" + _encode_varint(len(data))
    tail = b"\x1a" + _encode_varint(len(sha256)) + sha256 if sha256 else b""
    return b"".join((head, data, tail))


SERVICE = "pyrsia.v1.Transfer"
READ_METHOD = f"/{SERVICE}/Read"


def _read_chunk(
    handle: BinaryIO, offset: int, size: int, known: bytes | None
) -> tuple[bytes, int, bytes]:
    """Read ``size`` bytes at the handle's position; the encoded ``Chunk``, its data length
    and the data's SHA-256 (``known`` if the hash was computed before)."""
    data = handle.read(size)
    digest = known if known is not None else hashlib.sha256(data).digest()
    return encode_chunk(offset, data, digest), len(data), digest


class ChunkHashes:
    """The SHA-256 of every chunk this node served, for its most recently served blobs.

    A stored blob's bytes never change (the store names them by their digest), so a chunk
    hash computed once stays right, and serving a blob to N downloaders costs one hash pass
    instead of N. Keyed by (offset, length) within a blob, so a range that ends mid-chunk
    never reuses the hash of the whole chunk. If the bytes on disk rotted after the hash was
    taken, the downloader sees a chunk that does not match its stated hash and blames this
    node, which is right: it served bad bytes.
    """

    def __init__(self, max_blobs: int = 256) -> None:
        self.max_blobs = max_blobs
        self._blobs: collections.OrderedDict[str, dict[tuple[int, int], bytes]] = (
            collections.OrderedDict()
        )

    def of(self, digest: str) -> dict[tuple[int, int], bytes]:
        """The (mutable) hash table of one blob; marks the blob as most recently used."""
        table = self._blobs.get(digest)
        if table is None:
            table = self._blobs[digest] = {}
            while len(self._blobs) > self.max_blobs:
                self._blobs.popitem(last=False)
        else:
            self._blobs.move_to_end(digest)
        return table


class TransferServicer:
    """Serves chunks of local blobs, at most ``max_uploads`` streams at once.

    ``acquire`` (authorities only) fetches a blob from its upstream into the store; it runs
    once per digest however many downloaders ask at the same time.
    """

    def __init__(
        self,
        store: BlobStore,
        uploads: UploadCounter,
        metrics: TransferMetrics,
        *,
        max_uploads: int = 32,
        max_in_flight: int = 4,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        acquire: Acquire | None = None,
    ) -> None:
        self._store = store
        self._uploads = uploads
        self._metrics = metrics
        self.max_uploads = max_uploads
        self.max_in_flight = max_in_flight
        self.max_chunk_size = max_chunk_size
        self._acquire = acquire
        self._acquiring: dict[str, asyncio.Task[None]] = {}
        self.chunk_hashes = ChunkHashes()
        self.active = 0
        self.reads_served = 0

    def _busy_message(self) -> str:
        return (
            f"{BUSY_PREFIX} serving {self.active} uploads (limit {self.max_uploads}); "
            "try another provider"
        )

    async def _acquire_once(self, digest: str) -> None:
        assert self._acquire is not None
        task = self._acquiring.get(digest)
        if task is None:
            task = asyncio.create_task(self._acquire(digest), name=f"acquire {digest[:19]}")
            self._acquiring[digest] = task
            task.add_done_callback(lambda _: self._acquiring.pop(digest, None))
        await asyncio.shield(task)

    async def Stat(  # noqa: N802 (gRPC method name)
        self, request: transfer_pb2.StatRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> transfer_pb2.StatResponse:
        try:
            digest = check_digest(request.digest)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self._store.has(digest) and request.acquire and self._acquire is not None:
            try:
                await self._acquire_once(digest)
            except (TransferError, StoreError) as exc:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"{digest} is not here and was not acquired: {exc}"
                )
        try:
            size = self._store.size(digest)
        except BlobNotFound:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"{digest} is not here; ask another provider"
            )
        return transfer_pb2.StatResponse(
            size=size, max_chunk_size=self.max_chunk_size, max_in_flight=self.max_in_flight
        )

    async def Read(  # noqa: N802 (gRPC method name)
        self, request: transfer_pb2.ReadRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[bytes]:
        """Stream the range as encoded ``Chunk`` messages (registered by ``add_to_server``
        with a pass-through serializer)."""
        if self.active >= self.max_uploads:
            self._metrics.busy_replies.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy_message())
        chunk_size = request.chunk_size
        if not 0 < chunk_size <= self.max_chunk_size or request.offset % chunk_size:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk_size must be in (0, {self.max_chunk_size}] and divide the offset",
            )
        try:
            handle = await asyncio.to_thread(self._store.open, check_digest(request.digest))
        except (BlobNotFound, StoreError) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc}; ask another provider")
        self.active += 1
        self._uploads.uploads_in_flight += 1
        self.reads_served += 1
        try:
            size = await asyncio.to_thread(lambda: handle.seek(0, 2))
            end = request.offset + request.length
            if end > size:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE, f"range ends at {end}, blob has {size} bytes"
                )
            await asyncio.to_thread(handle.seek, request.offset)
            hashes = self.chunk_hashes.of(request.digest)
            offset = request.offset
            while offset < end:
                key = (offset, min(chunk_size, end - offset))
                message, length, digest = await asyncio.to_thread(
                    _read_chunk, handle, offset, key[1], hashes.get(key)
                )
                hashes[key] = digest
                yield message
                self._metrics.uploaded_bytes.inc(length)
                offset += length
        finally:
            self.active -= 1
            self._uploads.uploads_in_flight -= 1
            await asyncio.to_thread(handle.close)


def _pass_through(message: bytes) -> bytes:
    return message


def add_to_server(servicer: TransferServicer, server: grpc.aio.Server) -> None:
    """Register the Transfer service; instead of the generated ``add_TransferServicer_to_server``
    because ``Read`` yields chunks already encoded (``encode_chunk``) in its reader thread."""
    handlers = {
        "Stat": grpc.unary_unary_rpc_method_handler(
            servicer.Stat,
            request_deserializer=transfer_pb2.StatRequest.FromString,
            response_serializer=transfer_pb2.StatResponse.SerializeToString,
        ),
        "Read": grpc.unary_stream_rpc_method_handler(
            servicer.Read,
            request_deserializer=transfer_pb2.ReadRequest.FromString,
            response_serializer=_pass_through,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@dataclass(slots=True)
class _PenaltyEntry:
    until: float
    count: int


class Penalties:
    """Providers caught sending bad bytes, excluded until their penalty ends.

    Repeat offenders are excluded for longer: the n-th penalty lasts ``base * 2**(n-1)``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, base: float = 300.0) -> None:
        self._clock = clock
        self._base = base
        self._entries: dict[str, _PenaltyEntry] = {}

    def penalise(self, node_id: str, reason: str) -> None:
        entry = self._entries.get(node_id)
        count = 1 if entry is None else entry.count + 1
        until = self._clock() + self._base * 2 ** (count - 1)
        self._entries[node_id] = _PenaltyEntry(until, count)
        log.warning("penalised provider %s (%d times): %s", node_id[:16], count, reason)

    def is_penalised(self, node_id: str) -> bool:
        entry = self._entries.get(node_id)
        return entry is not None and entry.until > self._clock()

    def count(self, node_id: str) -> int:
        entry = self._entries.get(node_id)
        return 0 if entry is None else entry.count


@dataclass(frozen=True, slots=True)
class DownloadReport:
    digest: str
    size: int
    chunks_by_provider: dict[str, int] = field(default_factory=dict)
    failures: tuple[str, ...] = ()


ChannelFactory = Callable[[str], grpc.aio.Channel]
_ReadMethod = grpc.aio.UnaryStreamMultiCallable[transfer_pb2.ReadRequest, ReceivedChunk]


class Downloader:
    """Fetches blobs from providers into the store. One instance per node."""

    def __init__(
        self,
        store: BlobStore,
        channel: ChannelFactory,
        penalties: Penalties,
        metrics: TransferMetrics,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        segment_chunks: int = 8,
        max_in_flight_per_provider: int = 4,
        max_providers: int = 4,
        stall_timeout: float = 5.0,
        window: int = 64 << 20,
        rpc_timeout: float = 5.0,
        acquire_timeout: float = 600.0,
        busy_backoff: float = 0.2,
    ) -> None:
        self.store = store
        self.channel = channel
        self.penalties = penalties
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.segment_chunks = segment_chunks
        self.max_in_flight_per_provider = max_in_flight_per_provider
        self.max_providers = max_providers
        self.stall_timeout = stall_timeout
        self.window = window
        self.rpc_timeout = rpc_timeout
        self.acquire_timeout = acquire_timeout
        self.busy_backoff = busy_backoff

    def _usable(self, providers: Sequence[Provider]) -> list[Provider]:
        return [p for p in providers if not self.penalties.is_penalised(p.node_id)]

    async def download(
        self, digest: str, providers: Sequence[Provider], acquire: bool = False
    ) -> DownloadReport:
        """Download ``digest`` from ``providers`` (best first) into the store.

        ``acquire`` asks authorities to fetch the blob from upstream when they lack it.
        """
        check_digest(digest)
        usable = self._usable(providers)
        if not usable:
            raise NoProviders(digest)
        attempt = _Attempt(self, digest, usable, self.max_providers, acquire)
        try:
            return await attempt.run()
        except DigestMismatch:
            contributors = attempt.contributors()
            if len(contributors) == 1:
                self._penalise(contributors[0], f"its bytes do not hash to {digest}")
        reasons = list(attempt.failures)
        reasons.append("assembled bytes failed the digest; retrying one provider at a time")
        for provider in self._usable(providers):
            single = _Attempt(self, digest, [provider], 1, acquire)
            try:
                return await single.run()
            except DigestMismatch:
                self._penalise(provider.node_id, f"its bytes do not hash to {digest}")
                reasons.append(f"{provider.node_id[:16]}: bytes failed the digest")
            except DownloadFailed as exc:
                reasons.extend(exc.reasons)
        raise DownloadFailed(digest, reasons)

    def _penalise(self, node_id: str, reason: str) -> None:
        self.metrics.penalties.inc()
        self.penalties.penalise(node_id, reason)


class _Attempt:
    """One download of one blob from a set of providers; the owner of its mutable state."""

    def __init__(
        self,
        downloader: Downloader,
        digest: str,
        providers: Sequence[Provider],
        parallel: int,
        acquire: bool,
    ) -> None:
        self.d = downloader
        self.digest = digest
        self.acquire = acquire
        self.parallel = parallel
        self.spares: collections.deque[Provider] = collections.deque(providers)
        self.failures: list[str] = []
        self.size = -1
        self.chunk_size = downloader.chunk_size
        self.next_offset = 0
        self.pending: list[tuple[int, int]] = []  # heap of (offset, end) not yet taken
        self.buffer: dict[int, bytes | memoryview] = {}
        self.chunks_by_provider: dict[str, int] = {}
        self.changed = asyncio.Condition()
        self.active: set[asyncio.Task[None]] = set()
        self.failed = False
        self.busy_replies = 0

    def contributors(self) -> list[str]:
        return [n for n, count in self.chunks_by_provider.items() if count]

    async def _stat(self, provider: Provider) -> transfer_pb2.StatResponse:
        stub = transfer_pb2_grpc.TransferStub(self.d.channel(provider.grpc_address))
        timeout = self.d.acquire_timeout if self.acquire else self.d.rpc_timeout
        try:
            return await stub.Stat(
                transfer_pb2.StatRequest(digest=self.digest, acquire=self.acquire),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            raise _ProviderFailed(
                provider, f"stat: {exc.code().name} {exc.details()}", busy
            ) from exc

    async def _discover_size(self) -> None:
        while self.spares:
            provider = self.spares.popleft()
            try:
                stat = await self._stat(provider)
            except _ProviderFailed as exc:
                self.failures.append(str(exc))
                continue
            self.size = stat.size
            self.chunk_size = min(self.d.chunk_size, stat.max_chunk_size)
            self.spares.appendleft(provider)
            return
        raise DownloadFailed(self.digest, self.failures)

    async def run(self) -> DownloadReport:
        await self._discover_size()
        segment = self.chunk_size * self.d.segment_chunks
        self.pending = [(o, min(o + segment, self.size)) for o in range(0, self.size, segment)]
        heapq.heapify(self.pending)
        # A small blob is not worth spreading: use only as many providers as it takes to
        # fill their stream slots, the best-ranked first.
        slots = self.d.max_in_flight_per_provider
        wanted = min(self.parallel, len(self.spares), -(-len(self.pending) // slots))
        for _ in range(max(1, wanted)):
            self._activate(self.spares.popleft())
        try:
            await self.d.store.put_stream(self.digest, self._ordered(), max_size=self.size)
        finally:
            for task in list(self.active):
                task.cancel()
            for task in list(self.active):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return DownloadReport(
            self.digest, self.size, dict(self.chunks_by_provider), tuple(self.failures)
        )

    def _activate(self, provider: Provider) -> None:
        task = asyncio.create_task(self._serve_from(provider), name=f"download from {provider}")
        self.active.add(task)
        task.add_done_callback(self.active.discard)

    async def _ordered(self) -> AsyncIterator[bytes | memoryview]:
        while self.next_offset < self.size:
            async with self.changed:
                await self.changed.wait_for(lambda: self.next_offset in self.buffer or self.failed)
                if self.next_offset not in self.buffer:
                    raise DownloadFailed(self.digest, self.failures)
                data = self.buffer.pop(self.next_offset)
                self.next_offset += len(data)
                self.changed.notify_all()
            yield data

    async def _take(self) -> tuple[int, int] | None:
        """The lowest range not yet taken, within the memory window; None when complete."""
        async with self.changed:
            await self.changed.wait_for(
                lambda: (
                    self.next_offset >= self.size
                    or self.failed
                    or (
                        bool(self.pending) and self.pending[0][0] < self.next_offset + self.d.window
                    )
                )
            )
            if self.next_offset >= self.size or self.failed:
                return None
            return heapq.heappop(self.pending)

    async def _give_back(self, offset: int, end: int) -> None:
        if offset < end:
            async with self.changed:
                heapq.heappush(self.pending, (offset, end))
                self.changed.notify_all()

    async def _serve_from(self, provider: Provider) -> None:
        """Run this provider's streams; on failure hand its work to the next provider."""
        try:
            stat = await self._stat(provider)
            if stat.size != self.size:
                raise _ProviderFailed(provider, f"says size {stat.size}, others {self.size}")
            if stat.max_chunk_size < self.chunk_size:
                raise _ProviderFailed(provider, f"max chunk {stat.max_chunk_size} too small")
            slots = max(1, min(self.d.max_in_flight_per_provider, stat.max_in_flight))
            read = self.d.channel(provider.grpc_address).unary_stream(
                READ_METHOD,
                request_serializer=transfer_pb2.ReadRequest.SerializeToString,
                response_deserializer=decode_chunk,
            )
            async with asyncio.TaskGroup() as group:
                for _ in range(slots):
                    group.create_task(self._stream(provider, read))
        except* _ProviderFailed as group_error:
            first = group_error.exceptions[0]
            assert isinstance(first, _ProviderFailed)
            await self._replace(first)

    async def _replace(self, failure: _ProviderFailed) -> None:
        self.failures.append(str(failure))
        provider = failure.provider
        if failure.busy and self.busy_replies < MAX_BUSY_RETRIES:
            self.busy_replies += 1
            self.spares.append(provider)
            if len(self.spares) == 1 and not self.active - {asyncio.current_task()}:
                await asyncio.sleep(self.d.busy_backoff)
        else:
            self.d.metrics.replacements.inc()
            log.info("replacing provider of %s: %s", self.digest[:19], failure)
        if self.spares and self.next_offset < self.size:
            self._activate(self.spares.popleft())
        elif not self.active - {asyncio.current_task()}:
            async with self.changed:
                self.failed = True
                self.changed.notify_all()

    async def _stream(self, provider: Provider, read: _ReadMethod) -> None:
        while (taken := await self._take()) is not None:
            offset, end = taken
            call = read(
                transfer_pb2.ReadRequest(
                    digest=self.digest,
                    offset=offset,
                    length=end - offset,
                    chunk_size=self.chunk_size,
                )
            )
            try:
                chunks = call.__aiter__()
                first = True
                while offset < end:
                    chunk = await asyncio.wait_for(anext(chunks), self.d.stall_timeout)
                    data = chunk.data
                    await self._check(chunk.offset, data, chunk.sha256, offset, end, first)
                    first = False
                    async with self.changed:
                        self.buffer[offset] = data
                        self.chunks_by_provider[provider.node_id] = (
                            self.chunks_by_provider.get(provider.node_id, 0) + 1
                        )
                        self.changed.notify_all()
                    self.d.metrics.downloaded_bytes.inc(len(data))
                    offset += len(data)
            except _BadChunk as exc:
                self.d.metrics.bad_chunks.inc()
                self.d._penalise(provider.node_id, str(exc))
                raise _ProviderFailed(provider, f"bad chunk: {exc}") from exc
            except grpc.aio.AioRpcError as exc:
                busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                raise _ProviderFailed(provider, f"{exc.code().name} {exc.details()}", busy) from exc
            except TimeoutError as exc:
                raise _ProviderFailed(provider, f"stalled for {self.d.stall_timeout}s") from exc
            except StopAsyncIteration as exc:
                raise _ProviderFailed(provider, f"stream ended at {offset} before {end}") from exc
            finally:
                call.cancel()
                # Resume point: every byte before ``offset`` was checked and buffered.
                await self._give_back(offset, end)

    async def _check(
        self,
        chunk_offset: int,
        data: bytes | memoryview,
        stated: bytes,
        offset: int,
        end: int,
        hash_it: bool,
    ) -> None:
        """Place and size of every chunk; its stated hash only when ``hash_it`` (check 1)."""
        expected = min(self.chunk_size, end - offset)
        if chunk_offset != offset or len(data) != expected:
            raise _BadChunk(
                f"chunk at {chunk_offset} with {len(data)} bytes, expected "
                f"{expected} bytes at {offset}"
            )
        if len(stated) != 32:
            raise _BadChunk(f"chunk at {offset} states a hash of {len(stated)} bytes, not 32")
        if not hash_it:
            return
        actual = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        if actual != stated:
            raise _BadChunk(f"chunk at {offset} does not match its stated sha256")
