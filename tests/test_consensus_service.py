"""The consensus shell over real gRPC on 127.0.0.1: four authorities and one peer.

Each node is a `ConsensusService` with its own data directory, transparency log and gRPC
server (plaintext on loopback; mutual TLS is the node server's business).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia.v1 import consensus_pb2_grpc as pb_grpc
from pyrsia_node.consensus import (
    Block,
    Commit,
    CommitCertificate,
    ConsensusConfig,
    MessageKind,
    Proposal,
    ProposalReceived,
    RecordSubmitted,
    ScheduleTimeout,
    Timeout,
    TimeoutKind,
    Timeouts,
    signing_bytes,
)
from pyrsia_node.consensus.blocks import BlockStore
from pyrsia_node.consensus.mempool import Mempool, MempoolLimits, RecordRejected
from pyrsia_node.consensus.service import (
    GOSSIP_INTERVAL,
    ConsensusService,
    GrpcTransport,
    initialize_state,
)
from pyrsia_node.consensus.validators import GENESIS_PREV_HASH
from pyrsia_node.consensus.wal import Step, WalError, WalState
from pyrsia_node.consensus.wire import compact_proposal_to_pb, hello_signing_bytes
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog, verify_checkpoint
from pyrsia_node.ledger.checkpoint import Checkpoint, origin_for, sign
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    GovernanceAction,
    GovernanceRecord,
    PackageType,
)
from pyrsia_node.merkle import leaf_hash

pytestmark = pytest.mark.timeout(60)

CHAIN = "pyrsia-shell"
TIMEOUTS = Timeouts(
    propose=0.5, prevote=0.3, precommit=0.3, delta=0.2, retransmit=0.3, sync_interval=0.3
)


def record(i: int) -> bytes:
    envelope = DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, b"{}", (("authority-0", b"s" * 64),))
    return ArtifactRecord(
        PackageType.DOCKER,
        f"docker.io/library/pkg{i}:v1",
        (Artifact(f"sha256:{i:064x}", i, "application/vnd.oci.image.manifest.v1+json"),),
        (envelope,),
    ).encode()


@dataclass
class Node:
    name: str
    identity: Identity
    directory: Path
    server: grpc.aio.Server
    port: int
    ledger: TransparencyLog | None = None
    service: ConsensusService | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def make_node(root: Path, name: str) -> Node:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    return Node(name, Identity.generate(), root / name, server, port)


def make_genesis(authorities: list[Node]) -> Genesis:
    return Genesis(
        chain_id=CHAIN,
        genesis_time="2026-01-01T00:00:00Z",
        governance_public_key=Identity.generate().public_key,
        authorities=tuple(
            Authority(n.name, n.identity.public_key, n.address, "127.0.0.1:1") for n in authorities
        ),
        ca_certificate="",
    )


def lone_genesis(identity: Identity, grpc_address: str = "127.0.0.1:1") -> Genesis:
    """A network of one authority, `identity`."""
    return Genesis(
        chain_id=CHAIN,
        genesis_time="2026-01-01T00:00:00Z",
        governance_public_key=Identity.generate().public_key,
        authorities=(Authority("authority-0", identity.public_key, grpc_address, "x:1"),),
        ca_certificate="",
    )


async def start(node: Node, genesis: Genesis) -> ConsensusService:
    node.ledger = TransparencyLog(node.directory / "ledger")
    transport = GrpcTransport(
        node.identity, CHAIN, grpc.aio.insecure_channel, lambda: int(time.time() * 1000)
    )
    node.registry = CollectorRegistry()  # a restarted node is a new process
    service = ConsensusService(
        node.identity,
        genesis,
        node.directory / "consensus",
        node.ledger,
        transport,
        config=ConsensusConfig(CHAIN, timeouts=TIMEOUTS),
        registry=node.registry,
    )
    node.service = service
    service.register(node.server)
    await node.server.start()
    await service.start()
    return service


async def stop(node: Node) -> None:
    assert node.service is not None and node.ledger is not None
    await node.service.stop()
    await node.server.stop(None)
    node.ledger.close()


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[tuple[list[Node], Node, Genesis]]:
    authorities = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    peer = await make_node(tmp_path, "peer-0")
    genesis = make_genesis(authorities)
    for node in authorities:
        initialize_state(node.directory / "consensus")
    for node in [*authorities, peer]:
        await start(node, genesis)
    yield authorities, peer, genesis
    for node in [*authorities, peer]:
        if node.service is not None:
            await stop(node)


async def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_records_commit_on_every_authority_and_reach_the_peer(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, peer, _ = network
    records = [record(i) for i in range(5)]
    async with grpc.aio.insecure_channel(authorities[0].address) as channel:
        stub = pb_grpc.ConsensusStub(channel)
        for r in records:
            response = await stub.SubmitRecord(pb.SubmitRecordRequest(record=r))
            assert response.accepted, response.reason
        duplicate = await stub.SubmitRecord(pb.SubmitRecordRequest(record=records[0]))
        assert not duplicate.accepted
    for node in [*authorities, peer]:
        assert node.ledger is not None
        ledger = node.ledger
        await wait_for(lambda ledger=ledger: ledger.size == len(records))
        # Gossip does not order records; the roots below show every node holds one order.
        assert sorted(ledger.entry(i) for i in range(len(records))) == sorted(records)
    roots = {n.ledger.root() for n in [*authorities, peer] if n.ledger is not None}
    assert len(roots) == 1


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, f"{name} is not registered"
    return value


async def test_consensus_metrics_follow_commits_and_pending_records(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, peer, _ = network
    node = authorities[2]
    assert node.service is not None
    registry = node.registry
    assert sample(registry, "pyrsia_ledger_height") == 0
    records = [record(200 + i) for i in range(4)]
    for r in records:
        node.service.submit(r)
    assert sample(registry, "pyrsia_consensus_pending_records") >= 1
    await wait_for(lambda: sample(registry, "pyrsia_consensus_committed_records_total") == 4)
    await wait_for(lambda: sample(registry, "pyrsia_consensus_pending_records") == 0)
    assert sample(registry, "pyrsia_ledger_height") == node.service.height >= 1
    assert sample(registry, "pyrsia_consensus_commit_latency_seconds_count") == 4
    assert 0 < sample(registry, "pyrsia_consensus_commit_latency_seconds_sum") < 4 * 20
    assert sample(registry, "pyrsia_consensus_round_changes_total") >= 0
    # Each height went through every step (a step passed within one event counts as 0 s).
    height = node.service.height

    def step(name: str, kind: str) -> float:
        value = registry.get_sample_value(f"pyrsia_consensus_step_seconds_{kind}", {"step": name})
        assert value is not None, name
        return value

    for name in ("new_height", "propose", "prevote", "precommit", "commit"):
        assert step(name, "count") >= height, name
        assert step(name, "sum") < 20 * step(name, "count"), name
    assert step("commit", "sum") > 0
    # Latency is measured where a record was submitted, not where gossip brought it.
    other = authorities[0].registry
    await wait_for(lambda: sample(other, "pyrsia_consensus_committed_records_total") == 4)
    assert sample(other, "pyrsia_consensus_commit_latency_seconds_count") == 0
    # A follower counts the height it synced too.
    assert peer.service is not None
    await wait_for(lambda: sample(peer.registry, "pyrsia_ledger_height") >= node.service.height)


async def test_a_round_whose_proposer_is_down_counts_as_a_round_change(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, _, _ = network
    await stop(authorities[3])
    authorities[3].service = None
    live, ledger = authorities[0].service, authorities[0].ledger
    assert live is not None and ledger is not None
    registry = authorities[0].registry
    # The round-0 proposer rotates with the height: within four heights one is the
    # stopped authority, whose round times out.
    for i in range(4):
        live.submit(record(300 + i))
        await wait_for(lambda size=i + 1: ledger.size >= size)
    assert sample(registry, "pyrsia_consensus_round_changes_total") >= 1


async def test_checkpoints_are_cosigned_by_a_quorum_of_authorities(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, _, genesis = network
    assert authorities[1].service is not None
    authorities[1].service.submit(record(1))
    keys = [(a.name, a.public_key) for a in genesis.authorities]

    def cosigned() -> bool:
        for node in authorities:
            assert node.ledger is not None
            note = node.ledger.checkpoint(1)
            if note is None:
                return False
            try:
                verify_checkpoint(note, keys, genesis.quorum)
            except ValueError:
                return False
        return True

    await wait_for(cosigned)


async def test_malformed_and_duplicate_records_are_refused(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, _, _ = network
    service = authorities[0].service
    assert service is not None
    with pytest.raises(RecordRejected, match="canonical"):
        service.submit(b"not a record")
    assert service.submit(record(9))
    assert not service.submit(record(9))


async def test_forged_governance_records_are_refused_with_the_reason(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    """A governance record not signed by the genesis governance key, or signed for another
    chain, would change nothing once committed; it is refused instead of filling the log,
    whether submitted here or gossiped (the mempool) or proposed (the same record check)."""
    authorities, _, _ = network
    service = authorities[0].service
    assert service is not None
    newcomer = Identity.generate().public_key
    forged = GovernanceRecord.create(
        Identity.generate(), CHAIN, 1, GovernanceAction.ADD, "authority-9", newcomer, "a:1", "a:2"
    ).encode()
    elsewhere = GovernanceRecord.create(
        Identity.generate(), "another-chain", 1, GovernanceAction.REMOVE, "authority-0", newcomer
    ).encode()
    with pytest.raises(RecordRejected, match="not signed by this network's governance key"):
        service.submit(forged)
    with pytest.raises(RecordRejected, match="another-chain"):
        service.submit(elsewhere)
    for record in (forged, elsewhere):
        with pytest.raises(RecordRejected, match="record refused"):
            service.mempool.admit(record)
    assert len(service.mempool) == 0


async def test_an_unreachable_authority_costs_the_others_bounded_memory() -> None:
    """Envelopes for an authority that does not take them are bounded in bytes (gossip
    batches are up to 1 MiB; 10,000 of them used to be kept): the oldest are dropped."""
    transport = GrpcTransport(
        Identity.generate(), CHAIN, grpc.aio.insecure_channel, lambda: 0, queue_bytes=4 << 20
    )
    transport.set_authorities({Identity.generate().public_key: "127.0.0.1:1"}, stream=True)
    batch = pb.ConsensusEnvelope(records=pb.RecordBatch(records=[bytes(1 << 20)]))
    try:
        for _ in range(64):  # no await: the sender task takes nothing meanwhile
            transport.broadcast(batch)
        [(count, size, dropped)] = transport.queued().values()
        assert (count, dropped) == (3, 61)
        assert size == 3 * batch.ByteSize() <= 4 << 20
    finally:
        await transport.close()


async def test_stream_from_a_non_authority_is_refused(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, _, _ = network
    outsider = Identity.generate()
    receiver = authorities[0].identity.public_key
    now = int(time.time() * 1000)
    hello = pb.StreamHello(
        public_key=outsider.public_key,
        chain_id=CHAIN,
        receiver=receiver,
        timestamp_ms=now,
        signature=outsider.sign(hello_signing_bytes(CHAIN, outsider.public_key, receiver, now)),
    )

    async def envelopes() -> AsyncIterator[pb.ConsensusEnvelope]:
        yield pb.ConsensusEnvelope(hello=hello)

    async with grpc.aio.insecure_channel(authorities[0].address) as channel:
        stub = pb_grpc.ConsensusStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Stream(envelopes())
    assert failure.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_stream_with_a_forged_hello_is_refused(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, _, _ = network
    claimed = authorities[1].identity.public_key
    receiver = authorities[0].identity.public_key
    hello = pb.StreamHello(
        public_key=claimed,
        chain_id=CHAIN,
        receiver=receiver,
        timestamp_ms=int(time.time() * 1000),
        signature=b"\x00" * 64,
    )

    async def envelopes() -> AsyncIterator[pb.ConsensusEnvelope]:
        yield pb.ConsensusEnvelope(hello=hello)

    async with grpc.aio.insecure_channel(authorities[0].address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await pb_grpc.ConsensusStub(channel).Stream(envelopes())
    assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_stopped_authority_catches_up_after_restart(
    network: tuple[list[Node], Node, Genesis],
) -> None:
    authorities, _, genesis = network
    lagging = authorities[3]
    await stop(lagging)
    lagging.service = None
    live = authorities[0].service
    assert live is not None
    for i in range(3):
        live.submit(record(100 + i))
    await wait_for(
        lambda: all(n.ledger is not None and n.ledger.size >= 3 for n in authorities[:3])
    )
    server = grpc.aio.server()
    server.add_insecure_port(lagging.address)
    lagging.server = server
    service = await start(lagging, genesis)
    ledger = lagging.ledger
    assert ledger is not None
    await wait_for(lambda: service.height >= 2 and ledger.size >= 3)
    assert service.blocks.get(1)[0] == live.blocks.get(1)[0]
    # Record gossip does not promise an order, so the records may commit in any order;
    # the restarted node must hold the same log as the live one.
    live_ledger = authorities[0].ledger
    assert live_ledger is not None
    entries = [ledger.entry(i) for i in range(3)]
    assert entries == [live_ledger.entry(i) for i in range(3)]
    assert sorted(entries) == sorted(record(100 + i) for i in range(3))


def test_block_store_survives_a_torn_append(tmp_path: Path) -> None:
    from pyrsia_node.consensus import Block, CommitCertificate

    store = BlockStore(tmp_path / "blocks")
    b1 = Block(CHAIN, 1, bytes(32), b"\x01" * 32, (b"a",))
    b2 = Block(CHAIN, 2, b1.hash, b"\x01" * 32, ())
    store.append(b1, CommitCertificate(1, 0, b1.hash, ()))
    store.append(b2, CommitCertificate(2, 0, b2.hash, ()))
    data = store.path.read_bytes()
    store.path.write_bytes(data[:-5])
    reopened = BlockStore(tmp_path / "blocks")
    assert reopened.height == 1
    assert reopened.get(1)[0] == b1
    reopened.append(b2, CommitCertificate(2, 0, b2.hash, ()))
    assert BlockStore(tmp_path / "blocks").height == 2


class RecordingTransport:
    """A transport that only records what the service hands it."""

    def __init__(self) -> None:
        self.sent: list[pb.ConsensusEnvelope] = []
        self.authorities: dict[bytes, str] = {}
        self.streaming = False

    def set_authorities(self, addresses: Mapping[bytes, str], stream: bool) -> None:
        self.authorities, self.streaming = dict(addresses), stream

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        self.sent.append(envelope)

    async def fetch_blocks(
        self, peer: bytes, from_height: int, limit: int, follow: bool
    ) -> AsyncIterator[pb.CommittedBlock]:
        for _ in ():
            yield pb.CommittedBlock()

    async def close(self) -> None:
        return None


class ThreadCheckingTransport(RecordingTransport):
    """Records broadcasts, and from which thread they came."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        self.threads.add(threading.get_ident())
        super().broadcast(envelope)


