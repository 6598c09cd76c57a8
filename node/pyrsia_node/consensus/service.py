"""The asyncio/gRPC shell around the consensus core.

`ConsensusService` feeds the core events (messages from authenticated streams, fired
timers, submitted records, synced blocks) one at a time from a single queue and executes
the actions it returns, in order (timers first: `ScheduleTimeout` starts its timer before
the writes listed with it, whose end its event waits for anyway):

* `Persist` is awaited (fsync in a thread) before any later action runs, so no signed
  message leaves before its write-ahead state is durable;
* `Commit` appends the block and certificate to the block store and the block's records to
  the transparency log; the log's new checkpoint is then cosigned and the cosignature
  broadcast by the cosigner task, in commit order but off the core's path (signing and
  storing the note waited for a thread while the next height could already run);
  cosignatures from other authorities are verified and merged into the stored note;
* `Broadcast` goes to every other authority through the transport; `RequestSync` fetches
  committed blocks from a peer and feeds them back as `CommitReceived`.

Proposals travel in compact form: their records as leaf hashes, since every authority
received the records themselves by gossip. A receiver completes a compact proposal from
its mempool before the proposal reaches the core. The records it lacks it fetches
(`GetRecords`) from the authority that sent it, then from each other authority once (they
received the records by gossip too), admitting them through the mempool; meanwhile the
proposal waits (`pyrsia_node.consensus.completion`, bounded per sender) and completes as
soon as its last record is admitted, fetched or gossiped. The core then checks the block as
always (each record pending, i.e. checked at admission, or checked now), so no record is
voted for unchecked.

Records submitted to this node are gossiped to every other authority in one
`RecordBatch` per event-loop turn; a record event whose record has left the mempool
(committed meanwhile) never reaches the core, so no record is proposed twice, and the core
refuses a block repeating a record the log holds. With `registry`, the metrics of
`pyrsia_node.consensus.metrics` are registered there.

A record is judged by the authorities in force (`authorities_in_force`: the ledger's set
at the log's size, which a governance change joins at the commit of its block), not by this
height's voters: the mempool and the core ask `record_valid`, memoised per that set, and
both check their pending records again when it changes.

Nodes that are not validators (peers) run the same core as followers: they never sign,
open no consensus streams and follow the chain with `GetBlocks(follow=True)` from one
authority, accepting a block only with a commit certificate of a quorum of that height's
validator set. They probe the other authorities' heights (`GetBlocks(certificates_only)`)
and leave an authority whose stream ends or that lags behind them
(`pyrsia_node.consensus.following`).

The network is a `ConsensusTransport` (the gRPC one here, fakes in tests); the clock is a
parameter. This module logs with context and never logs key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia.v1 import consensus_pb2_grpc as pb_grpc

from pyrsia_node.consensus.blocks import BlockStore
from pyrsia_node.consensus.chain import ChainState
from pyrsia_node.consensus.completion import AwaitingRecords, ask_order
from pyrsia_node.consensus.core import (
    Action,
    Broadcast,
    Commit,
    CommitReceived,
    ConsensusConfig,
    ConsensusCore,
    EquivocationFound,
    Event,
    Persist,
    ProposalReceived,
    RecordsSubmitted,
    RecordSubmitted,
    RequestSync,
    ScheduleTimeout,
    TimeoutFired,
    VoteReceived,
)
from pyrsia_node.consensus.following import Following, FollowTiming, proves_commit
from pyrsia_node.consensus.governance import (
    governance_decoder,
    governance_record,
    governance_refusal,
)
from pyrsia_node.consensus.mempool import Mempool, MempoolLimits, RecordRejected
from pyrsia_node.consensus.messages import Block, CommitCertificate, Proposal
from pyrsia_node.consensus.metrics import ConsensusMetrics
from pyrsia_node.consensus.outbox import Outbox
from pyrsia_node.consensus.validators import ValidatorSet
from pyrsia_node.consensus.wal import Step, WalState, WriteAheadFile
from pyrsia_node.consensus.wire import (
    WireError,
    certificate_from_pb,
    certificate_to_pb,
    committed_from_pb,
    committed_to_pb,
    compact_proposal_to_pb,
    compact_record_hashes,
    hello_signing_bytes,
    message_from_pb,
    message_to_pb,
    proposal_from_compact_pb,
    verify_hello,
)
from pyrsia_node.genesis import Genesis
from pyrsia_node.identity import Identity, verify_signature
from pyrsia_node.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    NoteSignature,
    SignedNote,
    key_id,
    origin_for,
    sign,
)
from pyrsia_node.ledger.log import LogError, TransparencyLog
from pyrsia_node.ledger.records import RecordError, decode_record
from pyrsia_node.merkle import leaf_hash

log = logging.getLogger(__name__)

WAL_FILE = "wal"
BLOCKS_FILE = "blocks"
SYNC_BATCH = 64
SYNC_BATCH_BYTES = 16 << 20  # of records read from the block file at a time, per request
MAX_BLOCKS_PER_REQUEST = 256
MAX_RECORDS_PER_REQUEST = 10_000  # a block's worth (ConsensusConfig.max_block_records)
RECONNECT_SECONDS = 0.5
RECORD_CHECK_CACHE = 1 << 15
# Bytes queued for one other authority at most (`Outbox`); a gossip batch is up to 1 MiB.
OUTBOX_BYTES = 32 << 20
FETCH_TIMEOUT_SECONDS = 10.0
# Record gossip is batched per event-loop turn, up to this many bytes per envelope (well
# under gRPC's default 4 MiB message limit).
GOSSIP_BATCH_BYTES = 1 << 20
# Records submitted here are gossiped at most this often (seconds): each stream message
# costs far more CPU in gRPC than its bytes, and a few ms add little to a commit.
GOSSIP_INTERVAL = 0.025
# A compact proposal's missing records: the next authority is asked when the one asked
# before failed or has not answered for this long (seconds), well inside a propose timeout.
ASK_NEXT_AFTER = 0.2
# Compact proposals waiting for records, per sending authority.
WAITING_PROPOSALS_PER_SENDER = 2
# The longest a submission may wait for its record's commit (`submit_all_waiting`).
MAX_SUBMIT_WAIT_SECONDS = 60.0

ChannelFactory = Callable[[str], grpc.aio.Channel]


def initialize_state(directory: Path) -> None:
    """Record that this node's key has never signed: call once when the key is created
    together with its data directory (e.g. by `pyrsia up`), never after a data loss.

    A validator started without this file assumes its state was lost while its key was in
    use and refuses to sign until it has caught up (see `ConsensusCore`)."""
    wal = WriteAheadFile(directory / WAL_FILE)
    if wal.load() is None:
        wal.append(WalState(0, 0, Step.NEW_HEIGHT, -1, None, -1, None, (), 0))


class ConsensusTransport(Protocol):
    """How consensus messages and blocks travel; `GrpcTransport` in production."""

    def set_authorities(self, addresses: Mapping[bytes, str], stream: bool) -> None:
        """The authorities (public key -> gRPC address) to talk to; `stream`: whether this
        node sends them consensus messages (validators do, followers do not)."""

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        """Queue `envelope` for every authority; never blocks (drops the oldest when full)."""

    def fetch_blocks(
        self, peer: bytes, from_height: int, limit: int, follow: bool
    ) -> AsyncIterator[pb.CommittedBlock]:
        """Committed blocks from `peer`, from `from_height` on."""

    async def fetch_records(self, peer: bytes, hashes: Sequence[bytes]) -> list[bytes]:
        """The pending records `peer` holds among those with these leaf hashes."""

    async def fetch_certificate(
        self, peer: bytes, height: int, seconds: float
    ) -> pb.CommitCertificate | None:
        """`peer`'s commit certificate for `height`, waiting at most `seconds`; None when
        it has not committed that height."""

    async def close(self) -> None: ...


class GrpcTransport:
    """One outgoing client stream per other authority, each opened with a signed hello."""

    def __init__(
        self,
        identity: Identity,
        chain_id: str,
        channel: ChannelFactory,
        wall_clock_ms: Callable[[], int],
        queue_size: int = 10_000,
        queue_bytes: int = OUTBOX_BYTES,
    ) -> None:
        self._identity = identity
        self._chain_id = chain_id
        self._channel = channel
        self._wall_clock_ms = wall_clock_ms
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._addresses: dict[bytes, str] = {}
        # Per destination, bounded in messages and bytes: a paused authority costs the
        # others at most that much memory (what is dropped, consensus recovers).
        self._queues: dict[bytes, Outbox[pb.ConsensusEnvelope]] = {}
        self._senders: dict[bytes, asyncio.Task[None]] = {}
        # Kept open (by address; closed with the transport): followers probe every
        # authority every second or so.
        self._probe_channels: dict[str, grpc.aio.Channel] = {}

    def set_authorities(self, addresses: Mapping[bytes, str], stream: bool) -> None:
        me = self._identity.public_key
        self._addresses = {k: a for k, a in addresses.items() if k != me}
        wanted = set(self._addresses) if stream else set()
        for key in set(self._senders) - wanted:
            self._senders.pop(key).cancel()
            self._queues.pop(key, None)
        for key in wanted - set(self._senders):
            queue: Outbox[pb.ConsensusEnvelope] = Outbox(self._queue_size, self._queue_bytes)
            self._queues[key] = queue
            self._senders[key] = asyncio.create_task(
                self._send_loop(key, queue), name=f"consensus-stream-{key.hex()[:8]}"
            )

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        size = envelope.ByteSize()
        for queue in self._queues.values():
            queue.put(envelope, size)

    def queued(self) -> dict[bytes, tuple[int, int, int]]:
        """Per destination: envelopes queued, their bytes, envelopes dropped so far."""
        return {k: (len(q), q.bytes, q.dropped) for k, q in self._queues.items()}

    def _hello(self, receiver: bytes) -> pb.StreamHello:
        now = self._wall_clock_ms()
        me = self._identity.public_key
        signature = self._identity.sign(hello_signing_bytes(self._chain_id, me, receiver, now))
        return pb.StreamHello(
            public_key=me,
            chain_id=self._chain_id,
            receiver=receiver,
            timestamp_ms=now,
            signature=signature,
        )

    async def _send_loop(self, key: bytes, queue: Outbox[pb.ConsensusEnvelope]) -> None:
        while True:
            address = self._addresses.get(key)
            if address is None:
                return
            channel = self._channel(address)
            try:
                stub = pb_grpc.ConsensusStub(channel)

                async def envelopes() -> AsyncIterator[pb.ConsensusEnvelope]:
                    yield pb.ConsensusEnvelope(hello=self._hello(key))
                    while True:
                        yield await queue.get()

                await stub.Stream(envelopes())
            except grpc.aio.AioRpcError as exc:
                log.debug("consensus stream to %s ended: %s", address, exc.code())
            finally:
                await channel.close(None)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def fetch_blocks(
        self, peer: bytes, from_height: int, limit: int, follow: bool
    ) -> AsyncIterator[pb.CommittedBlock]:
        address = self._addresses.get(peer)
        if address is None:
            return
        channel = self._channel(address)
        try:
            stub = pb_grpc.ConsensusStub(channel)
            call = stub.GetBlocks(
                pb.GetBlocksRequest(from_height=from_height, limit=limit, follow=follow),
                timeout=None if follow else FETCH_TIMEOUT_SECONDS,
            )
            async for item in call:
                yield item
        finally:
            await channel.close(None)

    async def fetch_records(self, peer: bytes, hashes: Sequence[bytes]) -> list[bytes]:
        address = self._addresses.get(peer)
        if address is None:
            return []
        channel = self._channel(address)
        try:
            stub = pb_grpc.ConsensusStub(channel)
            response = await stub.GetRecords(
                pb.GetRecordsRequest(hashes=list(hashes)), timeout=FETCH_TIMEOUT_SECONDS
            )
            return list(response.records)
        finally:
            await channel.close(None)

    async def fetch_certificate(
        self, peer: bytes, height: int, seconds: float
    ) -> pb.CommitCertificate | None:
        address = self._addresses.get(peer)
        if address is None:
            return None
        channel = self._probe_channels.get(address)
        if channel is None:
            channel = self._probe_channels[address] = self._channel(address)
        call = pb_grpc.ConsensusStub(channel).GetBlocks(
            pb.GetBlocksRequest(from_height=height, limit=1, certificates_only=True),
            timeout=seconds,
        )
        try:
            async for item in call:
                return item.certificate
        finally:
            call.cancel()
        return None

    async def close(self) -> None:
        for task in self._senders.values():
            task.cancel()
        for task in self._senders.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._senders.clear()
        self._queues.clear()
        for channel in self._probe_channels.values():
            await channel.close(None)
        self._probe_channels.clear()


class ConsensusService:
    """Consensus for one node: construct, `register(grpc_server)`, `await start()`,
    `await stop()`."""

    def __init__(
        self,
        identity: Identity,
        genesis: Genesis,
        directory: Path,
        ledger: TransparencyLog | None,
        transport: ConsensusTransport,
        *,
        config: ConsensusConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        mempool_limits: MempoolLimits | None = None,
        record_valid: Callable[[bytes], bool] | None = None,
        on_commit: Callable[[Block, CommitCertificate], None] | None = None,
        registry: CollectorRegistry | None = None,
        follow_timing: FollowTiming | None = None,
    ) -> None:
        self.identity = identity
        self.genesis = genesis
        self.directory = directory
        self.ledger = ledger
        self.transport = transport
        self.config = config or ConsensusConfig(genesis.chain_id)
        self._clock = clock
        self._wall_clock_ms = wall_clock_ms
        self._decoder = governance_decoder(genesis)
        # Memoised per set of authorities in force (`authorities_in_force`: whose
        # attestations count): the mempool and the core both ask, and blocks ask again.
        # Governance records are judged here (`governance_refusal`), the rest by `check`.
        check = record_valid or _canonical_record

        def valid(record: bytes) -> bool:
            return governance_refusal(genesis, record) is None and check(record)

        # Each entry keeps its record's bytes alive: 32,768 entries are ~40 MB, more than a
        # saturated network's mempool holds (~20,000 records in the consensus bench), and
        # the records a block asks about are pending here (found before this cache) or
        # just gossiped. (131,072 entries held ~150 MB of records already committed.)
        self._record_checks = lru_cache(maxsize=RECORD_CHECK_CACHE)(
            lambda _in_force, record: valid(record)
        )
        # The authorities in force until the core exists: the genesis, then the replayed chain's.
        self._replayed_in_force = ValidatorSet.from_genesis(genesis).validators
        # The set the mempool's records were last checked against (see `_commit`).
        self._checked_under = self._replayed_in_force
        self.mempool = Mempool(
            mempool_limits or MempoolLimits(), self._held_by_ledger, self._record_valid
        )
        self._wal = WriteAheadFile(directory / WAL_FILE)
        self._blocks: BlockStore | None = None
        self._core: ConsensusCore | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._timers: set[asyncio.TimerHandle] = set()
        # When the core entered its current step (`pyrsia_consensus_step_seconds`).
        self._since = clock()
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: str | None = None  # see `failure`
        self._sync_task: asyncio.Task[None] | None = None
        self._new_block = asyncio.Condition()
        self._addresses = {a.public_key: a.grpc_address for a in genesis.authorities}
        self._names = {a.public_key: a.name for a in genesis.authorities}
        self._cosignatures: dict[int, list[tuple[bytes, NoteSignature]]] = {}
        # (height, checkpoint) of each commit for the cosigner task, in commit order.
        # `_note_lock`: a note's stored signatures are read, merged and written back by
        # the cosigner's thread and by `_on_cosignature`, one at a time.
        self._note_lock = threading.Lock()
        self._to_cosign: asyncio.Queue[tuple[int, Checkpoint]] = asyncio.Queue()
        self.equivocations = 0
        self._on_commit = on_commit
        self.metrics = ConsensusMetrics(registry or CollectorRegistry(), self.mempool.__len__)
        # Records submitted to this node (not gossiped to it) -> when: for commit latency.
        self._submitted_at: dict[bytes, float] = {}
        # Records submitted here and not yet gossiped: sent in one batch per loop turn.
        self._gossip: list[bytes] = []
        self._gossip_scheduled = False
        # Records admitted during this event-loop turn: they reach the core as one event.
        self._admitted: list[bytes] = []
        # Compact proposals waiting for records, by sender + signature: (sender, proposal,
        # its record hashes).
        self._awaiting: AwaitingRecords[tuple[bytes, pb.ConsensusProposal, list[bytes]]] = (
            AwaitingRecords(WAITING_PROPOSALS_PER_SENDER)
        )
        self._fetches: set[asyncio.Task[None]] = set()
        # Followers: the authority followed and what is known of the others.
        self._follow_timing = follow_timing or FollowTiming()
        self._following: Following | None = None

    # Wiring -----------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ConsensusServicer_to_server(ConsensusServicer(self), server)

    @property
    def core(self) -> ConsensusCore:
        if self._core is None:
            raise RuntimeError("the consensus service has not been started")
        return self._core

    @property
    def blocks(self) -> BlockStore:
        if self._blocks is None:
            raise RuntimeError("the consensus service has not been started")
        return self._blocks

    @property
    def started(self) -> bool:
        return self._core is not None

    @property
    def height(self) -> int:
        """Height of the last committed block."""
        return 0 if self._blocks is None else self._blocks.height

    def is_validator(self) -> bool:
        chain = self.core.chain
        me = self.identity.public_key
        return me in chain.validators or me in chain.next_validators

    def is_authority(self, key: bytes) -> bool:
        chain = self.core.chain
        return key in chain.validators or key in chain.next_validators

    def authorities_in_force(self) -> tuple[bytes, ...]:
        """The authorities whose attestations count for the next record appended to the
        log: the ledger's authorities in force at its size (`ledger.authorities`), i.e. the
        chain's `authorities_in_force` after the last committed block. A governance change
        is in force from the commit of its block on, two heights before it votes; the set
        depends only on the committed chain, so every node judges a record alike. The
        record check (`record_valid`), its cache and the node's Acquire check use it."""
        core = self._core
        if core is None:
            return self._replayed_in_force
        return core.chain.authorities_in_force.validators

    def status(self) -> dict[str, object]:
        core = self.core
        return {
            "height": self.height,
            "round": core.round,
            "step": core.step.name.lower(),
            "validators": len(core.chain.validators),
            "validator": self.is_validator(),
            "signing_floor": core.signing_floor,
            "pending_records": len(self.mempool),
            "equivocations": self.equivocations,
            "failure": self.failure(),
            # Followers: the authority whose committed blocks this node streams.
            "source": None
            if self._following is None
            else self._names.get(self._following.source, self._following.source.hex()[:16]),
        }

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._blocks = await asyncio.to_thread(BlockStore, self.directory / BLOCKS_FILE)
        restored = await asyncio.to_thread(self._wal.load)
        chain = await asyncio.to_thread(self._replay, self._blocks)
        self._replayed_in_force = chain.authorities_in_force.validators
        if self.ledger is not None:
            await asyncio.to_thread(self._catch_up_ledger)
        self._core = ConsensusCore(
            self.config,
            self.identity,
            chain,
            clock=self._clock,
            verify=verify_signature,
            validator_set_change=self._decoder,
            record_valid=self._record_valid,
            record_committed=self._record_committed,
            restored=restored,
            state_lost=restored is None,
        )
        if restored is None and self.is_validator():
            log.warning(
                "consensus: no write-ahead state in %s; this key will not sign until the node "
                "has caught up past every height it may have signed at",
                self.directory,
            )
        self.metrics.height.set(self._blocks.height)
        self._update_transport()
        self._tasks.append(asyncio.create_task(self._run(), name="consensus-core"))
        if self.ledger is not None:
            self._tasks.append(asyncio.create_task(self._cosigner(), name="consensus-cosign"))
        if not self.is_validator():
            self._tasks.append(asyncio.create_task(self._follow(), name="consensus-follow"))
        for task in self._tasks:
            task.add_done_callback(self._ended)
        self._events.put_nowait(_START)

    async def stop(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        tasks = [
            *self._tasks,
            *self._fetches,
            *([self._sync_task] if self._sync_task else []),
        ]
        self._tasks.clear()  # what ends from here on is the stop, not a failure
        for task in tasks:
            task.cancel()
        # A task that died of an error (e.g. the consensus loop stopped by a log that is not
        # this chain's) must not cut the shutdown short: log it, close the transport anyway.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("consensus: task %s had failed: %r", task.get_name(), result)
        await self.transport.close()
        if self._blocks is not None:
            self._blocks.close()

    # Inputs -----------------------------------------------------------------------------

    def submit(self, record: bytes) -> bool:
        """Offer a record; True when it is new. Raises `RecordRejected` with the reason.

        A new record is also sent to the other authorities, so whichever proposes next can
        include it: the records submitted within `GOSSIP_INTERVAL` go out together."""
        (outcome,) = self.submit_all([record])
        if isinstance(outcome, RecordRejected):
            raise outcome
        return outcome

    def submit_all(self, records: Sequence[bytes]) -> list[bool | RecordRejected]:
        """`submit` for each of `records`: what it would return or raise for each."""
        records = list(records)  # a protobuf repeated field makes new bytes per access
        outcomes: list[bool | RecordRejected] = []
        candidates: list[bytes] = []
        for record in records:
            refusal = governance_refusal(self.genesis, record)
            # The mempool's refusal would not say what is wrong with a governance record.
            outcomes.append(RecordRejected(f"record refused: {refusal}") if refusal else True)
            if refusal is None:
                candidates.append(record)
        admitted = iter(self._admit_all(candidates))
        now = self._clock()
        for position, record in enumerate(records):
            if outcomes[position] is not True:
                continue
            outcome = outcomes[position] = next(admitted)
            if outcome is True:
                self._submitted_at[record] = now
                self._gossip.append(record)
        if self._gossip and not self._gossip_scheduled:
            self._gossip_scheduled = True
            asyncio.get_running_loop().call_later(GOSSIP_INTERVAL, self._send_gossip)
        return outcomes

    def _send_gossip(self) -> None:
        self._gossip_scheduled = False
        batch: list[bytes] = []
        size = 0
        for record in self._gossip:
            if batch and size + len(record) > GOSSIP_BATCH_BYTES:
                self.transport.broadcast(
                    pb.ConsensusEnvelope(records=pb.RecordBatch(records=batch))
                )
                batch, size = [], 0
            batch.append(record)
            size += len(record)
        if batch:
            self.transport.broadcast(pb.ConsensusEnvelope(records=pb.RecordBatch(records=batch)))
        self._gossip = []

    def _admit_all(self, records: Sequence[bytes]) -> list[bool | RecordRejected]:
        """The mempool's `admit_all`; the admitted records reach the core together at the
        end of this event-loop turn and complete the compact proposals waiting for them."""
        outcomes = self.mempool.admit_all(records)
        admitted = [r for r, outcome in zip(records, outcomes, strict=True) if outcome is True]
        if not admitted:
            return outcomes
        if not self._admitted:
            asyncio.get_running_loop().call_soon(self._hand_admitted_to_core)
        self._admitted += admitted
        for record in admitted if self._awaiting else ():
            for sender, message, hashes in self._awaiting.supplied(leaf_hash(record)):
                found = _complete(hashes, self.mempool.get)
                if found is not None:  # else one left the mempool: its block committed
                    self._hand_over(sender, message, found)
        return outcomes

    def _hand_admitted_to_core(self) -> None:
        if self._admitted:
            self._events.put_nowait(RecordsSubmitted(tuple(self._admitted)))
            self._admitted = []

    def receive(self, sender: bytes, envelope: pb.ConsensusEnvelope) -> None:
        """An envelope from the authenticated authority `sender`."""
        body = envelope.WhichOneof("body")
        if body == "cosignature":
            self._on_cosignature(sender, envelope.cosignature)
            return
        if body == "record":
            self._admit_all([envelope.record])
            return
        if body == "records":
            self._admit_all(list(envelope.records.records))
            return
        try:
            hashes = compact_record_hashes(envelope.proposal) if body == "proposal" else None
            if hashes is not None:
                self._receive_compact(sender, envelope.proposal, hashes)
                return
            message = message_from_pb(envelope)
        except (WireError, ValueError) as exc:
            log.warning("consensus: malformed message from %s: %s", sender.hex()[:16], exc)
            return
        event: Event = (
            ProposalReceived(message, sender)
            if isinstance(message, Proposal)
            else VoteReceived(message, sender)
        )
        self._events.put_nowait(event)

    def _receive_compact(
        self, sender: bytes, message: pb.ConsensusProposal, hashes: list[bytes]
    ) -> None:
        records = _complete(hashes, self.mempool.get)
        if records is not None:
            proposal = proposal_from_compact_pb(message, records)
            self._events.put_nowait(ProposalReceived(proposal, sender))
            return
        height = message.compact_block.height
        core = self._core
        if core is not None:
            if height < core.height:
                return  # decided already
            self._awaiting.drop_below(core.height)
        key = sender + message.signature  # the signature alone is no proof before completion
        missing = [h for h in hashes if self.mempool.get(h) is None]
        if not self._awaiting.add(key, (sender, message, hashes), sender, height, missing):
            return  # a retransmission of one that waits
        task = asyncio.create_task(
            self._fetch_missing(key, sender), name="consensus-complete-proposal"
        )
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch_missing(self, key: bytes, sender: bytes) -> None:
        """Ask `sender` (which proposed or holds the block) for the records the waiting
        proposal `key` lacks, then each other authority once (`completion.ask_order`): the
        next one as soon as an ask failed or none answered for `ASK_NEXT_AFTER` seconds.
        Asking stops once the proposal is complete, from an answer or from gossip
        (`_admit`); if no one supplies every record it waits for gossip until its height is
        decided or its sender's newer proposals push it out."""
        authorities = self._authority_keys()
        asks: set[asyncio.Task[None]] = set()
        try:
            for peer in ask_order(sender, authorities, self.identity.public_key):
                if key not in self._awaiting:
                    return
                asks.add(asyncio.create_task(self._ask_for_records(key, peer)))
                _, asks = await asyncio.wait(
                    asks, timeout=ASK_NEXT_AFTER, return_when=asyncio.FIRST_COMPLETED
                )
            while asks and key in self._awaiting:
                _, asks = await asyncio.wait(asks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for ask in asks:
                ask.cancel()
            await asyncio.gather(*asks, return_exceptions=True)

    async def _ask_for_records(self, key: bytes, peer: bytes) -> None:
        """Fetch from `peer` the records the waiting proposal `key` lacks and admit them
        (the last one completes it). A record the mempool refuses (it may be full) still
        completes the proposal: the core checks every record of a block anyway."""
        missing = self._awaiting.missing(key)
        if not missing:
            return
        try:
            fetched = await self.transport.fetch_records(peer, missing)
        except grpc.aio.AioRpcError as exc:
            log.debug("consensus: fetching records from %s failed: %s", peer.hex()[:16], exc)
            return
        wanted = set(missing)
        found: dict[bytes, bytes] = {}
        for record in fetched:
            record_hash = leaf_hash(record)
            if record_hash in wanted:
                found[record_hash] = record
        self._admit_all(list(found.values()))
        waiting = self._awaiting.get(key)
        if waiting is None or not found:
            return
        sender, message, hashes = waiting
        records = _complete(hashes, lambda h: found[h] if h in found else self.mempool.get(h))
        if records is None:
            log.debug("consensus: %s lacks records of a proposal it was asked for", peer.hex()[:16])
            return
        self._awaiting.discard(key)
        self._hand_over(sender, message, records)

    def _hand_over(
        self, sender: bytes, message: pb.ConsensusProposal, records: list[bytes]
    ) -> None:
        """Give the core a completed compact proposal, after the records admitted so far."""
        try:
            proposal = proposal_from_compact_pb(message, records)
        except (WireError, ValueError) as exc:
            log.warning("consensus: malformed proposal from %s: %s", sender.hex()[:16], exc)
            return
        self._hand_admitted_to_core()
        self._events.put_nowait(ProposalReceived(proposal, sender))

    def records_by_hash(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The records among `hashes` this node holds: pending, or in a block of the
        current height (a proposal it may be asked to complete after a restart)."""
        found = []
        missing = []
        for key in hashes:
            record = self.mempool.get(key)
            if record is None:
                missing.append(key)
            else:
                found.append(record)
        if missing and self._core is not None:
            known = {leaf_hash(r): r for block in self._core.known_blocks() for r in block.records}
            found += [known[key] for key in missing if key in known]
        return found

    async def blocks_from(
        self, from_height: int, limit: int, follow: bool
    ) -> AsyncIterator[tuple[Block, CommitCertificate]]:
        height = max(from_height, 1)
        remaining = limit if limit > 0 else (1 << 62 if follow else MAX_BLOCKS_PER_REQUEST)
        remaining = remaining if follow else min(remaining, MAX_BLOCKS_PER_REQUEST)
        while remaining > 0:
            batch = min(remaining, SYNC_BATCH)
            if self.blocks.cached(height):  # a follower at the head: in memory
                items = self.blocks.range(height, batch, SYNC_BATCH_BYTES)
            else:  # older blocks are read from the file: not on the event loop
                items = await asyncio.to_thread(self.blocks.range, height, batch, SYNC_BATCH_BYTES)
            for item in items:
                yield item
                height += 1
                remaining -= 1
            if not follow:
                if height > self.blocks.height or remaining <= 0:
                    return
                continue
            async with self._new_block:
                await self._new_block.wait_for(partial(self._has_height, height))

    def _has_height(self, height: int) -> bool:
        return self.blocks.height >= height

    # The loop ---------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the consensus loop has died (e.g. the disk refused a write)."""
        return self.started and self.failure() is None

    def failure(self) -> str | None:
        """Why the first task of this service to end has ended (its error), or None while
        they all run: the node then neither votes nor commits until it is restarted. It
        stays the first one's reason when others end after it (they often fail for the
        same cause, e.g. a full disk, a moment later)."""
        return self._failure

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._failure is not None or not self._tasks:  # not the first, or stopping
            return
        if task.cancelled():
            self._failure = f"{task.get_name()} was cancelled"
            return
        error = task.exception()
        self._failure = f"{task.get_name()} ended" + (f": {error!r}" if error else "")

    async def _run(self) -> None:
        while True:
            event = await self._events.get()
            core = self.core
            # A record committed (or synced) since it was admitted must not reach the core:
            # proposing it again would put it in the log twice.
            if isinstance(event, RecordSubmitted) and event is not _START:
                if event.record not in self.mempool:
                    continue
            elif isinstance(event, RecordsSubmitted):
                event = RecordsSubmitted(tuple(r for r in event.records if r in self.mempool))
            height, round_, step = core.height, core.round, core.step
            actions = core.start() if event is _START else core.handle(event)
            self._count_round_changes(height, round_)
            if (core.height, core.round, core.step) != (height, round_, step):
                new_height = core.height != height
                self._time_step(step, core.step, new_height or core.round != round_, new_height)
            try:
                await self._execute(actions)
            except Exception:
                # A failed Persist or Commit leaves no safe way on: stop voting, loudly.
                log.critical(
                    "consensus stopped at height %d: an action failed", core.height, exc_info=True
                )
                raise

    def _time_step(self, left: Step, entered: Step, new_round: bool, new_height: bool) -> None:
        """The core left step `left` for `entered`: observe the time spent in `left`, and 0 s
        for each step it went through within the same event (the rest of the round it left,
        the steps of the new round before `entered`), so each step counts once per round."""
        now = self._clock()
        steps = self.metrics.step_seconds
        steps.labels(_STEP_NAMES[left]).observe(now - self._since)
        if new_round:
            first = Step.NEW_HEIGHT if new_height else Step.PROPOSE
            skipped = [*range(left + 1, Step.PRECOMMIT + 1), *range(first, entered)]
        else:
            skipped = list(range(left + 1, entered))
        for step in skipped:
            steps.labels(_STEP_NAMES[Step(step)]).observe(0.0)
        self._since = now

    def _count_round_changes(self, height: int, round_: int) -> None:
        core = self.core
        metrics = self.metrics
        if core.height == height:
            if core.round > round_:
                metrics.round_changes.inc(core.round - round_)
        elif core.round > 0:
            metrics.round_changes.inc(core.round)
        metrics.round.set(core.round)

    async def _execute(self, actions: list[Action]) -> None:
        loop = asyncio.get_running_loop()
        # Timers first: a timeout runs from the step that set it, not from the end of the
        # writes listed before it. So the pause before the next height runs from the
        # decision and overlaps the commit's writes, as CometBFT's timeout_commit runs from
        # the commit time. A fired timer's event is handled only after these actions.
        for action in actions:
            if isinstance(action, ScheduleTimeout):
                self._schedule(loop, action)
        for action in actions:
            if isinstance(action, Persist):
                await asyncio.to_thread(self._wal.append, action.state)
            elif isinstance(action, Broadcast):
                message = action.message
                self.transport.broadcast(
                    compact_proposal_to_pb(message)
                    if isinstance(message, Proposal)
                    else message_to_pb(message)
                )
            elif isinstance(action, Commit):
                await self._commit(action.block, action.certificate)
            elif isinstance(action, RequestSync):
                if self._sync_task is None or self._sync_task.done():
                    self._sync_task = asyncio.create_task(
                        self._sync(action.peer, action.from_height), name="consensus-sync"
                    )
            elif isinstance(action, EquivocationFound):
                self.equivocations += 1
                self.metrics.equivocations.inc()
                first = action.first
                log.warning(
                    "consensus: equivocation by %s at height %d round %d",
                    (first.proposer if isinstance(first, Proposal) else first.validator).hex()[:16],
                    first.height,
                    first.round,
                )

    def _schedule(self, loop: asyncio.AbstractEventLoop, action: ScheduleTimeout) -> None:
        event = TimeoutFired(action.timeout)

        def fire() -> None:
            self._timers.discard(handle)
            self._events.put_nowait(event)

        handle = loop.call_later(action.delay, fire)
        self._timers.add(handle)

    async def _commit(self, block: Block, cert: CommitCertificate) -> None:
        started = self._clock()
        await asyncio.to_thread(self._persist_commit, block, cert)
        self.mempool.committed(block.records)
        in_force = self.authorities_in_force()
        if in_force != self._checked_under:
            # Pending records were checked against the authorities then in force.
            self._checked_under = in_force
            self.mempool.retain(self._record_valid)
        self._observe_commit(block)
        if self._on_commit is not None:
            self._on_commit(block, cert)
        self._learn_authorities(block)
        self._update_transport()
        self.metrics.step_seconds.labels("commit").observe(self._clock() - started)
        async with self._new_block:
            self._new_block.notify_all()
        log.info(
            "consensus: committed height %d (%d records, round %d)",
            block.height,
            len(block.records),
            cert.round,
        )
        ledger = self.ledger
        if ledger is not None and self.identity.public_key in self._names:
            # The checkpoint of this block's log: the log may have grown by the time the
            # cosigner gets to it.
            checkpoint = Checkpoint(origin_for(self.genesis.chain_id), ledger.size, ledger.root())
            self._to_cosign.put_nowait((block.height, checkpoint))

    def _observe_commit(self, block: Block) -> None:
        metrics = self.metrics
        metrics.height.set(block.height)
        metrics.committed_records.inc(len(block.records))
        if self._submitted_at:
            now = self._clock()
            for record in block.records:
                submitted = self._submitted_at.pop(record, None)
                if submitted is not None:
                    metrics.commit_latency.observe(now - submitted)

    def _persist_commit(self, block: Block, cert: CommitCertificate) -> None:
        held = 0 if self.ledger is None else self._records_held(self.blocks.records, block)
        self.blocks.append(block, cert)
        if self.ledger is not None and held < len(block.records):
            # The core commits only records `_record_valid` accepted here, and that check
            # decodes each one (`record_valid` must refuse non-canonical records, as
            # `build.record_validator` and `_canonical_record` do): no need to check again.
            self.ledger.append(block.records[held:], checked=True)

    def _records_held(self, start: int, block: Block) -> int:
        """How many of `block`'s records, which belong at index `start` on, the log holds
        already: it outlives the block store when only the consensus directory was lost,
        and the blocks then come back by sync. Raises `LogError` unless they are these."""
        ledger = self.ledger
        assert ledger is not None
        held = min(max(ledger.size - start, 0), len(block.records))
        for offset in range(held):
            if ledger.entry(start + offset) != block.records[offset]:
                raise LogError(
                    f"log entry {start + offset} is not the record block {block.height} "
                    "committed there: the ledger directory is not this chain's; move it away "
                    "and restart to rebuild it by block sync"
                )
        return held

    def _replay(self, blocks: BlockStore) -> ChainState:
        """The chain state after every stored block (validator sets, authorities)."""
        chain = ChainState.genesis(ValidatorSet.from_genesis(self.genesis))
        for block, _ in blocks:
            chain = chain.after(block, self._decoder)
            self._learn_authorities(block)
        return chain

    def _catch_up_ledger(self) -> None:
        """Re-append records of stored blocks the ledger lost in a crash between the two."""
        ledger = self.ledger
        if ledger is None:
            return
        for height in range(self.blocks.height_of_record(ledger.size), self.blocks.height + 1):
            block, _ = self.blocks.get(height)
            ledger.append(block.records[ledger.size - self.blocks.records_before(height) :])

    # Checkpoints ------------------------------------------------------------------------

    async def _cosigner(self) -> None:
        """Cosign each committed block's checkpoint, in commit order (`_cosign` in a thread),
        and broadcast the cosignature. A failure to store the note stops it, and with it
        `healthy`, as it stopped the core when cosigning was part of the commit."""
        while True:
            height, checkpoint = await self._to_cosign.get()
            envelope = await asyncio.to_thread(self._cosign, height, checkpoint)
            self.transport.broadcast(envelope)

    def _cosign(self, height: int, checkpoint: Checkpoint) -> pb.ConsensusEnvelope:
        """Sign `checkpoint` (the log after block `height`), merge the cosignatures that
        arrived before it and store the note; the envelope to broadcast."""
        ledger = self.ledger
        assert ledger is not None
        name = self._names[self.identity.public_key]
        own = sign(checkpoint, name, self.identity)
        early = [
            signature
            for signer, signature in self._cosignatures.pop(checkpoint.size, [])
            if self._cosignature_valid(checkpoint, signer, signature)
        ]
        with self._note_lock:
            note = self._stored_note(checkpoint) or SignedNote(checkpoint.body(), ())
            for signature in [own, *early]:
                note = note.with_signature(signature)
            ledger.put_checkpoint(note.format())
        return pb.ConsensusEnvelope(
            cosignature=pb.CheckpointCosignature(
                height=height,
                tree_size=checkpoint.size,
                root=checkpoint.root,
                name=own.name,
                key_id=own.key_id,
                signature=own.signature,
            )
        )

    def _stored_note(self, checkpoint: Checkpoint) -> SignedNote | None:
        assert self.ledger is not None
        text = self.ledger.checkpoint(checkpoint.size)
        if text is None:
            return None
        note = SignedNote.parse(text)
        return note if note.body == checkpoint.body() else None

    def _cosignature_valid(self, checkpoint: Checkpoint, signer: bytes, sig: NoteSignature) -> bool:
        return self._names.get(signer) == sig.name and (
            sig.key_id == key_id(sig.name, signer)
            and verify_signature(signer, sig.signature, checkpoint.body())
        )

    def _on_cosignature(self, sender: bytes, message: pb.CheckpointCosignature) -> None:
        try:
            signature = NoteSignature(message.name, message.key_id, message.signature)
        except (CheckpointError, ValueError):
            return
        ledger = self.ledger
        if ledger is None:
            return
        if message.tree_size > ledger.size:
            pending = self._cosignatures.setdefault(message.tree_size, [])
            if len(pending) < 4 * len(self._names) and len(self._cosignatures) < 1024:
                pending.append((sender, signature))
            return
        try:
            checkpoint = Checkpoint(
                origin_for(self.genesis.chain_id), message.tree_size, message.root
            )
            if message.root != ledger.root(message.tree_size):
                log.warning(
                    "consensus: %s cosigned a root for tree size %d that is not ours",
                    self._names.get(sender, sender.hex()[:16]),
                    message.tree_size,
                )
                return
            if not self._cosignature_valid(checkpoint, sender, signature):
                return
            with self._note_lock:
                note = self._stored_note(checkpoint) or SignedNote(checkpoint.body(), ())
                ledger.put_checkpoint(note.with_signature(signature).format())
        except (CheckpointError, LogError) as exc:
            log.warning("consensus: cosignature for size %d dropped: %s", message.tree_size, exc)

    # Sync and follow --------------------------------------------------------------------

    async def _sync(self, peer: bytes, from_height: int) -> None:
        try:
            async for item in self.transport.fetch_blocks(peer, from_height, SYNC_BATCH, False):
                self._events.put_nowait(CommitReceived(*committed_from_pb(item)))
        except (grpc.aio.AioRpcError, WireError, ValueError) as exc:
            log.debug("consensus: block sync from %s failed: %s", peer.hex()[:16], exc)

    async def _follow(self) -> None:
        """Followers: stream committed blocks from one authority (the source), probe the
        others every `FollowTiming.probe_interval`, and move on when the source's stream
        ends or the source lags (the rules and their invariants:
        `pyrsia_node.consensus.following`). Whoever sends a block, the core accepts it
        only with a valid commit certificate."""
        timing = self._follow_timing
        self._following = Following.begin(
            self._voters(), self.core.height - 1, self._clock(), timing
        )
        stream: asyncio.Task[None] | None = None
        try:
            while True:
                if stream is None:
                    stream = asyncio.create_task(
                        self._stream_blocks(self._following.source),
                        name="consensus-follow-stream",
                    )
                await asyncio.wait({stream}, timeout=timing.probe_interval)
                if stream.done():
                    stream.result()  # errors it does not expect end the follower
                    stream = None
                    await asyncio.sleep(RECONNECT_SECONDS)
                    ended = self._following.source
                    self._following = self._following.after_stream_end(
                        self._voters(), self._clock()
                    )
                    if self._following.source != ended:
                        self.metrics.source_switches.labels("stream_end").inc()
                    continue
                await self._probe_authorities()
                moved = self._following.next_source(self._voters(), self._clock())
                if moved is not None:
                    log.info(
                        "consensus: following %s instead of %s, which lags at height %d",
                        self._names.get(moved.source, moved.source.hex()[:16]),
                        self._names.get(self._following.source, "?"),
                        self._following.delivered(self._clock()),
                    )
                    stream.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await stream
                    stream = None
                    self._following = moved
                    self.metrics.source_switches.labels("lag").inc()
        finally:
            if stream is not None:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream

    async def _stream_blocks(self, source: bytes) -> None:
        """Hand the core the blocks `source` streams, from the next undecided height on."""
        try:
            async for item in self.transport.fetch_blocks(source, self.core.height, 0, True):
                block, cert = committed_from_pb(item)
                following = self._following
                if following is not None and following.source == source:
                    self._following = following.streamed_block(block.height)
                self._events.put_nowait(CommitReceived(block, cert))
        except (grpc.aio.AioRpcError, WireError, ValueError) as exc:
            log.debug("consensus: following %s failed: %s", source.hex()[:16], exc)

    async def _probe_authorities(self) -> None:
        """Ask every authority but the source for its commit certificate of the next height
        this node has not decided, and note who proved it (`Following.proved`)."""
        assert self._following is not None
        chain = self.core.chain
        self._following = self._following.decided_height(chain.height - 1, self._clock())
        others = [k for k in sorted(chain.validators.validators) if k != self._following.source]
        proved = await asyncio.gather(
            *(self._probe(key, chain.height, chain.validators) for key in others)
        )
        now = self._clock()
        for key, ok in zip(others, proved, strict=True):
            self._following = self._following.proved(key, chain.height if ok else None, now)

    async def _probe(self, peer: bytes, height: int, validators: ValidatorSet) -> bool:
        """Whether `peer` shows a valid commit certificate for `height`."""
        try:
            message = await self.transport.fetch_certificate(
                peer, height, self._follow_timing.probe_interval
            )
            if message is None:
                return False
            cert = certificate_from_pb(message)
        except (grpc.aio.AioRpcError, WireError, ValueError) as exc:
            log.debug("consensus: probing %s failed: %s", peer.hex()[:16], exc)
            return False
        return proves_commit(self.config.chain_id, cert, height, validators, verify_signature)

    def _voters(self) -> list[bytes]:
        return sorted(self.core.chain.validators.validators)

    # Authorities ------------------------------------------------------------------------

    def _learn_authorities(self, block: Block) -> None:
        for record in block.records:
            governance = governance_record(self.genesis, record)
            if governance is not None and governance.grpc_address:
                self._addresses[governance.public_key] = governance.grpc_address
                self._names[governance.public_key] = governance.name

    def _authority_keys(self) -> set[bytes]:
        """The validators of this height and the next (the genesis ones before start)."""
        core = self._core
        if core is None:
            return set(self._addresses)
        chain = core.chain
        return {*chain.validators.validators, *chain.next_validators.validators}

    def _update_transport(self) -> None:
        chain = self.core.chain
        keys = set(chain.validators.validators) | set(chain.next_validators.validators)
        addresses = {k: self._addresses[k] for k in keys if k in self._addresses}
        self.transport.set_authorities(addresses, stream=self.is_validator())

    def _record_valid(self, record: bytes) -> bool:
        # Keyed by the set the check itself reads (the node's `record_valid` asks
        # `authorities_in_force` too), so a new set means a fresh check.
        result: bool = self._record_checks(self.authorities_in_force(), record)
        return result

    def _record_committed(self, record: bytes) -> bool:
        return bool(self._held_by_ledger([leaf_hash(record)]))

    def _held_by_ledger(self, record_hashes: Sequence[bytes]) -> set[bytes]:
        """Those of `record_hashes` committed as far as this node's chain has come."""
        return set(self._committed_indexes(record_hashes))

    def _committed_indexes(self, record_hashes: Sequence[bytes]) -> dict[bytes, int]:
        """The log index of each of `record_hashes` committed as far as this node's chain
        has come; the others are left out."""
        if self.ledger is None:
            return {}
        found = self.ledger.indexes_of(record_hashes)
        # Entries beyond the stored blocks' records (see `_records_held`) are not committed
        # as far as this node's chain has come yet.
        end = None if self._blocks is None else self._blocks.records
        return {h: index for h, index in found.items() if end is None or index < end}

    async def wait_committed_all(
        self, record_hashes: Sequence[bytes], seconds: float
    ) -> dict[bytes, int]:
        """The log index of each of `record_hashes` committed within `seconds` (checked
        after each commit, those still missing only); the others are left out."""
        found = self._committed_indexes(record_hashes)
        missing = [h for h in dict.fromkeys(record_hashes) if h not in found]

        def all_found() -> bool:
            missing[:] = [h for h in missing if h not in found]
            found.update(self._committed_indexes(missing))
            return all(h in found for h in missing)

        if missing and seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with self._new_block:
                    await asyncio.wait_for(self._new_block.wait_for(all_found), seconds)
        return found

    async def submit_all_waiting(
        self, records: Sequence[bytes], wait: float
    ) -> list[Submission | RecordRejected]:
        """`submit_all`, then, when `wait` > 0, up to `wait` seconds for blocks that
        commit the records admitted or pending (CometBFT's broadcast_tx_commit). A record
        the log holds already is answered with its index instead of refused, so that
        resubmitting with a wait until the answer says committed is how a client makes
        sure a record is in (the mempool is memory). Raises ValueError for a `wait` that
        is not from 0 to `MAX_SUBMIT_WAIT_SECONDS`."""
        if not 0 <= wait <= MAX_SUBMIT_WAIT_SECONDS:  # also refuses nan
            raise ValueError(f"wait: seconds from 0 to {MAX_SUBMIT_WAIT_SECONDS:.0f}")
        if not wait:  # the hot path (SubmitRecords batches): no hashing, no look-ups
            return [
                o if isinstance(o, RecordRejected) else Submission(new=o)
                for o in self.submit_all(records)
            ]
        records = list(records)
        hashes = [leaf_hash(record) for record in records]
        before = self._committed_indexes(hashes)
        outcomes: list[Submission | RecordRejected] = []
        for record_hash, submitted in zip(hashes, self.submit_all(records), strict=True):
            if record_hash in before:
                outcomes.append(Submission(new=False, index=before[record_hash]))
            elif isinstance(submitted, RecordRejected):
                outcomes.append(submitted)
            else:
                outcomes.append(Submission(new=submitted))
        # A refusal may be a commit between the look-up above and the submission: looked
        # up once more, not waited for (a refused record may never commit).
        found = self._committed_indexes(
            [h for h, o in zip(hashes, outcomes, strict=True) if isinstance(o, RecordRejected)]
        )
        pending = [h for h, o in zip(hashes, outcomes, strict=True) if _is_pending(o)]
        found.update(await self.wait_committed_all(pending, wait))
        for position, (record_hash, outcome) in enumerate(zip(hashes, outcomes, strict=True)):
            if record_hash in found:
                new = isinstance(outcome, Submission) and outcome.new
                outcomes[position] = Submission(new=new, index=found[record_hash])
        return outcomes


@dataclass(frozen=True, slots=True)
class Submission:
    """What became of a submitted record: ``new`` when this submission admitted it (else
    it was pending already, or committed); ``index``, its index in this node's log once a
    block this node holds committed it (only looked for when the submission waited)."""

    new: bool
    index: int | None = None

    @property
    def status(self) -> str:
        if self.index is not None:
            return "committed"
        return "admitted" if self.new else "already pending"


def _complete(hashes: list[bytes], lookup: Callable[[bytes], bytes | None]) -> list[bytes] | None:
    """The records for `hashes` in order, or None when `lookup` lacks one."""
    records = []
    for key in hashes:
        record = lookup(key)
        if record is None:
            return None
        records.append(record)
    return records


def _is_pending(outcome: Submission | RecordRejected) -> bool:
    return isinstance(outcome, Submission) and outcome.index is None


def _canonical_record(record: bytes) -> bool:
    try:
        decode_record(record)
    except RecordError:
        return False
    return True


_STEP_NAMES = {step: step.name.lower() for step in Step}
_START: Event = RecordSubmitted(b"")  # sentinel: the first event starts the core


class ConsensusServicer(pb_grpc.ConsensusServicer):
    def __init__(self, service: ConsensusService) -> None:
        self._service = service

    async def Stream(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.ConsensusEnvelope],
        context: grpc.aio.ServicerContext[pb.ConsensusEnvelope, pb.StreamSummary],
    ) -> pb.StreamSummary:
        service = self._service
        if not service.started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "consensus is starting; retry")
        sender: bytes | None = None
        received = 0
        async for envelope in request_iterator:
            if sender is None:
                if envelope.WhichOneof("body") != "hello":
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED, "a consensus stream starts with a hello"
                    )
                try:
                    sender = verify_hello(
                        envelope.hello,
                        service.genesis.chain_id,
                        service.identity.public_key,
                        service._wall_clock_ms(),
                    )
                except WireError as exc:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                    raise
                if not service.is_authority(sender):
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "only authorities may open consensus streams",
                    )
                continue
            service.receive(sender, envelope)
            received += 1
        return pb.StreamSummary(received=received)

    async def GetBlocks(  # noqa: N802 (gRPC method name)
        self,
        request: pb.GetBlocksRequest,
        context: grpc.aio.ServicerContext[pb.GetBlocksRequest, pb.CommittedBlock],
    ) -> AsyncIterator[pb.CommittedBlock]:
        if not self._service.started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "consensus is starting; retry")
        async for block, cert in self._service.blocks_from(
            request.from_height, request.limit, request.follow
        ):
            if request.certificates_only:
                yield pb.CommittedBlock(certificate=certificate_to_pb(cert))
            else:
                yield committed_to_pb(block, cert)

    async def GetRecords(  # noqa: N802 (gRPC method name)
        self,
        request: pb.GetRecordsRequest,
        context: grpc.aio.ServicerContext[pb.GetRecordsRequest, pb.GetRecordsResponse],
    ) -> pb.GetRecordsResponse:
        if not self._service.started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "consensus is starting; retry")
        if len(request.hashes) > MAX_RECORDS_PER_REQUEST:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_RECORDS_PER_REQUEST} records per request",
            )
        return pb.GetRecordsResponse(records=self._service.records_by_hash(request.hashes))

    async def SubmitRecord(  # noqa: N802 (gRPC method name)
        self,
        request: pb.SubmitRecordRequest,
        context: grpc.aio.ServicerContext[pb.SubmitRecordRequest, pb.SubmitRecordResponse],
    ) -> pb.SubmitRecordResponse:
        (result,) = await self._submit([request.record], request.wait_seconds, context)
        return result

    async def SubmitRecords(  # noqa: N802 (gRPC method name)
        self,
        request: pb.SubmitRecordsRequest,
        context: grpc.aio.ServicerContext[pb.SubmitRecordsRequest, pb.SubmitRecordsResponse],
    ) -> pb.SubmitRecordsResponse:
        results = await self._submit(request.records, request.wait_seconds, context)
        return pb.SubmitRecordsResponse(results=results)

    async def _submit(
        self,
        records: Sequence[bytes],
        wait: float,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> list[pb.SubmitRecordResponse]:
        try:
            outcomes = await self._service.submit_all_waiting(records, wait)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_seconds: {exc}")
            raise
        results = []
        for outcome in outcomes:
            if isinstance(outcome, RecordRejected):
                results.append(pb.SubmitRecordResponse(accepted=False, reason=outcome.reason))
                continue
            reason = ""
            if not outcome.new:
                reason = "already pending" if outcome.index is None else "already committed"
            result = pb.SubmitRecordResponse(accepted=outcome.new, reason=reason)
            if outcome.index is not None:
                result.committed = True
                result.log_index = outcome.index
            results.append(result)
        return results
