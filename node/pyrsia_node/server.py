"""Wiring: one node process. Starts the gRPC server (mutual TLS unless the debugging flag
says otherwise), the HTTP server (health, admin API, OCI pull API), the metrics server and
the background loops, and stops all of them on SIGTERM/SIGINT within a few seconds.

The image mirror path is joined here: the registry serves what the ledger-backed catalog
vouches for, fetches missing bytes through peer-to-peer distribution and asks an authority
for a build when a tag is unknown; authorities acquire, attest and agree (``build``), and
consensus admits an artifact record only when enough authorities attested it.

What it must never do: hold domain logic. Everything it starts lives in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import grpc
from aiohttp import web
from pyrsia.v1 import build_pb2_grpc, peer_pb2, peer_pb2_grpc

from pyrsia_node import __version__, api, identity
from pyrsia_node.api.builds import routes as build_routes
from pyrsia_node.api.consensus import routes as consensus_routes
from pyrsia_node.api.ledger import routes as ledger_routes
from pyrsia_node.build import (
    BuildClient,
    BuildCoordinator,
    BuildServicer,
    ImageAcquirer,
    attestation_threshold,
    authorities_at,
    record_validator,
    registry_builds,
    remote_acquirer,
)
from pyrsia_node.catalog import LedgerCatalog
from pyrsia_node.config import NodeConfig
from pyrsia_node.consensus import ConsensusConfig
from pyrsia_node.consensus.messages import Block, CommitCertificate
from pyrsia_node.consensus.service import ConsensusService, GrpcTransport
from pyrsia_node.distribution import BlobUnavailable, attach
from pyrsia_node.follow import follower
from pyrsia_node.genesis import Authority, Genesis, GenesisError, Upstream
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.log import LogError
from pyrsia_node.metrics import LoadSampler, NodeMetrics
from pyrsia_node.peering import Peering, PeerServicer, sign_node_info
from pyrsia_node.registry import ContentUnavailable
from pyrsia_node.registry import routes as registry_routes
from pyrsia_node.store import BlobStore
from pyrsia_node.tls import TARGET_NAME, NodeTls
from pyrsia_node.transfer import TransferError

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 2.0


class Node:
    """A running node. Construct, ``await start()``, ``await stop()``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.genesis = Genesis.load(config.genesis_path)
        self.identity = identity.load_or_create(config.data_dir)
        if config.role == "authority" and self.genesis.authority(self.identity.node_id) is None:
            # An authority added after genesis starts this way: it follows the chain and
            # takes part once a committed governance ADD names its key (signed by the
            # governance key, so a role setting alone never makes a node an authority).
            log.warning(
                "this node's key (%s) is not an authority in the genesis %s: it follows the "
                "chain and takes part once a governance ADD record for it commits",
                self.identity.node_id[:16],
                config.genesis_path,
            )
        self.store = BlobStore(config.data_dir / "blobs")
        self.ledger = TransparencyLog(config.data_dir / "ledger")
        self.metrics = NodeMetrics(config.weights, config.role, __version__)
        self.tls = (
            None
            if config.insecure_plaintext
            else NodeTls.load(config.data_dir / "keys", self.genesis.ca_certificate.encode())
        )
        self.peering = Peering(
            self.identity,
            self.genesis,
            self.self_info,
            config.bootstrap,
            self.channel,
            interval=1.0,
            is_authority=lambda node_id: node_id in self._authorities_in_force(),
        )
        self.catalog = LedgerCatalog(self.ledger, config.data_dir / "catalog.sqlite3")
        # The node-id -> key map of the authorities it was built for (see
        # `_authorities_in_force`).
        self._in_force_ids: tuple[tuple[bytes, ...], Mapping[str, bytes]] = ((), {})
        self.consensus = ConsensusService(
            self.identity,
            self.genesis,
            config.data_dir / "consensus",
            self.ledger,
            GrpcTransport(
                self.identity,
                self.genesis.chain_id,
                self.channel,
                lambda: int(time.time() * 1000),
            ),
            config=ConsensusConfig(self.genesis.chain_id),
            registry=self.metrics.registry,
            record_valid=record_validator(
                self._authorities_in_force, self._threshold, on_valid=self.catalog.checked
            ),
            on_commit=self._on_commit,
        )
        self._authorities_cache: tuple[int, list[Authority]] = (-1, [])
        self.uploads_in_flight = 0
        # Peer-to-peer blob distribution (DHT + transfer). An authority holds the blobs of
        # the images it acquired in builds; its origin refuses anything else, so no blob
        # is ever fetched from upstream outside an attested acquisition.
        self.distribution = attach(self)
        self.acquirer: ImageAcquirer | None = None
        self.builds: BuildCoordinator | None = None
        if config.role == "authority":
            self.distribution.origin = self._not_acquired
            self.acquirer = ImageAcquirer(
                self.identity,
                self.store,
                self._upstreams(),
                self.distribution.announce,
                registry=self.metrics.registry,
                chain_id=self.genesis.chain_id,
                authorities=self._authorities_in_force,
            )
            self.builds = BuildCoordinator(
                self.identity.node_id,
                self._current_authorities,
                self._threshold,
                remote_acquirer(
                    self.identity.node_id, self.acquirer, self.channel, config.build_timeout
                ),
                self.consensus.submit,
                self._committed_index,
                acquire_timeout=config.build_timeout,
                commit_timeout=config.build_timeout,
            )
        self.build_client = BuildClient(self._current_authorities, self.channel, self.builds)
        self._background: set[asyncio.Task[None]] = set()
        self._started = False
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []

    def self_info(self) -> peer_pb2.NodeInfo:
        info = peer_pb2.NodeInfo(
            node_id=self.identity.node_id,
            public_key=self.identity.public_key,
            role=self.config.role,
            name=self.config.name,
            chain_id=self.genesis.chain_id,
            version=__version__,
            grpc_address=self.config.grpc_address,
            http_address=self.config.http_address,
            metrics_address=self.config.metrics_address,
            timestamp_ms=int(time.time() * 1000),
        )
        return sign_node_info(info, self.identity)

    def channel(self, address: str) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(address)
        return grpc.aio.secure_channel(
            address,
            self.tls.channel_credentials(),
            options=[("grpc.ssl_target_name_override", TARGET_NAME)],
        )

    def _upstreams(self) -> dict[str, Upstream]:
        """The genesis upstreams by registry name, with this node's URL overrides."""
        overrides = dict(self.config.upstream_overrides)
        unknown = sorted(set(overrides) - {u.name for u in self.genesis.upstreams})
        if unknown:
            raise GenesisError(
                f"upstream_overrides names {', '.join(unknown)}, which the genesis does not "
                "list as upstreams; override only registries the network mirrors"
            )
        return {
            u.name: Upstream(u.name, overrides.get(u.name, u.url), u.insecure)
            for u in self.genesis.upstreams
        }

    def _authorities_in_force(self) -> Mapping[str, bytes]:
        """The authorities in force (``ConsensusService.authorities_in_force``: the ledger's
        set at its size, a governance change included from the commit of its block), node
        id -> public key: whose attestations count in the record check, against whose number
        the threshold is taken, whose Acquire requests are served. The map is rebuilt only
        when the set changes (every record check asks)."""
        keys = self.consensus.authorities_in_force()
        if keys != self._in_force_ids[0]:
            self._in_force_ids = (keys, {identity.node_id_for(k): k for k in keys})
        return self._in_force_ids[1]

    def _threshold(self, authorities: int) -> int:
        return attestation_threshold(self.genesis, authorities)

    def _current_authorities(self) -> list[Authority]:
        """The authorities in force at the ledger's size, with the addresses their genesis
        entry or governance ADD record gives (``build.authorities_at``); cached per size."""
        size = self.ledger.size
        if self._authorities_cache[0] != size:
            governance = [(i, self.ledger.entry(i)) for i in self.ledger.governance_indexes(size)]
            self._authorities_cache = (size, authorities_at(self.genesis, governance, size))
        return list(self._authorities_cache[1])

    async def _committed_index(self, record_hash: bytes) -> int | None:
        try:
            return await asyncio.to_thread(self.ledger.index_of, record_hash)
        except LogError:
            return None

    async def _not_acquired(self, digest: str) -> None:
        raise BlobUnavailable(
            digest,
            f"authority {self.config.name or self.identity.node_id[:16]} has not acquired it; "
            "authorities fetch from upstream only in a build (pyrsia build docker --image "
            "NAME:TAG)",
        )

    async def _fetch_for_registry(self, digest: str) -> None:
        try:
            await self.distribution.fetch_blob(digest)
        except TransferError as exc:
            raise ContentUnavailable(str(exc)) from exc
        except grpc.aio.AioRpcError as exc:
            raise ContentUnavailable(f"{exc.code().name}: {exc.details()}") from exc

    def _on_commit(self, block: Block, cert: CommitCertificate) -> None:
        if block.records:
            # Consensus has just appended the block's records: index them from the block.
            self.catalog.committed(self.ledger.size - len(block.records), block.records)
            self._spawn(self.catalog.refresh(), "catalog-refresh")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def status(self) -> dict[str, Any]:
        peers = sorted(self.peering.table.connected(), key=lambda i: (i.role, i.name))
        size = self.ledger.size
        return {
            "node_id": self.identity.node_id,
            "name": self.config.name,
            "role": self.config.role,
            "version": __version__,
            "chain_id": self.genesis.chain_id,
            "genesis_hash": self.genesis.genesis_hash,
            "grpc_address": self.config.grpc_address,
            "http_address": self.config.http_address,
            "metrics_address": self.config.metrics_address,
            "tls": self.tls is not None,
            "connected_peers": [
                {
                    "node_id": p.node_id,
                    "name": p.name,
                    "role": p.role,
                    "grpc_address": p.grpc_address,
                    "http_address": p.http_address,
                }
                for p in peers
            ],
            "ledger": {
                "height": self.consensus.height,
                "size": size,
                "root": self.ledger.root(size).hex(),  # of that size, whatever commits meanwhile
            },
            "consensus": self.consensus.status() if self.consensus.started else None,
        }

    def live(self) -> tuple[bool, str]:
        """False once consensus has stopped (a write failed, e.g. a full disk): the node
        neither votes nor commits again until restarted, which replays and catches up."""
        failure = self.consensus.failure() if self.consensus.started else None
        if failure is not None:
            return False, f"consensus stopped: {failure}; restart the node"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        is_live, reason = self.live()
        if not is_live:
            return False, reason
        if self.config.bootstrap and not self.peering.table.connected():
            return False, "no peer connected yet"
        return True, "serving"

    async def start(self) -> None:
        server = grpc.aio.server()
        peer_pb2_grpc.add_PeerServicer_to_server(PeerServicer(self.peering), server)
        self.distribution.register(server)
        self.consensus.register(server)
        build_pb2_grpc.add_BuildServicer_to_server(
            BuildServicer(self.acquirer, self.builds), server
        )
        listen = f"{self.config.listen_host}:{self.config.grpc_port}"
        if self.tls is None:
            log.warning("gRPC without TLS (insecure_plaintext): for debugging only")
            server.add_insecure_port(listen)
        else:
            server.add_secure_port(listen, self.tls.server_credentials())
        await server.start()
        self._grpc = server

        await self.catalog.refresh()
        mirror = registry_routes(
            self.catalog,
            self.store,
            mode=self.config.mirror_mode,
            request_build=registry_builds(self.build_client, self.catalog),
            build_timeout=self.config.build_timeout,
            fetch=self._fetch_for_registry,
            follow=follower(self.distribution.followed, self._fetch_for_registry),
            metrics_registry=self.metrics.registry,
        )
        app = api.build_app(
            self.status,
            self.ready,
            [
                *ledger_routes(self.ledger, genesis=self.genesis),
                *consensus_routes(self.consensus),
                *build_routes(self.build_client),
                *mirror,
            ],
            live=self.live,
        )
        await self._serve(app, self.config.http_port)
        await self._serve(self._metrics_app(), self.config.metrics_port)
        self._tasks = [
            asyncio.create_task(self.peering.run(), name="peering"),
            asyncio.create_task(self._sample_load(), name="load-sampler"),
        ]
        await self.distribution.start()
        await self.consensus.start()
        # Consensus start may have re-appended records a crash cut off from the ledger.
        await self.catalog.refresh()
        self._started = True
        log.info(
            "node %s (%s, %s) serving: grpc %s, http %s, metrics %s",
            self.config.name,
            self.config.role,
            self.identity.node_id[:16],
            listen,
            self.config.http_address,
            self.config.metrics_address,
        )

    async def _serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self.config.listen_host, port).start()
        self._runners.append(runner)

    def _metrics_app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=self.metrics.exposition(),
                headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
            )

        app = web.Application()
        app.add_routes([web.get("/metrics", metrics)])
        return app

    async def _sample_load(self) -> None:
        sampler = LoadSampler()
        while True:
            await asyncio.sleep(self.config.metrics_interval)
            self.metrics.record(sampler.sample(self.uploads_in_flight))
            self.metrics.connected_peers.set(len(self.peering.table.connected()))

    async def stop(self) -> None:
        self._started = False
        if self.builds is not None:
            await self.builds.close()
        if self.acquirer is not None:
            await self.acquirer.close()
        for task in self._background:
            task.cancel()
        await self.distribution.stop()
        if self.consensus.started:
            await self.consensus.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._grpc is not None:
            await self._grpc.stop(grace=STOP_GRACE_SECONDS / 2)
        for runner in self._runners:
            await runner.cleanup()
        await self.peering.close()
        await self.catalog.close()
        self.ledger.close()


# The cyclic collector's generation thresholds for a running node; CPython's are
# (700, 10, 10). A node keeps hundreds of thousands of long-lived objects (the catalog, the
# mempool, record and statement caches) and allocates ~100 per record, so with the defaults
# it ran a young collection every few milliseconds at thousands of records per second and
# full ones that took 0.1-0.3 s each, ~10% of its CPU in the consensus bench. A young
# collection now runs after 50,000 more tracked objects than freed (tens of MiB at most).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_collector() -> None:
    """Set `GC_THRESHOLDS` and move everything alive now (modules, the replayed state) to
    the collector's permanent generation, which its collections no longer scan."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run(config: NodeConfig) -> None:
    """Run a node until SIGTERM or SIGINT."""
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    tune_collector()
    await stop.wait()
    log.info("node %s stopping", config.name)
    await asyncio.wait_for(node.stop(), timeout=STOP_GRACE_SECONDS * 2)