async def test_each_commit_is_cosigned_in_order_off_the_core_and_from_the_event_loop(
    tmp_path: Path,
) -> None:
    """A lone authority commits block after block. The cosigner signs each block's
    checkpoint (the log's size and root at that commit, even when the log has grown since),
    stores it with any cosignature that arrived before it, and broadcasts from the event
    loop's thread (the transport's queues are not thread-safe)."""
    node = await make_node(tmp_path, "authority-0")
    other = Identity.generate()
    genesis = lone_genesis(node.identity, node.address)
    initialize_state(node.directory / "consensus")
    ledger = TransparencyLog(node.directory / "ledger")
    transport = ThreadCheckingTransport()
    service = ConsensusService(
        node.identity,
        genesis,
        node.directory / "consensus",
        ledger,
        transport,
        config=ConsensusConfig(CHAIN, timeouts=TIMEOUTS),
    )
    await service.start()
    try:
        for i in range(1, 4):
            service.submit(record(i))
            await wait_for(lambda i=i: ledger.size >= i)
        await wait_for(lambda: len([e for e in transport.sent if e.HasField("cosignature")]) >= 3)
        cosigned = [e.cosignature for e in transport.sent if e.HasField("cosignature")]
        assert [c.tree_size for c in cosigned] == sorted(c.tree_size for c in cosigned)
        keys = [("authority-0", node.identity.public_key)]
        for c in cosigned:
            assert c.root == ledger.root(c.tree_size)
            note = ledger.checkpoint(c.tree_size)
            assert note is not None
            verify_checkpoint(note, keys, 1)
        assert transport.threads == {threading.get_ident()}
        # A checkpoint cosigned while the log had already grown: the note is for its size.
        size = ledger.size
        service._names[other.public_key] = "observer"  # a second signer
        early = Checkpoint(origin_for(CHAIN), size, ledger.root(size))
        service._cosignatures[size] = [(other.public_key, sign(early, "observer", other))]
        service.submit(record(9))
        await wait_for(lambda: ledger.size > size)
        envelope = service._cosign(7, early)  # the cosigner step, late
        assert envelope.cosignature.tree_size == size
        note = ledger.checkpoint(size)
        assert note is not None
        # Ours and the early one, for the old size.
        verify_checkpoint(note, [*keys, ("observer", other.public_key)], 2)
    finally:
        await service.stop()
        await node.server.stop(None)
        ledger.close()


