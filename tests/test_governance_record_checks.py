"""Which authorities count, right after a governance change: one definition everywhere.

The set whose attestations count for a record appended at log index N is the ledger's set
in force at size N (``ledger.authorities``); a change committed at height H is in it from the
block after H on, while it votes only from H + 2. These tests hold the node to that in the
two heights where the two sets differ: a real ``server.Node`` (its consensus started, no
server listening) over a chain whose last block carries the change, so its record check,
its cache, its mempool, its core and its Acquire check all answer at the next height.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from conftest import free_port_block
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia.v1 import build_pb2
from pyrsia_node import config
from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import AcquireRefused, acquire_signing_bytes, artifact_record
from pyrsia_node.consensus import (
    Block,
    ChainState,
    CommitCertificate,
    CommitSignature,
    MessageKind,
    Proposal,
    ValidatorSet,
    Vote,
    VoteType,
    signing_bytes,
)
from pyrsia_node.consensus.blocks import BlockStore
from pyrsia_node.consensus.governance import governance_decoder
from pyrsia_node.consensus.mempool import RecordRejected
from pyrsia_node.consensus.wire import message_to_pb
from pyrsia_node.genesis import Authority, Genesis, LocalNetwork, create_network
from pyrsia_node.identity import KEY_FILE, Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.authorities import authorities_in_force
from pyrsia_node.ledger.records import GovernanceAction, GovernanceRecord
from pyrsia_node.merkle import leaf_hash
from pyrsia_node.server import Node

pytestmark = pytest.mark.timeout(60)

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
NEWCOMER = Identity.generate()


# A node whose chain ends with a governance change -------------------------------------


class Network:
    """A generated network of four authorities, its keys, and a chain written to the
    data directory of authority-0 before its node starts."""

    def __init__(self, root: Path, threshold: int | None) -> None:
        self.local: LocalNetwork = create_network(
            root, authorities=4, peers=0, base_port=free_port_block(40),
            attestation_threshold=threshold,
        )  # fmt: skip
        self.genesis = self.local.genesis
        self.keys = {
            n.name: Identity.from_pem((n.data_dir / KEY_FILE).read_bytes())
            for n in self.local.nodes
        }
        self.governance = Identity.from_pem((root / "governance.key").read_bytes())

    def change(self, action: GovernanceAction, name: str, key: Identity) -> bytes:
        return GovernanceRecord.create(
            self.governance, self.genesis.chain_id, 1, action, name, key.public_key,
            "127.0.0.1:1" if action is GovernanceAction.ADD else "",
        ).encode()  # fmt: skip

    def commit(self, blocks: Sequence[tuple[bytes, ...]]) -> ChainState:
        """Store ``blocks`` as authority-0's committed chain (blocks, certificates, log)."""
        data_dir = self.local.nodes[0].data_dir
        store = BlockStore(data_dir / "consensus" / "blocks")
        ledger = TransparencyLog(data_dir / "ledger")
        chain = ChainState.genesis(ValidatorSet.from_genesis(self.genesis))
        signers = {k.public_key: k for k in self.keys.values()}
        for records in blocks:
            height = chain.height
            block = Block(
                self.genesis.chain_id, height, chain.prev_hash,
                chain.validators.proposer(height, 0), records,
            )  # fmt: skip
            message = signing_bytes(
                self.genesis.chain_id, MessageKind.PRECOMMIT, height, 0, block.hash
            )
            voters = chain.validators.validators[: chain.validators.quorum]
            cert = CommitCertificate(
                height, 0, block.hash,
                tuple(CommitSignature(v, signers[v].sign(message)) for v in voters),
            )  # fmt: skip
            store.append(block, cert)
            ledger.append(records)
            chain = chain.after(block, governance_decoder(self.genesis))
        ledger.close()
        return chain

    def vote(self, name: str, vote_type: VoteType, height: int, block_hash: bytes) -> Vote:
        key = self.keys[name]
        message = signing_bytes(
            self.genesis.chain_id, MessageKind(vote_type), height, 0, block_hash
        )
        return Vote(vote_type, height, 0, block_hash, key.public_key, key.sign(message))

    def proposal(self, chain: ChainState, records: tuple[bytes, ...]) -> Proposal:
        """A round-0 proposal of ``records`` for the next height, by its proposer."""
        height = chain.height
        proposer = chain.validators.proposer(height, 0)
        (key,) = [k for k in self.keys.values() if k.public_key == proposer]
        block = Block(self.genesis.chain_id, height, chain.prev_hash, proposer, records)
        message = signing_bytes(
            self.genesis.chain_id, MessageKind.PROPOSAL, height, 0, block.hash, -1
        )
        return Proposal(block, 0, -1, proposer, key.sign(message))


