"""Kademlia: who is close to a key, and who provides a blob.

The core is pure and synchronous: ``RoutingTable`` (k-buckets over XOR distance),
``Lookup`` (the iterative FIND_NODE / FIND_PROVIDERS state machine with alpha queries in
flight) and ``ProviderStore`` (provider records with expiry, on an injected wall clock).
``Dht`` is the thin asyncio/gRPC driver around them and ``DhtServicer`` answers the wire
calls of ``protos/pyrsia/v1/dht.proto``.

Invariants:
- Every contact enters the routing table from a signed NodeInfo that passed
  ``peering.verify_node_info``, so an address in the table is bound to its node id.
- A provider record is stored or used only when its own signature verifies with the
  provider's public key, its embedded NodeInfo verifies, and it is neither expired nor
  issued in the future: nobody can announce another node as a provider, nor point a record
  at an address the provider did not sign.
- Keys are 256-bit: a node's is its node id, a blob's is the hex of its sha256 digest.

What it must never do: hold blob bytes or decide which provider to download from (that is
``transfer`` and ``metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass

import grpc
from pyrsia.v1 import dht_pb2, dht_pb2_grpc, peer_pb2, peer_pb2_grpc

from pyrsia_node.genesis import Genesis
from pyrsia_node.identity import Identity, verify_signature
from pyrsia_node.peering import InvalidNodeInfo, verify_node_info
from pyrsia_node.store import check_digest

log = logging.getLogger(__name__)

KEY_BITS = 256
K = 20
ALPHA = 3
MAX_TTL_SECONDS = 24 * 3600
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
_RECORD_DOMAIN = b"pyrsia/v1/provider-record"


class InvalidProviderRecord(Exception):
    """A provider record failed verification; the message says which check."""


def node_key(node_id: str) -> int:
    """The 256-bit key of a node: its id (hex SHA-256 of its public key)."""
    if len(node_id) != 64:
        raise ValueError(f"node id {node_id[:16]!r} is not 64 hex characters")
    return int(node_id, 16)


def digest_key(digest: str) -> int:
    """The 256-bit key of a blob: the hex part of its sha256 digest."""
    return int(check_digest(digest)[7:], 16)


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(self_key: int, key: int) -> int:
    """Index of the k-bucket holding ``key``: bucket i covers distances in [2^i, 2^(i+1))."""
    if self_key == key:
        raise ValueError("a node never stores itself in its routing table")
    return distance(self_key, key).bit_length() - 1


@dataclass(frozen=True, slots=True)
class Contact:
    """A verified node: its id, where to reach it, and its signed NodeInfo to relay."""

    node_id: str
    grpc_address: str
    metrics_address: str
    role: str
    info: bytes  # serialized signed NodeInfo

    @property
    def key(self) -> int:
        return node_key(self.node_id)

    @classmethod
    def from_info(cls, info: peer_pb2.NodeInfo) -> Contact:
        return cls(
            info.node_id,
            info.grpc_address,
            info.metrics_address,
            info.role,
            info.SerializeToString(deterministic=True),
        )

    def node_info(self) -> peer_pb2.NodeInfo:
        return peer_pb2.NodeInfo.FromString(self.info)


class RoutingTable:
    """k-buckets, least-recently seen first. The single owner of routing state.

    Kademlia's rule for a full bucket: the newcomer waits in the bucket's replacement cache
    and the least-recently seen contact is returned so the caller can probe it; a live one
    is kept (``observe`` it again), a dead one is ``remove``d and the newest replacement
    takes its place. Old, proven contacts are never evicted by a flood of new ones.
    """

    def __init__(self, self_id: str, k: int = K) -> None:
        self.self_key = node_key(self_id)
        self.k = k
        self._buckets: list[list[Contact]] = [[] for _ in range(KEY_BITS)]
        self._replacements: list[list[Contact]] = [[] for _ in range(KEY_BITS)]

    def observe(self, contact: Contact) -> Contact | None:
        """Record that ``contact`` was seen alive; returns a contact to probe, if any."""
        if contact.key == self.self_key:
            return None
        index = bucket_index(self.self_key, contact.key)
        bucket = self._buckets[index]
        for position, known in enumerate(bucket):
            if known.node_id == contact.node_id:
                del bucket[position]
                bucket.append(contact)
                return None
        if len(bucket) < self.k:
            bucket.append(contact)
            return None
        replacements = [c for c in self._replacements[index] if c.node_id != contact.node_id]
        replacements.append(contact)
        self._replacements[index] = replacements[-self.k :]
        return bucket[0]

    def remove(self, node_id: str) -> None:
        """Drop an unresponsive contact; the most recent replacement takes its place."""
        key = node_key(node_id)
        if key == self.self_key:
            return
        index = bucket_index(self.self_key, key)
        bucket = self._buckets[index]
        kept = [c for c in bucket if c.node_id != node_id]
        if len(kept) == len(bucket):
            self._replacements[index] = [
                c for c in self._replacements[index] if c.node_id != node_id
            ]
            return
        self._buckets[index] = kept
        if self._replacements[index]:
            kept.append(self._replacements[index].pop())

    def get(self, node_id: str) -> Contact | None:
        key = node_key(node_id)
        if key == self.self_key:
            return None
        for contact in self._buckets[bucket_index(self.self_key, key)]:
            if contact.node_id == node_id:
                return contact
        return None

    def bucket(self, index: int) -> list[Contact]:
        return list(self._buckets[index])

    def contacts(self) -> list[Contact]:
        return [c for bucket in self._buckets for c in bucket]

    def closest(self, key: int, n: int) -> list[Contact]:
        return sorted(self.contacts(), key=lambda c: distance(c.key, key))[:n]

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets)


class Lookup:
    """The iterative lookup of Kademlia as a state machine, fed responses, returning queries.

    Candidates are ordered by distance to the target. At most ``alpha`` queries are in
    flight; the next queries go to the closest candidates not yet asked among the ``k``
    closest that have not failed. The lookup is finished when none is in flight and every
    one of the ``k`` closest non-failed candidates has answered.
    """

    def __init__(
        self, target: int, seeds: Iterable[Contact], self_id: str, k: int = K, alpha: int = ALPHA
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self._self_id = self_id
        self._candidates: dict[str, Contact] = {}
        self._state: dict[str, str] = {}  # node id -> "new" | "pending" | "answered" | "failed"
        self._add(seeds)

    def _add(self, contacts: Iterable[Contact]) -> None:
        for contact in contacts:
            if contact.node_id != self._self_id and contact.node_id not in self._candidates:
                self._candidates[contact.node_id] = contact
                self._state[contact.node_id] = "new"

    def _shortlist(self) -> list[Contact]:
        alive = [c for c in self._candidates.values() if self._state[c.node_id] != "failed"]
        return sorted(alive, key=lambda c: distance(c.key, self.target))[: self.k]

    @property
    def in_flight(self) -> int:
        return sum(1 for state in self._state.values() if state == "pending")

    def next_queries(self) -> list[Contact]:
        """Contacts to query now; each is marked in flight."""
        room = self.alpha - self.in_flight
        chosen: list[Contact] = []
        for contact in self._shortlist():
            if room <= 0:
                break
            if self._state[contact.node_id] == "new":
                self._state[contact.node_id] = "pending"
                chosen.append(contact)
                room -= 1
        return chosen

    def on_response(self, node_id: str, contacts: Iterable[Contact]) -> None:
        if self._state.get(node_id) != "pending":
            return
        self._state[node_id] = "answered"
        self._add(contacts)

    def on_failure(self, node_id: str) -> None:
        if self._state.get(node_id) == "pending":
            self._state[node_id] = "failed"

    @property
    def finished(self) -> bool:
        if self.in_flight:
            return False
        return all(self._state[c.node_id] == "answered" for c in self._shortlist())

    def closest(self) -> list[Contact]:
        """The ``k`` closest contacts that answered, nearest first."""
        answered = [c for c in self._candidates.values() if self._state[c.node_id] == "answered"]
        return sorted(answered, key=lambda c: distance(c.key, self.target))[: self.k]


@dataclass(frozen=True, slots=True)
class Provider:
    """A node that signed a statement that it holds a blob."""

    node_id: str
    grpc_address: str
    metrics_address: str
    role: str


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    provider: Provider
    expires_ms: int
    record: bytes  # serialized signed ProviderRecord, relayed as is


def provider_record_signing_bytes(
    chain_id: str, digest: str, node_id: str, issued_ms: int, ttl_seconds: int
) -> bytes:
    """Canonical bytes a provider record's signature covers; never the protobuf encoding."""
    parts = [
        _RECORD_DOMAIN,
        chain_id.encode(),
        digest.encode(),
        node_id.encode(),
        struct.pack(">QI", issued_ms, ttl_seconds),
    ]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def sign_provider_record(
    identity: Identity,
    chain_id: str,
    digest: str,
    self_info: peer_pb2.NodeInfo,
    issued_ms: int,
    ttl_seconds: int,
) -> dht_pb2.ProviderRecord:
    signing = provider_record_signing_bytes(
        chain_id, digest, identity.node_id, issued_ms, ttl_seconds
    )
    return dht_pb2.ProviderRecord(
        digest=digest,
        provider=self_info,
        issued_ms=issued_ms,
        ttl_seconds=ttl_seconds,
        signature=identity.sign(signing),
    )