async def test_submitted_records_are_gossiped_to_authorities_and_admitted_from_them(
    tmp_path: Path,
) -> None:
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    genesis = make_genesis(nodes)
    transport = RecordingTransport()
    service = ConsensusService(nodes[0].identity, genesis, tmp_path / "consensus", None, transport)
    await service.start()
    try:
        assert transport.streaming
        assert set(transport.authorities) == {n.identity.public_key for n in nodes}
        assert service.submit(record(1))
        assert service.submit(record(3))
        assert not [e for e in transport.sent if e.HasField("records")]  # not at once:
        await asyncio.sleep(2 * GOSSIP_INTERVAL)  # records submitted together, one batch
        batches = [list(e.records.records) for e in transport.sent if e.HasField("records")]
        assert batches == [[record(1), record(3)]]
        service.receive(nodes[1].identity.public_key, pb.ConsensusEnvelope(record=record(2)))
        assert len(service.mempool) == 3
        batch = pb.RecordBatch(records=[record(2), record(4)])
        service.receive(nodes[2].identity.public_key, pb.ConsensusEnvelope(records=batch))
        assert len(service.mempool) == 4
        sent = len(transport.sent)
        service.receive(nodes[1].identity.public_key, pb.ConsensusEnvelope(record=record(2)))
        await asyncio.sleep(2 * GOSSIP_INTERVAL)
        assert len(service.mempool) == 4
        # Records gossiped to this node are not gossiped on.
        assert not [e for e in transport.sent[sent:] if e.HasField("records")]
    finally:
        await service.stop()
        for n in nodes:
            await n.server.stop(None)


