"""Completing a compact proposal when its sender cannot supply the records it lacks.

A validator that lacks some of a compact proposal's records asks the sender, then every
other authority once, and completes the proposal as soon as the last record is admitted,
whether an authority sent it or gossip did. The table of waiting proposals
(`consensus.completion`) is tested on its own first; then the shell with a scripted
transport; then four authorities over real gRPC whose proposer refuses `GetRecords`, where
the validator lacking the records must prevote for the block, i.e. complete the proposal
in its round, well before the catch-up block sync (which needs a quorum's precommits)
could have given it the block.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia_node.consensus import ConsensusConfig
from pyrsia_node.consensus.completion import AwaitingRecords, ask_order
from pyrsia_node.consensus.service import (
    ASK_NEXT_AFTER,
    ConsensusService,
    GrpcTransport,
    initialize_state,
)
from pyrsia_node.consensus.wire import compact_proposal_to_pb
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.merkle import leaf_hash
from test_consensus_service import (
    CHAIN,
    TIMEOUTS,
    Node,
    make_genesis,
    make_node,
    queued_proposals,
    record,
    signed_proposal,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

H = [bytes([i]) * 32 for i in range(8)]  # record hashes
S1, S2 = b"\x01" * 32, b"\x02" * 32  # senders


# The table of waiting proposals ----------------------------------------------------------


def test_a_proposal_completes_when_its_last_missing_record_arrives() -> None:
    table: AwaitingRecords[str] = AwaitingRecords()
    assert table.add(b"p", "proposal", S1, 1, [H[0], H[1]])
    assert table.supplied(H[0]) == []
    assert table.missing(b"p") == [H[1]]
    assert table.supplied(H[1]) == ["proposal"]
    assert b"p" not in table and len(table) == 0
    assert table.supplied(H[1]) == [], "handed back once"


def test_one_record_completes_every_proposal_waiting_for_it() -> None:
    table: AwaitingRecords[str] = AwaitingRecords()
    table.add(b"p", "first", S1, 1, [H[0]])
    table.add(b"q", "second", S2, 1, [H[0]])
    assert sorted(table.supplied(H[0])) == ["first", "second"]


def test_a_retransmission_does_not_wait_twice() -> None:
    table: AwaitingRecords[str] = AwaitingRecords()
    assert table.add(b"p", "proposal", S1, 1, [H[0]])
    assert not table.add(b"p", "proposal", S1, 1, [H[0]])
    assert len(table) == 1


def test_each_sender_has_at_most_its_share_waiting_the_oldest_making_way() -> None:
    table: AwaitingRecords[str] = AwaitingRecords(per_sender=2)
    for i in range(4):
        table.add(bytes([i]), f"from one {i}", S1, 1 + i, [H[i]])
    table.add(b"other", "from another", S2, 1, [H[7]])
    assert len(table) == 3
    assert b"\x00" not in table and b"\x01" not in table
    assert table.supplied(H[0]) == [], "a dropped proposal leaves no trace"
    assert table.supplied(H[3]) == ["from one 3"]
    assert table.supplied(H[7]) == ["from another"]


def test_proposals_for_decided_heights_are_dropped() -> None:
    table: AwaitingRecords[str] = AwaitingRecords()
    table.add(b"p", "old", S1, 4, [H[0]])
    table.add(b"q", "current", S2, 5, [H[1]])
    table.drop_below(5)
    assert b"p" not in table and b"q" in table
    assert table.supplied(H[0]) == []


def test_a_discarded_proposal_is_not_handed_back() -> None:
    table: AwaitingRecords[str] = AwaitingRecords()
    table.add(b"p", "proposal", S1, 1, [H[0], H[1]])
    assert table.discard(b"p") == "proposal"
    assert table.supplied(H[0]) == [] and table.supplied(H[1]) == []
    assert table.discard(b"p") is None


def test_the_sender_is_asked_first_then_every_other_authority_once() -> None:
    a, b, c, d, me = (bytes([i]) * 32 for i in range(5))
    assert ask_order(c, {a, b, c, d, me}, me) == [c, d, a, b]
    assert ask_order(a, {a, b, me}, me) == [a, b]


# The shell, with a scripted network ---------------------------------------------------------


Answer = Callable[[Sequence[bytes]], Awaitable[list[bytes]]]


class ScriptedTransport:
    """Answers `GetRecords` per authority as the test says; records who was asked."""

    def __init__(self, answers: Mapping[bytes, Answer]) -> None:
        self.answers = answers
        self.asked: list[bytes] = []

    def set_authorities(self, addresses: Mapping[bytes, str], stream: bool) -> None:
        pass

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        pass

    async def fetch_blocks(
        self, peer: bytes, from_height: int, limit: int, follow: bool
    ) -> AsyncIterator[pb.CommittedBlock]:
        for item in ():
            yield item

    async def fetch_records(self, peer: bytes, hashes: Sequence[bytes]) -> list[bytes]:
        self.asked.append(peer)
        return await self.answers[peer](hashes)

    async def fetch_certificate(
        self, peer: bytes, height: int, seconds: float
    ) -> pb.CommitCertificate | None:
        return None

    async def close(self) -> None:
        pass


def holding(*records: bytes) -> Answer:
    async def answer(hashes: Sequence[bytes]) -> list[bytes]:
        return [r for r in records if leaf_hash(r) in hashes]

    return answer


async def refusing(hashes: Sequence[bytes]) -> list[bytes]:
    raise grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "unreachable"
    )


def hanging(released: asyncio.Event) -> Answer:
    async def answer(hashes: Sequence[bytes]) -> list[bytes]:
        await released.wait()
        return []

    return answer


async def shell(
    tmp_path: Path, answers: Callable[[list[bytes]], dict[bytes, Answer]]
) -> tuple[ConsensusService, ScriptedTransport, list[Node]]:
    """Authority 0, not started (no other node runs): only its receiving path is used.
    `answers` maps the other authorities' keys (in genesis order) to their answers."""
    nodes = [await make_node(tmp_path, f"authority-{i}") for i in range(4)]
    for node in nodes:
        await node.server.stop(None)  # never served: only the keys and addresses are used
    transport = ScriptedTransport(answers([n.identity.public_key for n in nodes[1:]]))
    service = ConsensusService(
        nodes[0].identity, make_genesis(nodes), tmp_path / "consensus", None, transport
    )
    return service, transport, nodes


