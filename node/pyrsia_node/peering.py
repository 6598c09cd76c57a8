"""The Peer service: signed node descriptions, liveness, and the table of connected peers.

Invariants:
- A NodeInfo is accepted only when its node id is the SHA-256 of its public key, its
  Ed25519 signature over ``node_info_signing_bytes`` verifies, its chain id is ours, and a
  node claiming the authority role holds the key of an authority in force (the genesis
  authorities changed by committed governance records, as the node's ledger knows them;
  without a ledger, the genesis list). A node behind on the chain may refuse a just-added
  authority until it catches up; nothing is lost, the next exchange retries.
  Anything else is dropped and logged with the reason; it never enters the peer table.
- A peer counts as connected while it answered a Ping or Exchange within ``stale_after``.
- Signing bytes are domain-separated and length-prefixed, never the protobuf encoding.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from pyrsia.v1 import peer_pb2, peer_pb2_grpc

from pyrsia_node.genesis import Genesis
from pyrsia_node.identity import Identity, node_id_for, verify_signature

log = logging.getLogger(__name__)

_DOMAIN = b"pyrsia/v1/node-info"
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000


class InvalidNodeInfo(Exception):
    """A NodeInfo failed verification; the message says which check."""


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def node_info_signing_bytes(info: peer_pb2.NodeInfo) -> bytes:
    """Canonical bytes a NodeInfo signature covers (every field but the signature)."""
    parts = [
        _DOMAIN,
        info.chain_id.encode(),
        info.node_id.encode(),
        info.public_key,
        info.role.encode(),
        info.name.encode(),
        info.version.encode(),
        info.grpc_address.encode(),
        info.http_address.encode(),
        info.metrics_address.encode(),
        struct.pack(">Q", info.timestamp_ms),
    ]
    return b"".join(_field(p) for p in parts)


def sign_node_info(info: peer_pb2.NodeInfo, identity: Identity) -> peer_pb2.NodeInfo:
    info.signature = identity.sign(node_info_signing_bytes(info))
    return info


def verify_node_info(
    info: peer_pb2.NodeInfo,
    genesis: Genesis,
    now_ms: int,
    check_freshness: bool,
    is_authority: Callable[[str], bool] | None = None,
) -> None:
    """Raise ``InvalidNodeInfo`` unless ``info`` passes every check in the module invariants.

    ``is_authority(node_id)`` says whether a key is an authority in force; by default, whether
    the genesis lists it."""
    if len(info.public_key) != 32 or node_id_for(info.public_key) != info.node_id:
        raise InvalidNodeInfo(f"node id {info.node_id[:16]} does not match its public key")
    if info.chain_id != genesis.chain_id:
        raise InvalidNodeInfo(f"chain id {info.chain_id!r} is not ours ({genesis.chain_id!r})")
    if not verify_signature(info.public_key, info.signature, node_info_signing_bytes(info)):
        raise InvalidNodeInfo(f"bad signature on node info of {info.node_id[:16]}")
    if info.role not in {"authority", "peer"}:
        raise InvalidNodeInfo(f"unknown role {info.role!r}")
    in_force = is_authority or (lambda node_id: genesis.authority(node_id) is not None)
    if info.role == "authority" and not in_force(info.node_id):
        raise InvalidNodeInfo(f"{info.node_id[:16]} claims the authority role without the key")
    if check_freshness and abs(now_ms - info.timestamp_ms) > MAX_CLOCK_SKEW_MS:
        raise InvalidNodeInfo(f"node info of {info.node_id[:16]} is stale or from the future")


@dataclass(slots=True)
class PeerEntry:
    info: peer_pb2.NodeInfo
    last_seen: float


class PeerTable:
    """Known peers by node id; the single owner of that mutable state."""

    def __init__(self, self_id: str, stale_after: float, clock: Callable[[], float]) -> None:
        self._self_id = self_id
        self._stale_after = stale_after
        self._clock = clock
        self._entries: dict[str, PeerEntry] = {}

    def seen(self, info: peer_pb2.NodeInfo) -> None:
        if info.node_id == self._self_id:
            return
        self._entries[info.node_id] = PeerEntry(info, self._clock())

    def known(self, info: peer_pb2.NodeInfo) -> None:
        """Remember a relayed description without marking the peer alive."""
        if info.node_id != self._self_id and info.node_id not in self._entries:
            self._entries[info.node_id] = PeerEntry(info, float("-inf"))

    def touch(self, node_id: str) -> None:
        entry = self._entries.get(node_id)
        if entry is not None:
            entry.last_seen = self._clock()

    def connected(self) -> list[peer_pb2.NodeInfo]:
        cutoff = self._clock() - self._stale_after
        return [e.info for e in self._entries.values() if e.last_seen >= cutoff]

    def all(self) -> list[peer_pb2.NodeInfo]:
        return [e.info for e in self._entries.values()]


class PeerServicer(peer_pb2_grpc.PeerServicer):
    def __init__(self, peering: Peering) -> None:
        self._peering = peering

    async def Ping(  # noqa: N802 (gRPC method name)
        self, request: peer_pb2.PingRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> peer_pb2.PingResponse:
        self._peering.table.touch(request.node_id)
        return peer_pb2.PingResponse(
            node_id=self._peering.identity.node_id,
            nonce=request.nonce,
            timestamp_ms=int(time.time() * 1000),
        )

    async def Exchange(  # noqa: N802 (gRPC method name)
        self, request: peer_pb2.ExchangeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> peer_pb2.ExchangeResponse:
        try:
            self._peering.accept(request.self, check_freshness=True)
        except InvalidNodeInfo as exc:
            log.warning("rejected node info from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return peer_pb2.ExchangeResponse(
            self=self._peering.self_info(), known=self._peering.table.connected()
        )


ChannelFactory = Callable[[str], grpc.aio.Channel]


class Peering:
    """Keeps this node connected to the network: dials seeds and discovered peers,
    exchanges signed node infos and pings connected peers."""

    def __init__(
        self,
        identity: Identity,
        genesis: Genesis,
        self_info: Callable[[], peer_pb2.NodeInfo],
        seeds: Iterable[str],
        channel_factory: ChannelFactory,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        is_authority: Callable[[str], bool] | None = None,
    ) -> None:
        self.identity = identity
        self.genesis = genesis
        self.is_authority = is_authority
        self.self_info = self_info
        self._seeds = tuple(seeds)
        self._channel_factory = channel_factory
        self._interval = interval
        self.table = PeerTable(identity.node_id, stale_after=3 * interval + 2, clock=clock)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def accept(self, info: peer_pb2.NodeInfo, check_freshness: bool) -> None:
        verify_node_info(
            info, self.genesis, int(time.time() * 1000), check_freshness, self.is_authority
        )
        self.table.seen(info)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channel_factory(address)
            self._channels[address] = channel
        return channel

    async def _exchange(self, address: str) -> None:
        stub = peer_pb2_grpc.PeerStub(self._channel(address))
        reply = await stub.Exchange(
            peer_pb2.ExchangeRequest(self=self.self_info()), timeout=self._interval * 2
        )
        self.accept(reply.self, check_freshness=True)
        for info in reply.known:
            try:
                verify_node_info(info, self.genesis, 0, False, self.is_authority)
            except InvalidNodeInfo as exc:
                log.warning("dropped relayed node info from %s: %s", address, exc)
                continue
            self.table.known(info)

    async def _ping(self, info: peer_pb2.NodeInfo) -> None:
        stub = peer_pb2_grpc.PeerStub(self._channel(info.grpc_address))
        nonce = secrets.randbits(63)
        reply = await stub.Ping(
            peer_pb2.PingRequest(node_id=self.identity.node_id, nonce=nonce),
            timeout=self._interval * 2,
        )
        if reply.nonce == nonce and reply.node_id == info.node_id:
            self.table.touch(info.node_id)

    async def round(self) -> None:
        """One pass: exchange with seeds and with known peers not connected, ping the rest."""
        connected = {i.node_id for i in self.table.connected()}
        connected_addresses = {i.grpc_address for i in self.table.connected()}
        targets: list[asyncio.Task[None]] = []
        for address in self._seeds:
            if address not in connected_addresses:
                targets.append(asyncio.create_task(self._exchange(address)))
        for info in self.table.all():
            if info.node_id in connected:
                targets.append(asyncio.create_task(self._ping(info)))
            elif info.grpc_address not in self._seeds:
                targets.append(asyncio.create_task(self._exchange(info.grpc_address)))
        results = await asyncio.gather(*targets, return_exceptions=True)
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                log.debug("peer call failed: %s", result.details())
            elif isinstance(result, InvalidNodeInfo):
                log.warning("peer rejected: %s", result)
            elif isinstance(result, BaseException):
                raise result

    async def run(self) -> None:
        while True:
            await self.round()
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