def test_each_step_counts_once_per_round_even_when_passed_within_one_event(
    tmp_path: Path,
) -> None:
    now = [0.0]
    identity = Identity.generate()
    registry = CollectorRegistry()
    service = ConsensusService(
        identity,
        lone_genesis(identity),
        tmp_path,
        None,
        RecordingTransport(),
        registry=registry,
        clock=lambda: now[0],
    )

    def observed() -> dict[str, tuple[float | None, float | None]]:
        return {
            step: tuple(  # type: ignore[misc]
                registry.get_sample_value(f"pyrsia_consensus_step_seconds_{kind}", {"step": step})
                for kind in ("sum", "count")
            )
            for step in ("new_height", "propose", "prevote", "precommit")
        }

    now[0] = 1.0  # propose -> precommit in one event: prevote counted as 0 s
    service._time_step(Step.PROPOSE, Step.PRECOMMIT, new_round=False, new_height=False)
    now[0] = 3.0  # precommit -> the next round's prevote: its propose step counted as 0 s
    service._time_step(Step.PRECOMMIT, Step.PREVOTE, new_round=True, new_height=False)
    now[0] = 3.5  # prevote -> a decision: the rest of the round, then the new height
    service._time_step(Step.PREVOTE, Step.NEW_HEIGHT, new_round=True, new_height=True)
    assert observed() == {
        "new_height": (0.0, 0),
        "propose": (1.0, 2),
        "prevote": (0.5, 2),
        "precommit": (2.0, 2),
    }