async def test_when_the_proposer_does_not_answer_another_authority_completes_it(
    tmp_path: Path,
) -> None:
    records = (record(1), record(2))
    service, transport, nodes = await shell(
        tmp_path, lambda k: {k[0]: refusing, k[1]: holding(*records), k[2]: holding(*records)}
    )
    proposer = nodes[1].identity
    proposal = signed_proposal(proposer, records)
    service.receive(proposer.public_key, compact_proposal_to_pb(proposal))
    await asyncio.gather(*service._fetches)
    assert queued_proposals(service) == [proposal]
    assert transport.asked[0] == proposer.public_key and len(transport.asked) == 2
    assert service.mempool.get(leaf_hash(record(1))) == record(1)  # admitted, checked


async def test_a_proposer_that_hangs_delays_the_next_ask_by_ask_next_after_only(
    tmp_path: Path,
) -> None:
    released = asyncio.Event()
    records = (record(3),)
    service, _, nodes = await shell(
        tmp_path,
        lambda k: {k[0]: hanging(released), k[1]: holding(*records), k[2]: holding(*records)},
    )
    proposer = nodes[1].identity
    proposal = signed_proposal(proposer, records)
    started = time.monotonic()
    service.receive(proposer.public_key, compact_proposal_to_pb(proposal))
    await asyncio.wait_for(asyncio.gather(*service._fetches), timeout=5)
    took = time.monotonic() - started
    assert queued_proposals(service) == [proposal]
    assert ASK_NEXT_AFTER <= took < ASK_NEXT_AFTER + 0.5
    assert not released.is_set(), "the hung ask was given up, not waited for"


async def test_gossip_completes_a_proposal_no_authority_could_supply(tmp_path: Path) -> None:
    records = (record(4), record(5))
    service, transport, nodes = await shell(tmp_path, lambda k: dict.fromkeys(k, refusing))
    proposer = nodes[1].identity
    proposal = signed_proposal(proposer, records)
    envelope = compact_proposal_to_pb(proposal)
    service.receive(proposer.public_key, envelope)
    await asyncio.gather(*service._fetches)
    assert sorted(transport.asked) == sorted(n.identity.public_key for n in nodes[1:])
    assert queued_proposals(service) == []
    service.receive(proposer.public_key, envelope)  # retransmitted while it waits
    await asyncio.gather(*service._fetches)
    assert len(transport.asked) == 3, "each authority is asked once"
    gossip = nodes[2].identity.public_key
    service.receive(gossip, pb.ConsensusEnvelope(record=record(4)))
    assert queued_proposals(service) == []
    service.receive(gossip, pb.ConsensusEnvelope(records=pb.RecordBatch(records=[record(5)])))
    assert queued_proposals(service) == [proposal], "complete on the last record's arrival"


