"""A validator that missed a block everyone else decided fetches it at once.

Seen on real processes: one authority never received a height's proposal (or could not
complete its compact form), held a quorum of precommits for a block it did not have, and sat
idle until the next height's messages arrived (the empty-block wait plus a propose timeout,
5-6 s). The core now asks a precommitter for the block by block sync as soon as a quorum's
precommits name a block it has no proposal for.
"""

from __future__ import annotations

from pyrsia_node.consensus import (
    ChainState,
    Commit,
    CommitReceived,
    ConsensusConfig,
    ConsensusCore,
    RequestSync,
    VoteType,
)
from test_consensus_core import (
    CHAIN,
    KEYS,
    VALIDATORS,
    block,
    certificate,
    feed,
    proposal,
    step,
    vote,
)


def make(clock: list[float]) -> ConsensusCore:
    return ConsensusCore(
        ConsensusConfig(CHAIN), KEYS[0], ChainState.genesis(VALIDATORS), clock=lambda: clock[0]
    )


def syncs(actions: list[object]) -> list[RequestSync]:
    return [a for a in actions if isinstance(a, RequestSync)]


def test_quorum_of_precommits_for_an_unknown_block_requests_it_and_commits_it() -> None:
    clock = [0.0]
    core = make(clock)
    step(core)
    b = block()
    actions = feed(core, *(vote(i, VoteType.PRECOMMIT, 0, b.hash) for i in (1, 2)))
    assert not syncs(actions), "two precommits are not a quorum of four"
    actions = feed(core, vote(3, VoteType.PRECOMMIT, 0, b.hash))
    [request] = syncs(actions)
    assert request.from_height == 1
    assert request.peer in {KEYS[i].public_key for i in (1, 2, 3)}
    actions = step(core, CommitReceived(b, certificate(b, 0, [1, 2, 3])))
    assert [a.block for a in actions if isinstance(a, Commit)] == [b]
    assert core.height == 2


def test_requests_are_paced_and_go_to_another_precommitter_next_time() -> None:
    clock = [0.0]
    core = make(clock)
    step(core)
    b = block()
    [first] = syncs(feed(core, *(vote(i, VoteType.PRECOMMIT, 0, b.hash) for i in (1, 2, 3))))
    assert not syncs(feed(core, vote(1, VoteType.PREVOTE, 0, b.hash))), "paced"
    clock[0] = 5.0
    [second] = syncs(feed(core, vote(2, VoteType.PREVOTE, 0, b.hash)))
    assert second.peer != first.peer


def test_no_request_when_the_proposal_is_here_or_the_quorum_is_for_nil() -> None:
    clock = [0.0]
    core = make(clock)
    step(core)
    b = block()
    actions = feed(core, proposal(b, 0))
    actions += feed(core, *(vote(i, VoteType.PRECOMMIT, 0, b.hash) for i in (1, 2, 3)))
    assert not syncs(actions)
    assert [a.block for a in actions if isinstance(a, Commit)] == [b]
    clock[0] = 5.0
    actions = feed(core, *(vote(i, VoteType.PRECOMMIT, 0, None, height=2) for i in (1, 2, 3)))
    assert not syncs(actions)
