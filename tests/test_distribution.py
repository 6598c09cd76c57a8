"""Whole nodes in one event loop, over mutual TLS on loopback, with distribution attached.

Each node's own ``Distribution`` (attached by ``Node``) is used as is; the authority gets a
counting stand-in for its upstream origin, so the tests can assert the upstream served
each blob exactly once. Everything else (peering, TLS, stores, metrics, DHT) is the real node.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port_block
from pyrsia_node import config
from pyrsia_node.config import Weights
from pyrsia_node.distribution import Distribution
from pyrsia_node.genesis import create_network
from pyrsia_node.server import Node
from pyrsia_node.transfer import TransferServicer

pytestmark = pytest.mark.timeout(90)


def blob(size: int, seed: int) -> tuple[str, bytes]:
    block = hashlib.sha256(f"blob-{seed}".encode()).digest()
    data = bytes((b + i) % 256 for i, b in enumerate(block * (size // 32 + 1)))[:size]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


@dataclass
class Upstream:
    """Stands for the upstream registry: counts how often each blob is requested."""

    blobs: dict[str, bytes]
    requests: Counter[str] = field(default_factory=Counter)


@dataclass
class Cluster:
    nodes: list[Node]
    distributions: list[Distribution]
    upstream: Upstream

    @property
    def authority(self) -> Distribution:
        return self.distributions[0]

    @property
    def peers(self) -> list[Distribution]:
        return self.distributions[1:]


async def start_cluster(root: Path, peers: int, upstream: Upstream) -> Cluster:
    network = create_network(root, authorities=1, peers=peers, base_port=free_port_block(200))
    nodes: list[Node] = []
    distributions: list[Distribution] = []
    for spec in network.nodes:
        node = Node(config.load(spec.config_file, environ={}))

        async def origin(digest: str, node: Node = node) -> None:
            upstream.requests[digest] += 1
            await asyncio.sleep(0.2)  # an upstream round trip, so concurrent askers overlap
            await node.store.put_bytes(digest, upstream.blobs[digest])

        distribution = node.distribution
        if spec.role == "authority":
            distribution.origin = origin
        await node.start()
        nodes.append(node)
        distributions.append(distribution)
    return Cluster(nodes, distributions, upstream)


async def stop_cluster(cluster: Cluster) -> None:
    for node in cluster.nodes:
        await node.stop()


async def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 (polling state owned by other tasks)
            await asyncio.sleep(0.05)
    assert predicate(), what


@pytest.fixture
async def fan_out_cluster(
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    blobs = dict(blob(size, seed) for seed, size in enumerate([3 << 20, 1 << 20, 9_000]))
    cluster = await start_cluster(tmp_path, 8, Upstream(blobs))
    try:
        await wait_for(
            lambda: all(len(d.dht.table) for d in cluster.distributions), 15, "dht joined"
        )
        yield cluster
    finally:
        await stop_cluster(cluster)


async def test_eight_peers_pull_at_once_and_upstream_serves_each_blob_once(
    fan_out_cluster: Cluster,
) -> None:
    cluster = fan_out_cluster
    digests = list(cluster.upstream.blobs)
    await asyncio.wait_for(
        asyncio.gather(*(p.fetch_blob(d) for p in cluster.peers for d in digests)), 60
    )
    assert cluster.upstream.requests == dict.fromkeys(digests, 1)
    for peer in cluster.peers:
        for digest in digests:
            assert await peer.node.store.read(digest) == cluster.upstream.blobs[digest]


async def test_downloaded_blob_is_provided_and_served_by_peers(fan_out_cluster: Cluster) -> None:
    cluster = fan_out_cluster
    digest = next(iter(cluster.upstream.blobs))
    first, second, third = cluster.peers[:3]
    await first.fetch_blob(digest)
    await wait_for(lambda: not first._background, 10, "first peer finished announcing the blob")
    providers = {p.node_id for p in await second.dht.find_providers(digest)}
    assert first.node.identity.node_id in providers
    await second.fetch_blob(digest)
    await wait_for(lambda: not second._background, 10, "second peer announced")
    found = {p.node_id for p in await third.dht.find_providers(digest)}
    assert {first.node.identity.node_id, second.node.identity.node_id} <= found
    await third.fetch_blob(digest)
    assert cluster.upstream.requests[digest] == 1
    assert await third.node.store.read(digest) == cluster.upstream.blobs[digest]


async def test_busy_provider_receives_fewer_requests_than_idle_ones(tmp_path: Path) -> None:
    blobs = dict(blob(64 * 1024, 100 + i) for i in range(12))
    cluster = await start_cluster(tmp_path, 4, Upstream(blobs))
    try:
        providers, downloader = cluster.peers[:3], cluster.peers[3]
        busy = providers[0]
        busy.node.metrics.weights = Weights(cpu=1000.0, network=1.0, disk=1.0, uploads=100.0)
        for provider in providers:
            for digest, data in blobs.items():
                await provider.node.store.put_bytes(digest, data)
        await wait_for(lambda: all(len(d.dht.table) for d in cluster.distributions), 15, "dht")
        for provider in providers:
            await asyncio.gather(*(provider.announce(d) for d in blobs))
        await asyncio.sleep(1.5)  # one load sample, so the busy node's score is high

        for digest, data in blobs.items():
            await downloader.fetch_blob(digest)
            assert await downloader.node.store.read(digest) == data
        reads = [p.transfer.reads_served for p in providers]
        assert reads[0] < min(reads[1:]), f"busy provider served {reads}"
        assert cluster.upstream.requests == Counter()
    finally:
        await stop_cluster(cluster)


def test_attach_builds_services_for_the_node_role(tmp_path: Path) -> None:
    network = create_network(tmp_path, authorities=1, peers=1, base_port=free_port_block(20))
    authority = Node(config.load(network.nodes[0].config_file, environ={}))
    peer = Node(config.load(network.nodes[1].config_file, environ={}))
    authority_services, peer_services = authority.distribution, peer.distribution
    assert isinstance(authority_services.transfer, TransferServicer)
    assert authority_services.transfer._acquire is not None
    assert peer_services.transfer._acquire is None, "peers never acquire from upstream"