async def test_records_one_authority_lacks_come_from_the_next(tmp_path: Path) -> None:
    """Answers are merged through the mempool: part from one authority, the rest from
    another."""
    records = (record(6), record(7))
    service, transport, nodes = await shell(
        tmp_path,
        lambda k: {k[0]: holding(record(6)), k[1]: holding(record(7)), k[2]: refusing},
    )
    proposer = nodes[1].identity
    proposal = signed_proposal(proposer, records)
    service.receive(proposer.public_key, compact_proposal_to_pb(proposal))
    await asyncio.gather(*service._fetches)
    assert queued_proposals(service) == [proposal]
    assert transport.asked[0] == proposer.public_key
    assert nodes[2].identity.public_key in transport.asked


# Four authorities over real gRPC ------------------------------------------------------------


class RefuseGetRecords(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Makes a node's server answer every `GetRecords` with UNAVAILABLE."""

    def __init__(self) -> None:
        self.refused = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.endswith("/GetRecords"):
            return grpc.unary_unary_rpc_method_handler(self._refuse)
        return await continuation(details)

    async def _refuse(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.refused += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this proposer does not serve records")


class RecordingGrpcTransport(GrpcTransport):
    def __init__(self, identity: Identity) -> None:
        super().__init__(
            identity, CHAIN, grpc.aio.insecure_channel, lambda: int(time.time() * 1000)
        )
        self.sent: list[pb.ConsensusEnvelope] = []

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        self.sent.append(envelope)
        super().broadcast(envelope)


async def test_a_validator_completes_a_proposal_its_proposer_will_not_serve_in_its_round(
    tmp_path: Path,
) -> None:
    """Authorities 0-2 run, authority 3 is down: no quorum can precommit without the
    victim (authority 2), so it cannot be handed the block by catch-up sync and must
    complete the proposal itself, from authority 0, to prevote for it in round 0. Without
    asking others it would prevote nil when its propose timeout fires."""
    refuser = RefuseGetRecords()
    nodes = []
    for i in range(4):
        server = grpc.aio.server(interceptors=[refuser] if i == 1 else [])
        port = server.add_insecure_port("127.0.0.1:0")
        nodes.append(Node(f"authority-{i}", Identity.generate(), tmp_path / f"a{i}", server, port))
    genesis = make_genesis(nodes)
    holder, proposer, victim = nodes[:3]  # authority-1 proposes height 1, round 0
    running = nodes[:3]
    transports = {}
    for node in running:
        initialize_state(node.directory / "consensus")
        node.ledger = TransparencyLog(node.directory / "ledger")
        transports[node.name] = RecordingGrpcTransport(node.identity)
        node.service = ConsensusService(
            node.identity,
            genesis,
            node.directory / "consensus",
            node.ledger,
            transports[node.name],
            config=ConsensusConfig(CHAIN, timeouts=TIMEOUTS),
        )
        node.service.register(node.server)
        await node.server.start()
        await node.service.start()
    try:
        services = {n.name: n.service for n in running if n.service is not None}
        validators = services[proposer.name].core.chain.validators
        assert validators.proposer(1, 0) == proposer.identity.public_key
        # The holder and the proposer hold the records, as if gossiped to them (records
        # gossiped to a node are not gossiped on); the victim must fetch them.
        batch = pb.ConsensusEnvelope(records=pb.RecordBatch(records=[record(10), record(11)]))
        for node in (holder, proposer):
            services[node.name].receive(nodes[3].identity.public_key, batch)
        await wait_for(lambda: all(s.height >= 1 for s in services.values()), 20)
        block, _ = services[holder.name].blocks.get(1)
        assert set(block.records) == {record(10), record(11)}
        assert refuser.refused >= 1, "the victim asked the proposer first"
        prevotes = [
            e.vote
            for e in transports[victim.name].sent
            if e.HasField("vote") and e.vote.type == pb.CONSENSUS_VOTE_TYPE_PREVOTE
        ]
        assert [(v.height, v.round, v.block_hash) for v in prevotes][:1] == [(1, 0, block.hash)], (
            "the victim's first prevote is for the block, in round 0"
        )
    finally:
        for node in running:
            assert node.service is not None and node.ledger is not None
            await node.service.stop()
            await node.server.stop(None)
            node.ledger.close()