async def test_a_timer_starts_before_the_writes_listed_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause before the next height runs from the decision, overlapping the commit's
    writes (CometBFT's timeout_commit runs from the commit time), not after them."""
    identity = Identity.generate()
    service = ConsensusService(
        identity, lone_genesis(identity), tmp_path, None, RecordingTransport()
    )
    order: list[str] = []

    async def slow_commit(block: Block, cert: CommitCertificate) -> None:
        order.append("commit")
        await asyncio.sleep(0.05)

    def schedule(loop: asyncio.AbstractEventLoop, action: ScheduleTimeout) -> None:
        order.append(f"timer {action.timeout.kind.name}")

    monkeypatch.setattr(service, "_commit", slow_commit)
    monkeypatch.setattr(service, "_schedule", schedule)
    block = Block(CHAIN, 1, GENESIS_PREV_HASH, identity.public_key, (record(1),))
    pause = Timeout(TimeoutKind.NEW_HEIGHT, 2, 0)
    await service._execute(
        [Commit(block, CommitCertificate(1, 0, block.hash, ())), ScheduleTimeout(pause, 0.05)]
    )
    assert order == ["timer NEW_HEIGHT", "commit"]


async def test_validator_without_write_ahead_state_starts_guarded(tmp_path: Path) -> None:
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    genesis = make_genesis(nodes)
    service = ConsensusService(
        nodes[1].identity, genesis, tmp_path / "consensus", None, RecordingTransport()
    )
    await service.start()
    try:
        await asyncio.sleep(0.1)
        assert service.core.signing_floor is None
        assert service.status()["signing_floor"] is None
    finally:
        await service.stop()
    initialize_state(tmp_path / "fresh")
    fresh = ConsensusService(
        nodes[1].identity, genesis, tmp_path / "fresh", None, RecordingTransport()
    )
    await fresh.start()
    try:
        assert fresh.core.signing_floor == 0
    finally:
        await fresh.stop()
        for n in nodes:
            await n.server.stop(None)


async def test_a_record_event_that_arrives_after_its_commit_is_not_proposed_again(
    tmp_path: Path,
) -> None:
    """The race behind duplicate log entries: a record's event is still queued when a
    block holding the record commits. Replayed here on a lone authority by queueing the
    event a second time (as a late gossip copy admitted before the commit would be)."""
    node = await make_node(tmp_path, "authority-0")
    genesis = make_genesis([node])
    initialize_state(node.directory / "consensus")
    service = await start(node, genesis)
    try:
        assert node.ledger is not None
        ledger = node.ledger
        service.submit(record(7))
        service._events.put_nowait(RecordSubmitted(record(7)))
        service.submit(record(8))
        await wait_for(lambda: ledger.size >= 2)
        await asyncio.sleep(0.5)
        assert sorted(ledger.entry(i) for i in range(ledger.size)) == [record(7), record(8)]
    finally:
        await stop(node)


class FetchingTransport(RecordingTransport):
    """Records what the service sends; answers record fetches from `held`."""

    def __init__(self, held: list[bytes]) -> None:
        super().__init__()
        self.held = held
        self.asked: list[list[bytes]] = []

    async def fetch_records(self, peer: bytes, hashes: Sequence[bytes]) -> list[bytes]:
        self.asked.append(list(hashes))
        return list(self.held)


def signed_proposal(proposer: Identity, records: tuple[bytes, ...]) -> Proposal:
    block = Block(CHAIN, 1, GENESIS_PREV_HASH, proposer.public_key, records)
    message = signing_bytes(CHAIN, MessageKind.PROPOSAL, 1, 0, block.hash, -1)
    return Proposal(block, 0, -1, proposer.public_key, proposer.sign(message))


def queued_proposals(service: ConsensusService) -> list[Proposal]:
    events = []
    while not service._events.empty():
        events.append(service._events.get_nowait())
    return [e.proposal for e in events if isinstance(e, ProposalReceived)]


async def test_a_compact_proposal_is_completed_from_the_mempool_and_by_fetching(
    tmp_path: Path,
) -> None:
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    genesis = make_genesis(nodes)
    transport = FetchingTransport([record(2), record(9)])
    service = ConsensusService(nodes[0].identity, genesis, tmp_path / "consensus", None, transport)
    proposer = nodes[1].identity
    assert service.submit(record(1))
    proposal = signed_proposal(proposer, (record(1), record(2)))
    envelope = compact_proposal_to_pb(proposal)
    assert not envelope.proposal.HasField("block")  # the records themselves do not travel
    service.receive(proposer.public_key, envelope)
    await asyncio.gather(*service._fetches)
    assert transport.asked == [[leaf_hash(record(2))]]  # only the one it lacked
    assert queued_proposals(service) == [proposal]
    assert service.mempool.get(leaf_hash(record(2))) == record(2)  # admitted, checked
    assert service.mempool.get(leaf_hash(record(9))) is None  # not asked for: dropped
    service.receive(proposer.public_key, envelope)  # now complete locally: no fetch
    assert len(transport.asked) == 1 and queued_proposals(service) == [proposal]
    for n in nodes:
        await n.server.stop(None)


async def test_a_compact_proposal_whose_records_never_come_does_not_reach_the_core(
    tmp_path: Path,
) -> None:
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    genesis = make_genesis(nodes)
    transport = FetchingTransport([record(3)])  # the sender answers with another record
    service = ConsensusService(nodes[0].identity, genesis, tmp_path / "consensus", None, transport)
    proposer = nodes[1].identity
    service.receive(
        proposer.public_key, compact_proposal_to_pb(signed_proposal(proposer, (record(2),)))
    )
    await asyncio.gather(*service._fetches)
    assert queued_proposals(service) == []
    assert len(service.mempool) == 0
    for n in nodes:
        await n.server.stop(None)


async def test_authorities_serve_pending_records_by_leaf_hash(tmp_path: Path) -> None:
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    genesis = make_genesis(nodes)
    holder = nodes[0]
    # Alone (its transport reaches nobody), so its records stay pending.
    service = ConsensusService(
        holder.identity, genesis, tmp_path / "consensus", None, RecordingTransport()
    )
    service.register(holder.server)
    await holder.server.start()
    await service.start()
    transport = GrpcTransport(
        nodes[1].identity, CHAIN, grpc.aio.insecure_channel, lambda: int(time.time() * 1000)
    )
    try:
        service.submit(record(5))
        transport.set_authorities({holder.identity.public_key: holder.address}, stream=False)
        unknown = leaf_hash(b"never submitted")
        wanted = [leaf_hash(record(5)), unknown]
        assert await transport.fetch_records(holder.identity.public_key, wanted) == [record(5)]
    finally:
        await transport.close()
        await service.stop()
        for n in nodes:
            await n.server.stop(None)


def test_the_mempool_forgets_records_refused_on_a_second_check() -> None:
    pool = Mempool(MempoolLimits(), lambda _: set(), lambda _: True)
    assert pool.admit(record(1)) and pool.admit(record(2))
    pool.retain(lambda r: r != record(1))
    assert pool.get(leaf_hash(record(1))) is None
    assert pool.get(leaf_hash(record(2))) == record(2)
    assert len(pool) == 1 and pool.pending_bytes == len(record(2))


def test_the_mempool_knows_and_forgets_records_by_their_bytes() -> None:
    pool = Mempool(MempoolLimits(), lambda _: set(), lambda _: True)
    assert pool.admit(record(1)) and pool.admit(record(2))
    copy = bytes(bytearray(record(1)))  # equal bytes, another object
    assert copy in pool and b"other" not in pool
    pool.committed([copy, b"never admitted"])
    assert record(1) not in pool and pool.get(leaf_hash(record(1))) is None
    assert record(2) in pool
    assert len(pool) == 1 and pool.pending_bytes == len(record(2))


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(st.integers(0, 7), max_size=12),
    pending=st.sets(st.integers(0, 7)),
    ledger=st.sets(st.integers(0, 7)),
    invalid=st.sets(st.integers(0, 7)),
    max_records=st.integers(0, 10),
)
def test_admitting_a_batch_is_admitting_its_records_one_by_one(
    batch: list[int], pending: set[int], ledger: set[int], invalid: set[int], max_records: int
) -> None:
    """`admit_all` gives each record what `admit` in order would (new, a pending duplicate,
    or the refusal: invalid, in the ledger, too large, the pool full), ends in the same
    pool, and asks the ledger once, about those not pending."""
    big = 7  # over the size limit

    def data(i: int) -> bytes:
        return record(i) + b"x" * 100 if i == big else record(i)

    held = {leaf_hash(data(i)) for i in ledger}
    asked: list[list[bytes]] = []

    def in_ledger(hashes: Sequence[bytes]) -> set[bytes]:
        asked.append(list(hashes))
        return held & set(hashes)

    def pool() -> Mempool:
        made = Mempool(MempoolLimits(), in_ledger, lambda r: r not in {data(i) for i in invalid})
        for i in sorted(pending - ledger - invalid - {big}):
            made.admit(data(i))
        made.limits = MempoolLimits(max_records=max_records, max_record_bytes=len(record(0)))
        return made

    def one(made: Mempool, i: int) -> bool | str:
        try:
            return made.admit(data(i))
        except RecordRejected as exc:
            return exc.reason

    one_by_one = pool()
    expected = [one(one_by_one, i) for i in batch]
    batched = pool()
    not_pending = [leaf_hash(data(i)) for i in batch if i != big and data(i) not in batched]
    asked.clear()
    outcomes = batched.admit_all([data(i) for i in batch])
    assert [o.reason if isinstance(o, RecordRejected) else o for o in outcomes] == expected
    assert [batched.get(leaf_hash(data(i))) for i in range(8)] == [
        one_by_one.get(leaf_hash(data(i))) for i in range(8)
    ]
    assert len(batched) == len(one_by_one) and batched.pending_bytes == one_by_one.pending_bytes
    assert asked == ([not_pending] if not_pending else [])