def attested(*attesters: Identity, tag: str = "1") -> bytes:
    """An artifact record of one image, attested by ``attesters``."""
    image = AcquiredImage(
        "docker.io", "library/app", tag, Artifact(f"sha256:{1:064x}", 100, MANIFEST), (), ()
    )
    envelopes = [attest(image, "http://upstream.test/v2/", NOW, key)[1] for key in attesters]
    return artifact_record(image, envelopes).encode()


def acquire_request(network: Network, key: Identity) -> build_pb2.AcquireRequest:
    now = int(time.time() * 1000)
    package_id = "docker.io/library/app:1"
    signed = acquire_signing_bytes(network.genesis.chain_id, package_id, key.node_id, now)
    return build_pb2.AcquireRequest(
        package_id=package_id, requester=key.node_id, timestamp_ms=now, signature=key.sign(signed)
    )


@pytest.fixture
async def started() -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        await node.stop()


async def node_after(
    started: list[Node], network: Network, blocks: Sequence[tuple[bytes, ...]]
) -> Node:
    """authority-0's node over ``blocks``, its consensus started at the next height."""
    network.commit(blocks)
    node = Node(config.load(network.local.nodes[0].config_file, environ={}))
    started.append(node)
    await node.consensus.start()
    return node


async def prevote_of(node: Node, proposal: Proposal) -> bytes | None:
    """The block hash (None: nil) the node prevotes for after receiving ``proposal``."""
    node.consensus.receive(proposal.proposer, message_to_pb(proposal))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in node.consensus.core.wal_state().own_messages:
            if isinstance(message, Vote) and message.type is VoteType.PREVOTE:
                return message.block_hash
        await asyncio.sleep(0.02)
    raise AssertionError("the node did not prevote within 10 s")


# Removal ------------------------------------------------------------------------------


async def test_a_record_attested_only_by_a_just_removed_authority_is_refused_at_the_next_height(
    tmp_path: Path, started: list[Node]
) -> None:
    network = Network(tmp_path / "net", threshold=1)
    removed = network.keys["authority-3"]
    removal = network.change(GovernanceAction.REMOVE, "authority-3", removed)
    node = await node_after(started, network, [(removal,)])
    chain = node.consensus.core.chain
    assert chain.height == 2
    assert removed.public_key in chain.validators  # it still votes at this height ...
    assert removed.public_key not in node.consensus.authorities_in_force()  # ... only that

    with pytest.raises(RecordRejected):
        node.consensus.submit(attested(removed))
    assert node.consensus.submit(attested(network.keys["authority-1"]))
    prevote = await prevote_of(node, network.proposal(chain, (attested(removed, tag="2"),)))
    assert prevote is None


async def test_a_just_removed_authority_may_no_longer_make_authorities_acquire(
    tmp_path: Path, started: list[Node]
) -> None:
    network = Network(tmp_path / "net", threshold=None)
    removed = network.keys["authority-3"]
    node = await node_after(
        started, network, [(network.change(GovernanceAction.REMOVE, "authority-3", removed),)]
    )
    assert node.acquirer is not None
    node.acquirer.check(acquire_request(network, network.keys["authority-1"]))
    with pytest.raises(AcquireRefused, match="not an authority in force"):
        node.acquirer.check(acquire_request(network, removed))


async def test_a_record_pending_when_its_attesters_removal_commits_is_dropped(
    tmp_path: Path, started: list[Node]
) -> None:
    network = Network(tmp_path / "net", threshold=1)
    removed = network.keys["authority-3"]
    node = await node_after(started, network, [])
    pending = attested(removed)
    assert node.consensus.submit(pending)
    # Pending in the core too: with a record to propose it starts round 0.
    deadline = time.monotonic() + 10
    while node.consensus.status()["step"] == "new_height":
        assert time.monotonic() < deadline, "the record did not reach the core within 10 s"
        await asyncio.sleep(0.02)
    # The other three decide the removal at height 1 through the node's consensus inbox.
    proposal = network.proposal(
        node.consensus.core.chain,
        (network.change(GovernanceAction.REMOVE, "authority-3", removed),),
    )
    node.consensus.receive(proposal.proposer, message_to_pb(proposal))
    for vote_type in (VoteType.PREVOTE, VoteType.PRECOMMIT):
        for name in ("authority-1", "authority-2", "authority-3"):
            vote = network.vote(name, vote_type, 1, proposal.block.hash)
            node.consensus.receive(vote.validator, message_to_pb(vote))
    deadline = time.monotonic() + 10
    while node.consensus.mempool.get(leaf_hash(pending)) is not None:
        assert time.monotonic() < deadline, "the record was still pending 10 s later"
        await asyncio.sleep(0.02)

    chain = node.consensus.core.chain
    assert chain.height == 2
    assert await prevote_of(node, network.proposal(chain, (pending,))) is None