def verify_provider_record(
    record: dht_pb2.ProviderRecord,
    genesis: Genesis,
    now_ms: int,
    is_authority: Callable[[str], bool] | None = None,
) -> ProviderEntry:
    """The record as a stored entry, or ``InvalidProviderRecord`` naming the failed check.
    ``is_authority``: as in ``peering.verify_node_info`` (default: the genesis list)."""
    try:
        check_digest(record.digest)
        verify_node_info(record.provider, genesis, now_ms, False, is_authority)
    except (InvalidNodeInfo, ValueError) as exc:
        raise InvalidProviderRecord(f"provider record for {record.digest[:20]}: {exc}") from exc
    info = record.provider
    if not 0 < record.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidProviderRecord(f"ttl {record.ttl_seconds}s outside (0, {MAX_TTL_SECONDS}]")
    expires_ms = record.issued_ms + record.ttl_seconds * 1000
    if record.issued_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise InvalidProviderRecord(f"record by {info.node_id[:16]} is issued in the future")
    if expires_ms <= now_ms:
        raise InvalidProviderRecord(f"record by {info.node_id[:16]} has expired")
    signing = provider_record_signing_bytes(
        genesis.chain_id, record.digest, info.node_id, record.issued_ms, record.ttl_seconds
    )
    if not verify_signature(info.public_key, record.signature, signing):
        raise InvalidProviderRecord(
            f"record for {record.digest[:20]} is not signed by its provider {info.node_id[:16]}"
        )
    provider = Provider(info.node_id, info.grpc_address, info.metrics_address, info.role)
    return ProviderEntry(provider, expires_ms, record.SerializeToString(deterministic=True))