async def test_stop_closes_the_transport_after_a_task_died_of_an_error(tmp_path: Path) -> None:
    """A task that failed (e.g. the loop stopped by a log of another chain) is logged by
    `stop`, which still cancels the rest and closes the transport."""
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    closed: list[bool] = []

    class ClosingTransport(RecordingTransport):
        async def close(self) -> None:
            closed.append(True)

    service = ConsensusService(
        nodes[0].identity, make_genesis(nodes), tmp_path / "consensus", None, ClosingTransport()
    )
    await service.start()

    async def fail() -> None:
        raise RuntimeError("log is not this chain's")

    failed = asyncio.create_task(fail(), name="failing")
    await asyncio.sleep(0)
    service._tasks.append(failed)
    try:
        await service.stop()
        assert closed == [True]
        assert all(task.done() for task in service._fetches)
    finally:
        for n in nodes:
            await n.server.stop(None)


async def test_the_failure_reported_is_the_first_and_stays_when_more_tasks_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk stops several tasks one after the other (here the cosigner at its note,
    then the core at a write-ahead write): the reason given (liveness probe, `pyrsia
    status`) is the first one, and it does not change under the operator's eyes."""
    identity = Identity.generate()
    service = ConsensusService(
        identity, lone_genesis(identity), tmp_path, None, RecordingTransport()
    )
    disk_full = False
    append = service._wal.append

    def append_unless_full(state: WalState) -> None:
        if disk_full:
            raise WalError("cannot write write-ahead file: No space left on device")
        append(state)

    monkeypatch.setattr(service._wal, "append", append_unless_full)
    await service.start()

    async def cosigner_on_a_full_disk() -> None:
        raise OSError(28, "database or disk is full")

    cosigner = asyncio.create_task(cosigner_on_a_full_disk(), name="consensus-cosign")
    cosigner.add_done_callback(service._ended)
    service._tasks.append(cosigner)
    await asyncio.gather(cosigner, return_exceptions=True)
    await asyncio.sleep(0)
    first = service.failure()
    assert first == "consensus-cosign ended: OSError(28, 'database or disk is full')"
    assert not service.healthy
    disk_full = True
    service.submit(record(1))
    core = service._tasks[0]
    await wait_for(core.done)
    assert isinstance(core.exception(), WalError)
    assert service.failure() == first
    await service.stop()
    assert service.failure() == first  # the stop's cancellations are no failure