# Addition -----------------------------------------------------------------------------


async def test_a_record_attested_with_a_just_added_authority_is_accepted_at_the_next_height(
    tmp_path: Path, started: list[Node]
) -> None:
    network = Network(tmp_path / "net", threshold=None)
    addition = network.change(GovernanceAction.ADD, "authority-4", NEWCOMER)
    node = await node_after(started, network, [(addition,)])
    chain = node.consensus.core.chain
    assert chain.height == 2
    assert NEWCOMER.public_key not in chain.validators  # it votes from height 3 ...
    assert NEWCOMER.public_key in node.consensus.authorities_in_force()  # ... counts now

    genesis_three = [network.keys[f"authority-{i}"] for i in range(3)]
    # Five authorities in force: the threshold (their quorum) is four.
    with pytest.raises(RecordRejected):
        node.consensus.submit(attested(*genesis_three))
    assert node.consensus.submit(attested(NEWCOMER, *genesis_three))
    proposal = network.proposal(chain, (attested(NEWCOMER, *genesis_three, tag="2"),))
    assert await prevote_of(node, proposal) == proposal.block.hash


async def test_the_acquire_check_serves_a_just_added_authority(
    tmp_path: Path, started: list[Node]
) -> None:
    network = Network(tmp_path / "net", threshold=None)
    outsider = Identity.generate()
    node = await node_after(
        started, network, [(network.change(GovernanceAction.ADD, "authority-4", NEWCOMER),)]
    )
    assert node.acquirer is not None
    node.acquirer.check(acquire_request(network, NEWCOMER))
    with pytest.raises(AcquireRefused, match="not an authority in force"):
        node.acquirer.check(acquire_request(network, outsider))


# The definition, replayed -------------------------------------------------------------

GOVERNANCE = Identity.generate()
POOL = [Identity.generate().public_key for _ in range(6)]
GENESIS = Genesis(
    chain_id="pyrsia-test",
    genesis_time="2026-01-01T00:00:00Z",
    governance_public_key=GOVERNANCE.public_key,
    authorities=tuple(Authority(f"a-{i}", POOL[i], f"127.0.0.1:{1000 + i}", "") for i in range(3)),
    ca_certificate="",
)

entries = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(GovernanceAction), st.integers(0, len(POOL) - 1)),
        st.just(None),  # an artifact record: any record that is not governance
    ),
    max_size=16,
)


@settings(max_examples=150, deadline=None)
@given(entries, st.lists(st.booleans(), min_size=16, max_size=16))
def test_every_record_of_a_block_is_judged_by_the_ledger_set_at_its_own_index(
    steps: list[tuple[GovernanceAction, int] | None], cuts: list[bool]
) -> None:
    """Blocks cut anywhere, except that a governance record ends its block (the core's
    rule): the chain's authorities in force before a block are, for each of its records,
    the ledger's set at that record's index; after the last block, the set at the log's
    size."""
    records = [
        b"artifact %d" % n
        if step is None
        else GovernanceRecord.create(
            GOVERNANCE, "pyrsia-test", n, step[0], f"a-{step[1]}", POOL[step[1]]
        ).encode()
        for n, step in enumerate(steps)
    ]
    blocks: list[list[bytes]] = [[]]
    for n, record in enumerate(records):
        blocks[-1].append(record)
        if steps[n] is not None or cuts[n]:
            blocks.append([])
    decode = governance_decoder(GENESIS)
    chain = ChainState.genesis(ValidatorSet.from_genesis(GENESIS))
    log: list[bytes] = []

    def in_force(size: int) -> tuple[bytes, ...]:
        governance = [(i, r) for i, r in enumerate(log[:size]) if steps[i] is not None]
        return tuple(key for _, key in authorities_in_force(GENESIS, governance, size).authorities)

    for records_of_block in blocks:
        block = Block(
            "pyrsia-test", chain.height, chain.prev_hash, POOL[0], tuple(records_of_block)
        )
        for record in records_of_block:
            assert in_force(len(log)) == chain.authorities_in_force.validators
            log.append(record)
        chain = chain.after(block, decode)
    assert in_force(len(log)) == chain.authorities_in_force.validators
