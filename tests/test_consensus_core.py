"""The Tendermint core, one behaviour per test, with real Ed25519 keys.

Every action list a core returns in these tests goes through `step`, which checks the
write-ahead invariant: a newly signed message is broadcast only after a `Persist` that
holds it.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrsia_node.consensus import (
    Action,
    Block,
    Broadcast,
    ChainState,
    Commit,
    CommitCertificate,
    CommitReceived,
    CommitSignature,
    ConsensusConfig,
    ConsensusCore,
    ConsensusMessage,
    EquivocationFound,
    Event,
    MessageKind,
    Persist,
    Proposal,
    ProposalReceived,
    RecordsSubmitted,
    RecordSubmitted,
    RequestSync,
    ScheduleTimeout,
    Step,
    Timeout,
    TimeoutFired,
    TimeoutKind,
    Timeouts,
    ValidatorSet,
    ValidatorSetChange,
    Vote,
    VoteReceived,
    VoteType,
    WalState,
    signing_bytes,
)
from pyrsia_node.consensus.validators import GENESIS_PREV_HASH
from pyrsia_node.identity import Identity

CHAIN = "pyrsia-test"
KEYS = [Identity(Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)) for i in range(5)]
VALIDATORS = ValidatorSet(tuple(k.public_key for k in KEYS[:4]))
OUTSIDER = KEYS[4]


# Signatures each core has persisted so far (by id of the core): what it may broadcast.
PERSISTED: dict[int, set[bytes]] = {}


# The algorithm tests start round 0 at once; the empty-block wait and the commit pause have
# tests of their own.
START_AT_ONCE = Timeouts(empty_block=0.0, commit=0.0)


def make_core(index: int, config: ConsensusConfig | None = None, **kwargs: object) -> ConsensusCore:
    core = ConsensusCore(
        config or ConsensusConfig(CHAIN, timeouts=START_AT_ONCE),
        KEYS[index],
        ChainState.genesis(VALIDATORS),
        clock=lambda: 0.0,
        **kwargs,  # type: ignore[arg-type]
    )
    restored = kwargs.get("restored")
    PERSISTED[id(core)] = (
        {m.signature for m in restored.own_messages} if isinstance(restored, WalState) else set()
    )
    return core


def block(records: tuple[bytes, ...] = (b"r1",), height: int = 1, proposer: int = 1) -> Block:
    return Block(CHAIN, height, GENESIS_PREV_HASH, KEYS[proposer].public_key, records)


def proposal(b: Block, round_: int, valid_round: int = -1) -> Proposal:
    proposer = VALIDATORS.proposer(b.height, round_)
    key = next(k for k in KEYS if k.public_key == proposer)
    sig = key.sign(
        signing_bytes(CHAIN, MessageKind.PROPOSAL, b.height, round_, b.hash, valid_round)
    )
    return Proposal(b, round_, valid_round, proposer, sig)


def vote(
    index: int, vote_type: VoteType, round_: int, block_hash: bytes | None, height: int = 1
) -> Vote:
    key = KEYS[index]
    sig = key.sign(signing_bytes(CHAIN, MessageKind(vote_type), height, round_, block_hash))
    return Vote(vote_type, height, round_, block_hash, key.public_key, sig)


def certificate(b: Block, round_: int, signers: list[int]) -> CommitCertificate:
    votes = [vote(i, VoteType.PRECOMMIT, round_, b.hash, b.height) for i in signers]
    return CommitCertificate(
        b.height, round_, b.hash, tuple(CommitSignature(v.validator, v.signature) for v in votes)
    )


def check_write_ahead(core: ConsensusCore, actions: list[Action]) -> None:
    persisted = PERSISTED.setdefault(id(core), set())
    for action in actions:
        if isinstance(action, Persist):
            persisted |= {m.signature for m in action.state.own_messages}
        elif isinstance(action, Broadcast):
            message = action.message
            sender = message.proposer if isinstance(message, Proposal) else message.validator
            if sender == core.public_key:
                assert message.signature in persisted, (
                    "a signed message left before a Persist holding it"
                )


def step(core: ConsensusCore, event: Event | None = None) -> list[Action]:
    actions = core.start() if event is None else core.handle(event)
    check_write_ahead(core, actions)
    return actions


def feed(
    core: ConsensusCore, *messages: ConsensusMessage, relayed_by: bytes | None = None
) -> list[Action]:
    """Deliver messages straight from their signers, or relayed by `relayed_by`."""
    actions: list[Action] = []
    for message in messages:
        if isinstance(message, Proposal):
            event: Event = ProposalReceived(message, relayed_by or message.proposer)
        else:
            event = VoteReceived(message, relayed_by or message.validator)
        actions += step(core, event)
    return actions


def signed(actions: list[Action], core: ConsensusCore) -> list[ConsensusMessage]:
    out = []
    for action in actions:
        if isinstance(action, Broadcast):
            m = action.message
            sender = m.proposer if isinstance(m, Proposal) else m.validator
            if sender == core.public_key:
                out.append(m)
    return out


def votes_of(actions: list[Action], core: ConsensusCore, vote_type: VoteType) -> list[Vote]:
    return [m for m in signed(actions, core) if isinstance(m, Vote) and m.type is vote_type]


def lock_on(core: ConsensusCore, b: Block, round_: int = 0) -> None:
    """Drive `core` (index 0) through a round in which it locks on `b`."""
    feed(core, proposal(b, round_))
    feed(core, vote(1, VoteType.PREVOTE, round_, b.hash), vote(2, VoteType.PREVOTE, round_, b.hash))
    assert core.step is Step.PRECOMMIT


def next_round(core: ConsensusCore, round_: int) -> None:
    feed(core, vote(1, VoteType.PRECOMMIT, round_, None), vote(2, VoteType.PRECOMMIT, round_, None))
    step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, round_)))
    assert core.round == round_ + 1


# Quorums and proposers --------------------------------------------------------------


@pytest.mark.parametrize(("n", "q", "skip"), [(4, 3, 2), (5, 4, 2), (7, 5, 3), (10, 7, 4)])
def test_quorum_is_floor_two_thirds_plus_one(n: int, q: int, skip: int) -> None:
    validators = ValidatorSet(tuple(bytes([i]) * 32 for i in range(n)))
    assert validators.quorum == q
    assert validators.skip_threshold == skip


def test_proposer_rotates_with_height_and_round() -> None:
    assert VALIDATORS.proposer(1, 0) == KEYS[1].public_key
    assert VALIDATORS.proposer(1, 1) == KEYS[2].public_key
    assert VALIDATORS.proposer(2, 0) == KEYS[2].public_key


def test_timeouts_grow_with_the_round() -> None:
    timeouts = Timeouts()
    for kind in (TimeoutKind.PROPOSE, TimeoutKind.PREVOTE, TimeoutKind.PRECOMMIT):
        assert (
            timeouts.for_round(kind, 0) < timeouts.for_round(kind, 1) < timeouts.for_round(kind, 5)
        )


# Algorithm 1 --------------------------------------------------------------------------


def test_proposer_proposes_pending_records_after_a_persist() -> None:
    core = make_core(1)
    step(core, RecordSubmitted(b"r1"))
    actions = step(core)
    proposals = [m for m in signed(actions, core) if isinstance(m, Proposal)]
    assert len(proposals) == 1
    assert proposals[0].block.records == (b"r1",)
    assert proposals[0].valid_round == -1
    assert any(isinstance(a, Persist) for a in actions)
    assert actions.index(next(a for a in actions if isinstance(a, Persist))) < actions.index(
        next(a for a in actions if isinstance(a, Broadcast))
    )


def test_non_proposer_schedules_a_propose_timeout_and_prevotes_nil_when_it_fires() -> None:
    core = make_core(0)
    actions = step(core)
    assert ScheduleTimeout(Timeout(TimeoutKind.PROPOSE, 1, 0), 1.0) in actions
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 0)))
    [prevote] = votes_of(actions, core, VoteType.PREVOTE)
    assert prevote.block_hash is None


def test_valid_proposal_gets_a_prevote_for_its_block() -> None:
    core = make_core(0)
    step(core)
    b = block()
    [prevote] = votes_of(feed(core, proposal(b, 0)), core, VoteType.PREVOTE)
    assert prevote.block_hash == b.hash


def test_proposal_that_does_not_extend_the_chain_gets_a_nil_prevote() -> None:
    core = make_core(0)
    step(core)
    bad = Block(CHAIN, 1, b"\x01" * 32, KEYS[1].public_key, (b"r1",))
    [prevote] = votes_of(feed(core, proposal(bad, 0)), core, VoteType.PREVOTE)
    assert prevote.block_hash is None


def test_quorum_of_prevotes_locks_and_precommits() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    actions = feed(core, vote(1, VoteType.PREVOTE, 0, b.hash))
    assert not votes_of(actions, core, VoteType.PRECOMMIT)
    actions = feed(core, vote(2, VoteType.PREVOTE, 0, b.hash))
    [precommit] = votes_of(actions, core, VoteType.PRECOMMIT)
    assert precommit.block_hash == b.hash
    state = core.wal_state()
    assert (state.locked_round, state.locked_block) == (0, b)
    assert (state.valid_round, state.valid_block) == (0, b)


def test_locked_node_prevotes_nil_for_a_different_new_proposal() -> None:
    core = make_core(0)
    step(core)
    b1, b2 = block((b"r1",)), block((b"r2",), proposer=2)
    lock_on(core, b1)
    next_round(core, 0)
    [prevote] = votes_of(feed(core, proposal(b2, 1)), core, VoteType.PREVOTE)
    assert prevote.block_hash is None


def test_locked_node_prevotes_for_its_locked_value_when_reproposed_with_a_proof_of_lock() -> None:
    core = make_core(0)
    step(core)
    b1 = block((b"r1",))
    lock_on(core, b1)
    next_round(core, 0)
    step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 1)))
    feed(core, vote(1, VoteType.PRECOMMIT, 1, None), vote(2, VoteType.PRECOMMIT, 1, None))
    step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, 1)))
    assert core.round == 2
    [prevote] = votes_of(feed(core, proposal(b1, 2, valid_round=0)), core, VoteType.PREVOTE)
    assert prevote.block_hash == b1.hash


def test_lock_is_released_by_a_proof_of_lock_from_a_later_round() -> None:
    core = make_core(0)
    step(core)
    b1, b2 = block((b"r1",)), block((b"r2",), proposer=2)
    lock_on(core, b1)
    next_round(core, 0)
    feed(core, proposal(b2, 1))  # prevotes nil: locked on b1
    pol = [vote(i, VoteType.PREVOTE, 1, b2.hash) for i in (1, 2, 3)]
    feed(core, *pol)
    feed(core, vote(1, VoteType.PRECOMMIT, 1, None), vote(2, VoteType.PRECOMMIT, 1, None))
    step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, 1)))
    [prevote] = votes_of(feed(core, proposal(b2, 2, valid_round=1)), core, VoteType.PREVOTE)
    assert prevote.block_hash == b2.hash


def test_proposal_with_valid_round_waits_for_its_proof_of_lock() -> None:
    core = make_core(0)
    step(core)
    b2 = block((b"r2",), proposer=2)
    step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 0)))
    feed(core, vote(1, VoteType.PRECOMMIT, 0, None), vote(2, VoteType.PRECOMMIT, 0, None))
    step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, 0)))
    step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 1)))
    feed(core, vote(1, VoteType.PRECOMMIT, 1, None), vote(2, VoteType.PRECOMMIT, 1, None))
    step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, 1)))
    assert not votes_of(feed(core, proposal(b2, 2, valid_round=1)), core, VoteType.PREVOTE)
    feed(core, vote(1, VoteType.PREVOTE, 1, b2.hash), vote(2, VoteType.PREVOTE, 1, b2.hash))
    [prevote] = votes_of(feed(core, vote(3, VoteType.PREVOTE, 1, b2.hash)), core, VoteType.PREVOTE)
    assert prevote.block_hash == b2.hash


def test_proposer_reproposes_its_valid_value() -> None:
    core = make_core(2)  # proposer of height 1, round 1
    step(core)
    b1 = block((b"r1",))
    feed(core, proposal(b1, 0))
    feed(core, vote(0, VoteType.PREVOTE, 0, b1.hash), vote(1, VoteType.PREVOTE, 0, b1.hash))
    feed(core, vote(0, VoteType.PRECOMMIT, 0, None), vote(1, VoteType.PRECOMMIT, 0, None))
    step(core, RecordSubmitted(b"something-else"))
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, 0)))
    [reproposal] = [m for m in signed(actions, core) if isinstance(m, Proposal)]
    assert reproposal.block == b1
    assert (reproposal.round, reproposal.valid_round) == (1, 0)


def test_quorum_of_nil_prevotes_precommits_nil() -> None:
    core = make_core(0)
    step(core)
    step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 0)))
    actions = feed(core, vote(1, VoteType.PREVOTE, 0, None), vote(2, VoteType.PREVOTE, 0, None))
    [precommit] = votes_of(actions, core, VoteType.PRECOMMIT)
    assert precommit.block_hash is None


def test_prevote_timeout_is_scheduled_on_a_quorum_of_mixed_prevotes_and_precommits_nil() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    actions = feed(
        core, vote(1, VoteType.PREVOTE, 0, None), vote(2, VoteType.PREVOTE, 0, b"\x07" * 32)
    )
    assert ScheduleTimeout(Timeout(TimeoutKind.PREVOTE, 1, 0), 1.0) in actions
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.PREVOTE, 1, 0)))
    [precommit] = votes_of(actions, core, VoteType.PRECOMMIT)
    assert precommit.block_hash is None


def test_quorum_of_precommits_commits_with_a_certificate_and_starts_the_next_height() -> None:
    core = make_core(0)
    step(core)
    b = block()
    lock_on(core, b)
    actions = feed(
        core, vote(1, VoteType.PRECOMMIT, 0, b.hash), vote(2, VoteType.PRECOMMIT, 0, b.hash)
    )
    [commit] = [a for a in actions if isinstance(a, Commit)]
    assert commit.block == b
    assert len(commit.certificate.signatures) == 3
    assert (core.height, core.round) == (2, 0)
    assert core.chain.prev_hash == b.hash


def test_precommit_timeout_moves_to_the_next_round_with_a_longer_propose_timeout() -> None:
    core = make_core(0)
    step(core)
    step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 0)))
    feed(core, vote(1, VoteType.PRECOMMIT, 0, None), vote(2, VoteType.PRECOMMIT, 0, None))
    actions = feed(core, vote(3, VoteType.PRECOMMIT, 0, None))
    assert ScheduleTimeout(Timeout(TimeoutKind.PRECOMMIT, 1, 0), 1.0) in actions
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.PRECOMMIT, 1, 0)))
    assert core.round == 1
    assert ScheduleTimeout(Timeout(TimeoutKind.PROPOSE, 1, 1), 1.5) in actions


def test_f_plus_one_messages_from_a_later_round_skip_to_it() -> None:
    core = make_core(0)
    step(core)
    feed(core, vote(1, VoteType.PREVOTE, 2, None))
    assert core.round == 0
    actions = feed(core, vote(2, VoteType.PRECOMMIT, 2, None))
    assert core.round == 2
    assert ScheduleTimeout(Timeout(TimeoutKind.PROPOSE, 1, 2), 1.0 + 2 * 0.5) in actions


def test_stale_timeouts_are_ignored() -> None:
    core = make_core(0)
    step(core)
    feed(core, vote(1, VoteType.PREVOTE, 2, None), vote(2, VoteType.PREVOTE, 2, None))
    assert step(core, TimeoutFired(Timeout(TimeoutKind.PROPOSE, 1, 0))) == []


# Votes that do not count -------------------------------------------------------------


def test_votes_from_non_validators_are_dropped() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    outsider = Vote(
        VoteType.PREVOTE,
        1,
        0,
        b.hash,
        OUTSIDER.public_key,
        OUTSIDER.sign(signing_bytes(CHAIN, MessageKind.PREVOTE, 1, 0, b.hash)),
    )
    actions = feed(core, outsider, vote(1, VoteType.PREVOTE, 0, b.hash))
    assert not votes_of(actions, core, VoteType.PRECOMMIT)


def test_votes_with_bad_signatures_are_dropped() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    good = vote(2, VoteType.PREVOTE, 0, b.hash)
    forged = Vote(good.type, 1, 0, b.hash, good.validator, bytes(64))
    actions = feed(core, vote(1, VoteType.PREVOTE, 0, b.hash), forged)
    assert not votes_of(actions, core, VoteType.PRECOMMIT)
    assert votes_of(feed(core, good), core, VoteType.PRECOMMIT)


def test_votes_signed_for_another_chain_do_not_verify() -> None:
    key = KEYS[1]
    sig = key.sign(signing_bytes("other-chain", MessageKind.PREVOTE, 1, 0, None))
    assert not Vote(VoteType.PREVOTE, 1, 0, None, key.public_key, sig).verify(CHAIN)
    assert Vote(VoteType.PREVOTE, 1, 0, None, key.public_key, sig).verify("other-chain")


def test_duplicate_votes_count_once() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    v = vote(1, VoteType.PREVOTE, 0, b.hash)
    actions = feed(core, v, v, v)
    assert not votes_of(actions, core, VoteType.PRECOMMIT)


def test_conflicting_vote_is_kept_as_evidence_and_does_not_replace_the_first() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    first = vote(1, VoteType.PREVOTE, 0, None)
    second = vote(1, VoteType.PREVOTE, 0, b"\x09" * 32)
    actions = feed(core, first, second, second)
    found = [a for a in actions if isinstance(a, EquivocationFound)]
    assert found == [EquivocationFound(first, second)]
    assert core.evidence == found
    # The first vote (nil) still counts: with node 2's nil prevote, a nil quorum forms.
    actions = feed(core, vote(2, VoteType.PREVOTE, 0, None))
    assert not votes_of(actions, core, VoteType.PRECOMMIT)  # own prevote was for b
    assert core.step is Step.PREVOTE
    actions = feed(core, vote(3, VoteType.PREVOTE, 0, None))
    [precommit] = votes_of(actions, core, VoteType.PRECOMMIT)
    assert precommit.block_hash is None


def test_conflicting_proposal_from_the_proposer_is_evidence() -> None:
    core = make_core(0)
    step(core)
    p1, p2 = proposal(block((b"a",)), 0), proposal(block((b"b",)), 0)
    actions = feed(core, p1, p2)
    assert [a for a in actions if isinstance(a, EquivocationFound)] == [EquivocationFound(p1, p2)]
    assert [v.block_hash for v in votes_of(actions, core, VoteType.PREVOTE)] == [p1.block.hash]


def test_proposal_from_a_validator_that_is_not_the_proposer_is_ignored() -> None:
    core = make_core(0)
    step(core)
    b = block(proposer=3)
    sig = KEYS[3].sign(signing_bytes(CHAIN, MessageKind.PROPOSAL, 1, 0, b.hash, -1))
    actions = feed(core, Proposal(b, 0, -1, KEYS[3].public_key, sig))
    assert not votes_of(actions, core, VoteType.PREVOTE)


# Sync, future heights and commits from certificates --------------------------------


def test_block_with_a_valid_certificate_is_committed_from_sync() -> None:
    core = make_core(0)
    step(core)
    b = block()
    actions = step(core, CommitReceived(b, certificate(b, 4, [1, 2, 3])))
    assert [a.block for a in actions if isinstance(a, Commit)] == [b]
    assert core.height == 2


def test_block_with_too_few_precommits_is_not_committed_from_sync() -> None:
    core = make_core(0)
    step(core)
    b = block()
    actions = step(core, CommitReceived(b, certificate(b, 0, [1, 2])))
    assert not [a for a in actions if isinstance(a, Commit)]
    assert core.height == 1


def test_message_from_a_later_height_requests_sync_and_is_replayed_on_arrival() -> None:
    clock = [0.0]
    core = ConsensusCore(
        ConsensusConfig(CHAIN, timeouts=Timeouts(commit=0.0)),
        KEYS[0],
        ChainState.genesis(VALIDATORS),
        clock=lambda: clock[0],
    )
    step(core)
    b1 = block()
    b2 = Block(CHAIN, 2, b1.hash, KEYS[2].public_key, (b"r2",))
    actions = feed(core, proposal(b2, 0))
    assert RequestSync(KEYS[2].public_key, 1) in actions
    assert not [a for a in feed(core, proposal(b2, 0)) if isinstance(a, RequestSync)]
    clock[0] = 5.0
    actions = step(core, CommitReceived(b1, certificate(b1, 0, [1, 2, 3])))
    [prevote] = votes_of(actions, core, VoteType.PREVOTE)
    assert (prevote.height, prevote.block_hash) == (2, b2.hash)


# Restarts and state loss ------------------------------------------------------------


def last_persisted(actions: list[Action]) -> WalState:
    return [a.state for a in actions if isinstance(a, Persist)][-1]


def test_restart_from_the_write_ahead_state_resends_instead_of_resigning() -> None:
    core = make_core(0)
    step(core)
    b = block()
    actions = feed(core, proposal(b, 0))
    [prevote] = votes_of(actions, core, VoteType.PREVOTE)
    state = WalState.decode(last_persisted(actions).encode())

    restarted = make_core(0, restored=state)
    actions = step(restarted)
    assert signed(actions, restarted) == [prevote]
    assert not [a for a in actions if isinstance(a, Persist)]
    # The same proposal again: already prevoted in this round, nothing new is signed.
    other = block((b"other",))
    assert not signed(feed(restarted, proposal(b, 0), proposal(other, 0)), restarted)
    assert restarted.step is Step.PREVOTE


def test_restart_keeps_the_lock() -> None:
    core = make_core(0)
    step(core)
    b1, b2 = block((b"r1",)), block((b"r2",), proposer=2)
    lock_on(core, b1)
    restarted = make_core(0, restored=core.wal_state())
    step(restarted)
    next_round(restarted, 0)
    [prevote] = votes_of(feed(restarted, proposal(b2, 1)), restarted, VoteType.PREVOTE)
    assert prevote.block_hash is None


def test_node_that_lost_its_state_signs_nothing_until_past_the_heights_it_may_have_signed() -> None:
    core = make_core(0, state_lost=True)
    actions = step(core)
    assert core.signing_floor is None
    b1 = block()
    actions = feed(core, proposal(b1, 0), *[vote(i, VoteType.PREVOTE, 0, b1.hash) for i in (1, 2)])
    assert not signed(actions, core)
    actions = feed(core, vote(3, VoteType.PREVOTE, 0, b1.hash))
    assert core.signing_floor == 3  # others seen at height 1: it may have signed at 2
    assert not signed(actions, core)
    actions = feed(core, *[vote(i, VoteType.PRECOMMIT, 0, b1.hash) for i in (1, 2, 3)])
    assert core.height == 2
    assert not signed(actions, core)
    b2 = Block(CHAIN, 2, b1.hash, KEYS[2].public_key, ())
    actions = feed(core, proposal(b2, 0))
    assert not signed(actions, core)
    actions = step(core, CommitReceived(b2, certificate(b2, 0, [1, 2, 3])))
    assert core.height == 3
    b3 = Block(CHAIN, 3, b2.hash, KEYS[0].public_key, ())
    actions = feed(core, proposal(b3, 0))
    [prevote] = votes_of(actions, core, VoteType.PREVOTE)
    assert (prevote.height, prevote.block_hash) == (3, b3.hash)
    assert last_persisted(actions).signing_floor == 3


def test_relayed_messages_do_not_tell_the_state_loss_guard_where_their_signers_are() -> None:
    core = make_core(0, state_lost=True)
    step(core)
    b1 = block()
    relayer = KEYS[1].public_key
    feed(core, *[vote(i, VoteType.PREVOTE, 0, b1.hash) for i in (2, 3)], relayed_by=relayer)
    feed(core, vote(1, VoteType.PREVOTE, 0, b1.hash))
    assert core.signing_floor is None  # only node 1 was heard directly
    feed(core, vote(2, VoteType.PREVOTE, 0, b1.hash), vote(3, VoteType.PREVOTE, 0, b1.hash))
    assert core.signing_floor == 3


def test_own_votes_relayed_back_raise_the_signing_floor() -> None:
    core = make_core(0, state_lost=True)
    step(core)
    mine = vote(0, VoteType.PREVOTE, 0, None, height=5)
    feed(core, mine, relayed_by=KEYS[1].public_key)
    feed(core, *[vote(i, VoteType.PREVOTE, 0, None) for i in (1, 2, 3)])
    assert core.signing_floor == 6  # it signed at height 5 before losing its state


def test_state_loss_guard_survives_a_restart() -> None:
    core = make_core(1, state_lost=True)
    core.start()
    restarted = make_core(1, restored=core.wal_state())
    assert not signed(step(restarted), restarted)
    assert restarted.signing_floor is None


# Validator-set changes -----------------------------------------------------------------


def gov(record: bytes) -> ValidatorSetChange | None:
    if record.startswith(b"add:"):
        return ValidatorSetChange(add=(record[4:],))
    if record.startswith(b"remove:"):
        return ValidatorSetChange(remove=(record[7:],))
    return None


def test_governance_change_committed_at_h_takes_effect_at_h_plus_2() -> None:
    chain = ChainState.genesis(VALIDATORS)
    b1 = Block(CHAIN, 1, chain.prev_hash, KEYS[1].public_key, (b"add:" + OUTSIDER.public_key,))
    chain2 = chain.after(b1, gov)
    assert OUTSIDER.public_key not in chain2.validators  # height 2
    assert OUTSIDER.public_key in chain2.next_validators  # height 3
    b2 = Block(CHAIN, 2, b1.hash, KEYS[2].public_key, (b"remove:" + KEYS[0].public_key,))
    chain3 = chain2.after(b2, gov)
    assert OUTSIDER.public_key in chain3.validators
    assert KEYS[0].public_key in chain3.validators
    assert len(chain3.validators) == 5 and chain3.validators.quorum == 4
    assert KEYS[0].public_key not in chain3.next_validators


def test_changes_that_cannot_apply_are_skipped() -> None:
    one = ValidatorSet((KEYS[0].public_key,))
    assert one.apply([ValidatorSetChange(remove=(KEYS[0].public_key,))]) == one
    assert one.apply([ValidatorSetChange(add=(KEYS[0].public_key,))]) == one
    assert one.apply([ValidatorSetChange(remove=(KEYS[1].public_key,))]) == one


def test_core_counts_a_new_validator_from_h_plus_2() -> None:
    core = make_core(0, validator_set_change=gov)
    step(core)
    b1 = Block(CHAIN, 1, GENESIS_PREV_HASH, KEYS[1].public_key, (b"add:" + OUTSIDER.public_key,))
    step(core, CommitReceived(b1, certificate(b1, 0, [1, 2, 3])))
    assert OUTSIDER.public_key not in core.chain.validators
    b2 = Block(CHAIN, 2, b1.hash, KEYS[2].public_key, ())
    step(core, CommitReceived(b2, certificate(b2, 0, [1, 2, 3])))
    assert core.height == 3
    assert OUTSIDER.public_key in core.chain.validators
    assert core.chain.validators.quorum == 4


def test_a_validator_set_change_ends_the_block_it_is_proposed_in() -> None:
    """Records after a change wait for the next block: in this one they would be judged by
    the authorities in force before the change, in the log by those after it."""
    core = make_core(1, WAIT_FOR_RECORDS, validator_set_change=gov)
    step(core)
    change = b"add:" + OUTSIDER.public_key
    actions = step(core, RecordsSubmitted((b"r1", change, b"r2")))
    assert [p.block.records for p in proposals_in(actions)] == [(b"r1", change)]


@pytest.mark.parametrize(
    ("records", "valid"),
    [
        ((b"r1", b"add:" + OUTSIDER.public_key), True),
        ((b"add:" + OUTSIDER.public_key, b"r1"), False),
        ((b"remove:" + KEYS[3].public_key, b"add:" + OUTSIDER.public_key), False),
    ],
)
def test_a_block_with_a_record_after_a_validator_set_change_gets_a_nil_prevote(
    records: tuple[bytes, ...], valid: bool
) -> None:
    core = make_core(0, validator_set_change=gov)
    step(core)
    b = block(records)
    actions = feed(core, proposal(b, 0))
    assert [v.block_hash for v in votes_of(actions, core, VoteType.PREVOTE)] == [
        b.hash if valid else None
    ]


def test_retransmission_resends_own_messages_and_relays_votes_that_moved_the_node() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    others = [vote(i, VoteType.PREVOTE, 0, b.hash) for i in (1, 2)]
    feed(core, *others)
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.RETRANSMIT, 1, 0)))
    sent = [a.message for a in actions if isinstance(a, Broadcast)]
    own = [m for m in sent if isinstance(m, Vote) and m.validator == KEYS[0].public_key]
    assert {(m.type, m.block_hash) for m in own} == {
        (VoteType.PREVOTE, b.hash),
        (VoteType.PRECOMMIT, b.hash),
    }
    assert all(v in sent for v in others)
    assert not [a for a in actions if isinstance(a, Persist)]  # nothing new was signed
    assert any(isinstance(a, ScheduleTimeout) for a in actions)


def test_own_precommit_that_completes_the_quorum_is_persisted_before_it_leaves() -> None:
    core = make_core(0)
    step(core)
    b = block()
    feed(core, proposal(b, 0))
    feed(core, vote(1, VoteType.PRECOMMIT, 0, b.hash), vote(2, VoteType.PRECOMMIT, 0, b.hash))
    feed(core, vote(1, VoteType.PREVOTE, 0, b.hash))
    actions = feed(core, vote(2, VoteType.PREVOTE, 0, b.hash))  # precommit, then decide
    [precommit] = votes_of(actions, core, VoteType.PRECOMMIT)
    assert [a.block for a in actions if isinstance(a, Commit)] == [b]
    first_persist = next(a for a in actions if isinstance(a, Persist))
    assert precommit in first_persist.state.own_messages
    assert core.height == 2


def test_restart_keeps_the_proof_of_lock_and_relays_it() -> None:
    core = make_core(0)
    step(core)
    b = block()
    lock_on(core, b)
    state = WalState.decode(core.wal_state().encode())
    assert {v.validator for v in state.proof_of_lock} == {k.public_key for k in KEYS[:3]}
    restarted = make_core(0, restored=state)
    step(restarted)
    actions = step(restarted, TimeoutFired(Timeout(TimeoutKind.RETRANSMIT, 1, 0)))
    relayed = {a.message for a in actions if isinstance(a, Broadcast)}
    assert set(state.proof_of_lock) <= relayed


# Empty blocks -------------------------------------------------------------------------

WAIT_FOR_RECORDS = ConsensusConfig(CHAIN, timeouts=Timeouts(empty_block=5.0, commit=0.0))


def proposals_in(actions: list[Action]) -> list[Proposal]:
    return [
        a.message for a in actions if isinstance(a, Broadcast) and isinstance(a.message, Proposal)
    ]


def test_with_nothing_pending_a_height_waits_for_records_before_round_0() -> None:
    core = make_core(1, WAIT_FOR_RECORDS)  # the proposer of (1, 0)
    actions = step(core)
    assert core.step is Step.NEW_HEIGHT
    assert proposals_in(actions) == []
    assert ScheduleTimeout(Timeout(TimeoutKind.EMPTY_BLOCK, 1, 0), 5.0) in actions


def test_a_record_ends_the_wait_and_the_proposer_proposes_it() -> None:
    core = make_core(1, WAIT_FOR_RECORDS)
    step(core)
    actions = step(core, RecordSubmitted(b"r1"))
    assert [p.block.records for p in proposals_in(actions)] == [(b"r1",)]


def test_records_submitted_together_are_proposed_together_in_order() -> None:
    core = make_core(1, WAIT_FOR_RECORDS)
    step(core)
    actions = step(core, RecordsSubmitted((b"r1", b"r2", b"r1")))
    assert [p.block.records for p in proposals_in(actions)] == [(b"r1", b"r2")]


def test_the_empty_block_timeout_starts_round_0_with_an_empty_block() -> None:
    core = make_core(1, WAIT_FOR_RECORDS)
    step(core)
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.EMPTY_BLOCK, 1, 0)))
    assert [p.block.records for p in proposals_in(actions)] == [()]


def test_a_waiting_validator_joins_round_0_on_a_proposal() -> None:
    core = make_core(0, WAIT_FOR_RECORDS)
    step(core)
    b = block(())
    actions = feed(core, proposal(b, 0))
    assert core.step is Step.PREVOTE
    assert [v.block_hash for v in votes_of(actions, core, VoteType.PREVOTE)] == [b.hash]


def test_a_waiting_validator_joins_round_0_when_f_plus_1_validators_are_in_it() -> None:
    core = make_core(0, WAIT_FOR_RECORDS)
    step(core)
    feed(core, vote(2, VoteType.PREVOTE, 0, None))
    assert core.step is Step.NEW_HEIGHT
    feed(core, vote(3, VoteType.PREVOTE, 0, None))
    assert core.step is Step.PROPOSE
    assert core.round == 0


def test_the_commit_pause_comes_before_the_wait_for_records() -> None:
    config = ConsensusConfig(CHAIN, timeouts=Timeouts(commit=1.0, empty_block=5.0))
    core = make_core(1, config)
    actions = step(core)
    assert ScheduleTimeout(Timeout(TimeoutKind.NEW_HEIGHT, 1, 0), 1.0) in actions
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.NEW_HEIGHT, 1, 0)))
    assert ScheduleTimeout(Timeout(TimeoutKind.EMPTY_BLOCK, 1, 0), 4.0) in actions
    assert core.step is Step.NEW_HEIGHT


def lone_core(config: ConsensusConfig) -> ConsensusCore:
    core = ConsensusCore(
        config, KEYS[0], ChainState.genesis(ValidatorSet((KEYS[0].public_key,))), clock=lambda: 0.0
    )
    PERSISTED[id(core)] = set()
    return core


def test_a_lone_validator_commits_what_is_pending_and_then_waits() -> None:
    timeouts = Timeouts(empty_block=5.0, commit=0.0)
    config = ConsensusConfig(CHAIN, timeouts=timeouts, max_block_records=2)
    core = lone_core(config)
    assert [a for a in step(core) if isinstance(a, Commit)] == []
    records = [RecordSubmitted(f"r{i}".encode()) for i in range(5)]
    actions: list[Action] = []
    for record in records:
        actions = step(core, record)
        assert len([a for a in actions if isinstance(a, Commit)]) == 1
    # Each record commits as it arrives, and the call returns with nothing pending.
    assert core.height == 6
    assert core.step is Step.NEW_HEIGHT
    assert ScheduleTimeout(Timeout(TimeoutKind.EMPTY_BLOCK, 6, 0), 5.0) in actions


def test_default_timeouts_let_a_lone_validator_rest_between_empty_blocks() -> None:
    defaults = Timeouts()
    core = lone_core(ConsensusConfig(CHAIN))
    actions = step(core)
    assert ScheduleTimeout(Timeout(TimeoutKind.NEW_HEIGHT, 1, 0), defaults.commit) in actions
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.NEW_HEIGHT, 1, 0)))
    [wait] = [
        a.delay
        for a in actions
        if isinstance(a, ScheduleTimeout) and a.timeout.kind is TimeoutKind.EMPTY_BLOCK
    ]
    assert wait == pytest.approx(defaults.empty_block - defaults.commit)
    assert core.step is Step.NEW_HEIGHT
    assert not any(isinstance(a, Commit) for a in actions)
    actions = step(core, TimeoutFired(Timeout(TimeoutKind.EMPTY_BLOCK, 1, 0)))
    assert [a.block.records for a in actions if isinstance(a, Commit)] == [()]
    assert core.height == 2 and core.step is Step.NEW_HEIGHT


def test_a_block_repeating_a_committed_record_gets_a_nil_prevote() -> None:
    committed = {b"old"}
    core = make_core(0, record_committed=committed.__contains__)
    step(core)
    b = block((b"old", b"new"))
    actions = feed(core, proposal(b, 0))
    assert [v.block_hash for v in votes_of(actions, core, VoteType.PREVOTE)] == [None]


def test_pending_records_are_checked_again_when_the_authorities_in_force_change() -> None:
    """A REMOVE committed at height 1 takes the attester out of force at once: its record,
    pending since before, gets a nil prevote at height 2, while the removed key still votes."""
    attester = KEYS[3].public_key

    def attested_in_force(record: bytes) -> bool:
        return record != b"x" or attester in core.chain.authorities_in_force

    core = make_core(0, validator_set_change=gov, record_valid=attested_in_force)
    step(core)
    step(core, RecordSubmitted(b"x"))
    b1 = Block(CHAIN, 1, GENESIS_PREV_HASH, KEYS[1].public_key, (b"remove:" + attester,))
    step(core, CommitReceived(b1, certificate(b1, 0, [1, 2, 3])))
    assert core.height == 2 and attester in core.chain.validators
    b2 = Block(CHAIN, 2, b1.hash, KEYS[2].public_key, (b"x",))
    actions = feed(core, proposal(b2, 0))
    assert [v.block_hash for v in votes_of(actions, core, VoteType.PREVOTE)] == [None]