# SubmitRecord(s) with wait_seconds: answered once committed ----------------------------


@pytest.fixture
async def lone_authority(tmp_path: Path) -> AsyncIterator[Node]:
    """An authority alone in its network, over real gRPC: it commits what it admits."""
    node = await make_node(tmp_path, "authority-0")
    initialize_state(node.directory / "consensus")
    await start(node, lone_genesis(node.identity, node.address))
    yield node
    await stop(node)


async def test_a_submission_that_waits_gets_the_log_index_once_committed(
    lone_authority: Node,
) -> None:
    async with grpc.aio.insecure_channel(lone_authority.address) as channel:
        stub = pb_grpc.ConsensusStub(channel)
        first = await stub.SubmitRecord(pb.SubmitRecordRequest(record=record(1), wait_seconds=20))
        assert (first.accepted, first.committed, first.log_index) == (True, True, 0)
        started = time.monotonic()
        batch = await stub.SubmitRecords(
            pb.SubmitRecordsRequest(records=[record(2), record(3), b"junk"], wait_seconds=20)
        )
        # The refused one is answered at once, and not waited for.
        assert time.monotonic() - started < 10
        answers = [(r.accepted, r.committed) for r in batch.results]
        assert answers == [(True, True), (True, True), (False, False)]
        assert sorted(r.log_index for r in batch.results[:2]) == [1, 2]
        assert batch.results[2].reason
        # Resubmitted: refused without a wait, as before; with one, its index again.
        again = await stub.SubmitRecord(pb.SubmitRecordRequest(record=record(1)))
        assert not again.accepted and "already in the ledger" in again.reason
        again = await stub.SubmitRecord(pb.SubmitRecordRequest(record=record(1), wait_seconds=1))
        assert (again.accepted, again.reason) == (False, "already committed")
        assert (again.committed, again.log_index) == (True, 0)