class ProviderStore:
    """Provider records by blob digest, each kept until it expires (wall-clock ms)."""

    def __init__(self, wall_ms: Callable[[], int], max_per_digest: int = K) -> None:
        self._wall_ms = wall_ms
        self._max = max_per_digest
        self._entries: dict[str, dict[str, ProviderEntry]] = {}

    def add(self, digest: str, entry: ProviderEntry) -> bool:
        """Store or refresh a record; returns False when the digest already has enough."""
        providers = self._entries.setdefault(digest, {})
        current = providers.get(entry.provider.node_id)
        if current is None and len(self.get(digest)) >= self._max:
            return False
        if current is None or entry.expires_ms >= current.expires_ms:
            providers[entry.provider.node_id] = entry
        return True

    def get(self, digest: str) -> list[ProviderEntry]:
        now = self._wall_ms()
        return [e for e in self._entries.get(digest, {}).values() if e.expires_ms > now]

    def expire(self) -> int:
        """Forget expired records; returns how many were dropped."""
        now, dropped = self._wall_ms(), 0
        for digest in list(self._entries):
            providers = self._entries[digest]
            for node_id in [n for n, e in providers.items() if e.expires_ms <= now]:
                del providers[node_id]
                dropped += 1
            if not providers:
                del self._entries[digest]
        return dropped


def _wall_ms() -> int:
    return int(time.time() * 1000)


ChannelFactory = Callable[[str], grpc.aio.Channel]
_Query = Callable[
    [Contact], Coroutine[object, object, tuple[list[peer_pb2.NodeInfo], list[ProviderEntry]]]
]