async def test_a_submission_waits_no_longer_than_asked_when_nothing_commits(
    tmp_path: Path,
) -> None:
    """One authority of four running: no quorum, so the wait ends uncommitted."""
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    initialize_state(nodes[0].directory / "consensus")
    await start(nodes[0], make_genesis(nodes))
    try:
        async with grpc.aio.insecure_channel(nodes[0].address) as channel:
            stub = pb_grpc.ConsensusStub(channel)
            started = time.monotonic()
            reply = await stub.SubmitRecord(
                pb.SubmitRecordRequest(record=record(4), wait_seconds=0.3)
            )
            assert time.monotonic() - started >= 0.3
            assert (reply.accepted, reply.committed) == (True, False)
            reply = await stub.SubmitRecord(
                pb.SubmitRecordRequest(record=record(4), wait_seconds=0.1)
            )
            assert (reply.accepted, reply.reason, reply.committed) == (
                False,
                "already pending",
                False,
            )
    finally:
        await stop(nodes[0])
        for node in nodes[1:]:
            await node.server.stop(None)


@pytest.mark.parametrize("wait", [-1.0, 61.0, float("nan"), float("inf")])
async def test_a_wait_that_is_not_seconds_from_0_to_60_is_an_invalid_argument(
    lone_authority: Node, wait: float
) -> None:
    async with grpc.aio.insecure_channel(lone_authority.address) as channel:
        stub = pb_grpc.ConsensusStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitRecord(pb.SubmitRecordRequest(record=record(5), wait_seconds=wait))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "wait" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitRecords(
                pb.SubmitRecordsRequest(records=[record(5)], wait_seconds=wait)
            )
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert lone_authority.service is not None
    assert record(5) not in lone_authority.service.mempool  # refused before it was looked at