class Dht:
    """The asyncio driver: runs lookups over gRPC, announces and republishes provider records."""

    def __init__(
        self,
        identity: Identity,
        genesis: Genesis,
        self_info: Callable[[], peer_pb2.NodeInfo],
        seeds: Sequence[str],
        channel_factory: ChannelFactory,
        *,
        k: int = K,
        alpha: int = ALPHA,
        ttl_seconds: int = 600,
        republish_interval: float = 180.0,
        rpc_timeout: float = 2.0,
        wall_ms: Callable[[], int] = _wall_ms,
        is_authority: Callable[[str], bool] | None = None,
    ) -> None:
        self.identity = identity
        self.genesis = genesis
        self.is_authority = is_authority
        self.self_info = self_info
        self.seeds = tuple(seeds)
        self.k = k
        self.alpha = alpha
        self.ttl_seconds = ttl_seconds
        self.republish_interval = republish_interval
        self.rpc_timeout = rpc_timeout
        self._wall_ms = wall_ms
        self._channel_factory = channel_factory
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.table = RoutingTable(identity.node_id, k)
        self.providers = ProviderStore(wall_ms, max_per_digest=k)
        self.provided: set[str] = set()
        self._probes: set[asyncio.Task[None]] = set()

    def now_ms(self) -> int:
        return self._wall_ms()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channel_factory(address)
            self._channels[address] = channel
        return channel

    def _stub(self, address: str) -> dht_pb2_grpc.DhtAsyncStub:
        return dht_pb2_grpc.DhtStub(self._channel(address))

    def learn(self, info: peer_pb2.NodeInfo, check_freshness: bool = False) -> Contact | None:
        """Verify a NodeInfo and put its node in the routing table; None if it fails."""
        if info.node_id == self.identity.node_id:
            return None
        try:
            verify_node_info(
                info, self.genesis, self._wall_ms(), check_freshness, self.is_authority
            )
        except InvalidNodeInfo as exc:
            log.warning("dht dropped contact: %s", exc)
            return None
        contact = Contact.from_info(info)
        oldest = self.table.observe(contact)
        if oldest is not None:
            task = asyncio.create_task(self._probe(oldest), name="dht-probe")
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        return contact

    async def _probe(self, contact: Contact) -> None:
        """Kademlia's eviction check: keep the oldest contact if it answers, else replace it."""
        stub = peer_pb2_grpc.PeerStub(self._channel(contact.grpc_address))
        try:
            reply = await stub.Ping(
                peer_pb2.PingRequest(node_id=self.identity.node_id, nonce=1),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError:
            self.table.remove(contact.node_id)
            return
        if reply.node_id == contact.node_id:
            self.table.observe(contact)
        else:
            self.table.remove(contact.node_id)

    async def bootstrap(self) -> None:
        """Ask every seed for the nodes closest to us, then look ourselves up."""

        async def ask(address: str) -> None:
            reply = await self._stub(address).FindNode(
                dht_pb2.FindNodeRequest(sender=self.self_info(), target=self.identity.node_id),
                timeout=self.rpc_timeout,
            )
            self.learn(reply.responder, check_freshness=True)
            for info in reply.closest:
                self.learn(info)

        results = await asyncio.gather(*(ask(a) for a in self.seeds), return_exceptions=True)
        for address, result in zip(self.seeds, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                log.info("dht seed %s unreachable: %s", address, result.code().name)
            elif isinstance(result, BaseException):
                raise result
        await self.find_node(self.table.self_key)

    async def _lookup(self, target: int, query: _Query, enough: Callable[[], bool]) -> Lookup:
        lookup = Lookup(
            target, self.table.closest(target, self.k), self.identity.node_id, self.k, self.alpha
        )
        pending: dict[asyncio.Task[tuple[list[peer_pb2.NodeInfo], list[ProviderEntry]]], str] = {}
        try:
            while not enough():
                for contact in lookup.next_queries():
                    pending[asyncio.create_task(query(contact))] = contact.node_id
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node_id = pending.pop(task)
                    error = task.exception()
                    if error is None:
                        infos, _ = task.result()
                        learned = [c for c in (self.learn(i) for i in infos) if c is not None]
                        lookup.on_response(node_id, learned)
                    elif isinstance(error, grpc.aio.AioRpcError | InvalidNodeInfo):
                        lookup.on_failure(node_id)
                        self.table.remove(node_id)
                    else:
                        raise error
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
        return lookup

    async def find_node(self, target: int) -> list[Contact]:
        async def query(contact: Contact) -> tuple[list[peer_pb2.NodeInfo], list[ProviderEntry]]:
            reply = await self._stub(contact.grpc_address).FindNode(
                dht_pb2.FindNodeRequest(sender=self.self_info(), target=f"{target:064x}"),
                timeout=self.rpc_timeout,
            )
            return list(reply.closest), []

        lookup = await self._lookup(target, query, lambda: False)
        return lookup.closest()

    async def find_providers(self, digest: str, want: int = K) -> list[Provider]:
        """Providers of ``digest`` other than this node: local records first, then the network."""
        found: dict[str, Provider] = {}

        def collect(entries: Iterable[ProviderEntry]) -> None:
            for entry in entries:
                if entry.provider.node_id != self.identity.node_id:
                    found.setdefault(entry.provider.node_id, entry.provider)

        collect(self.providers.get(digest))

        async def query(contact: Contact) -> tuple[list[peer_pb2.NodeInfo], list[ProviderEntry]]:
            reply = await self._stub(contact.grpc_address).FindProviders(
                dht_pb2.FindProvidersRequest(sender=self.self_info(), digest=digest),
                timeout=self.rpc_timeout,
            )
            entries: list[ProviderEntry] = []
            for record in reply.providers:
                if record.digest != digest:
                    continue
                try:
                    entries.append(
                        verify_provider_record(
                            record, self.genesis, self._wall_ms(), self.is_authority
                        )
                    )
                except InvalidProviderRecord as exc:
                    log.warning(
                        "dht dropped provider record from %s: %s", contact.node_id[:16], exc
                    )
            for entry in entries:
                self.providers.add(digest, entry)
            collect(entries)
            return list(reply.closest), entries

        await self._lookup(digest_key(digest), query, lambda: len(found) >= want)
        return list(found.values())

    def _record(self, digest: str) -> dht_pb2.ProviderRecord:
        return sign_provider_record(
            self.identity,
            self.genesis.chain_id,
            digest,
            self.self_info(),
            self._wall_ms(),
            self.ttl_seconds,
        )

    async def provide(self, digest: str) -> int:
        """Announce that this node holds ``digest``; returns how many nodes stored the record."""
        self.provided.add(check_digest(digest))
        record = self._record(digest)
        closest = await self.find_node(digest_key(digest))

        async def announce(contact: Contact) -> bool:
            reply = await self._stub(contact.grpc_address).AddProvider(
                dht_pb2.AddProviderRequest(sender=self.self_info(), record=record),
                timeout=self.rpc_timeout,
            )
            return bool(reply.stored)

        results = await asyncio.gather(*(announce(c) for c in closest), return_exceptions=True)
        stored = 0
        for contact, result in zip(closest, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                log.info("dht add-provider to %s failed: %s", contact.node_id[:16], result.code())
            elif isinstance(result, BaseException):
                raise result
            elif result:
                stored += 1
        return stored

    async def republish(self) -> None:
        """Re-announce every blob this node provides and forget expired records."""
        self.providers.expire()
        for digest in sorted(self.provided):
            await self.provide(digest)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.republish_interval)
            await self.republish()

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)


class DhtServicer(dht_pb2_grpc.DhtServicer):
    def __init__(self, dht: Dht) -> None:
        self._dht = dht

    def _closest(self, key: int) -> list[peer_pb2.NodeInfo]:
        return [c.node_info() for c in self._dht.table.closest(key, self._dht.k)]

    async def FindNode(  # noqa: N802 (gRPC method name)
        self, request: dht_pb2.FindNodeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> dht_pb2.FindNodeResponse:
        self._dht.learn(request.sender, check_freshness=True)
        try:
            target = node_key(request.target)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return dht_pb2.FindNodeResponse(
            responder=self._dht.self_info(), closest=self._closest(target)
        )

    async def FindProviders(  # noqa: N802 (gRPC method name)
        self,
        request: dht_pb2.FindProvidersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> dht_pb2.FindProvidersResponse:
        self._dht.learn(request.sender, check_freshness=True)
        try:
            key = digest_key(request.digest)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        records = [
            dht_pb2.ProviderRecord.FromString(e.record)
            for e in self._dht.providers.get(request.digest)
        ]
        return dht_pb2.FindProvidersResponse(
            responder=self._dht.self_info(), providers=records, closest=self._closest(key)
        )

    async def AddProvider(  # noqa: N802 (gRPC method name)
        self,
        request: dht_pb2.AddProviderRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> dht_pb2.AddProviderResponse:
        self._dht.learn(request.sender, check_freshness=True)
        try:
            entry = verify_provider_record(
                request.record, self._dht.genesis, self._dht.now_ms(), self._dht.is_authority
            )
        except InvalidProviderRecord as exc:
            log.warning("rejected provider record from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        stored = self._dht.providers.add(request.record.digest, entry)
        return dht_pb2.AddProviderResponse(stored=stored)
