"""How a follower chooses the authority it streams blocks from (`consensus.following`).

Pure: every test drives `Following` with explicit times. The behaviour on real processes
(a source paused or cut off from the other authorities) is in
`test_consensus_follow_faults.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia.v1 import consensus_pb2_grpc as pb_grpc
from pyrsia_node.consensus import (
    CommitCertificate,
    CommitSignature,
    MessageKind,
    ValidatorSet,
    signing_bytes,
)
from pyrsia_node.consensus.following import Following, FollowTiming, proves_commit
from pyrsia_node.consensus.service import GrpcTransport, initialize_state
from pyrsia_node.consensus.wire import certificate_from_pb
from pyrsia_node.identity import Identity, verify_signature
from test_consensus_core import CHAIN, KEYS, OUTSIDER, VALIDATORS
from test_consensus_service import CHAIN as CHAIN_SHELL
from test_consensus_service import make_genesis, make_node, record, stop, wait_for
from test_consensus_service import start as start_node

TIMING = FollowTiming(probe_interval=1.0, grace=1.0, hold=2.0, max_hold=60.0, stall=30.0)
A, B, C, D = sorted(VALIDATORS.validators)
AUTHORITIES = (A, B, C, D)


def start(now: float = 0.0, decided: int = 5) -> Following:
    following = Following.begin(AUTHORITIES, decided, now, TIMING)
    assert following.source == A
    return following


def test_a_source_that_trails_a_proven_height_past_the_grace_is_left() -> None:
    following = start().proved(B, 6, now=10.0)
    assert following.next_source(AUTHORITIES, 10.9) is None, "within the grace"
    moved = following.next_source(AUTHORITIES, 11.0)
    assert moved is not None and moved.source == B
    assert moved.switched_at == 11.0 and moved.streamed == 5


def test_a_source_that_delivers_within_the_grace_is_kept() -> None:
    following = start().proved(B, 6, now=10.0).streamed_block(6)
    assert following.next_source(AUTHORITIES, 20.0) is None
    following = following.decided_height(6, 10.5)
    assert following.proofs == ()
    assert following.next_source(AUTHORITIES, 20.0) is None


def test_no_switch_for_lag_within_the_hold_after_a_switch() -> None:
    following = start(now=0.0).proved(B, 6, now=0.0)
    assert following.next_source(AUTHORITIES, 1.5) is None, "hold of 2 s since start"
    assert following.next_source(AUTHORITIES, 2.0) is not None


def test_the_hold_doubles_while_switches_keep_coming_and_resets_after_a_long_stay() -> None:
    following = start(now=0.0)
    holds = []
    now = 0.0
    for height in range(6, 12):
        others = [k for k in AUTHORITIES if k != following.source]
        following = following.proved(others[0], height, now)
        now += following.hold
        moved = following.next_source(AUTHORITIES, now)
        assert moved is not None
        following = moved.decided_height(height, now)
        holds.append(following.hold)
    assert holds == [4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    now += following.hold + TIMING.max_hold  # kept long enough
    others = [k for k in AUTHORITIES if k != following.source]
    following = following.proved(others[0], 12, now - TIMING.grace)
    moved = following.next_source(AUTHORITIES, now)
    assert moved is not None and moved.hold == TIMING.hold


def test_the_authority_that_proved_the_highest_height_is_chosen() -> None:
    following = start().proved(B, 6, 0.0).proved(C, 6, 0.0)
    following = following.proved(C, 7, 0.5)  # known ahead since 0.0
    moved = following.next_source(AUTHORITIES, 3.0)
    assert moved is not None and moved.source == C


def test_streamed_blocks_stop_counting_when_no_decision_follows_them() -> None:
    """A source that streams blocks the core refuses (a bad certificate) is left."""
    following = start(now=0.0).streamed_block(9).proved(B, 6, 1.0)
    assert following.delivered(10.0) == 9
    assert following.next_source(AUTHORITIES, 10.0) is None
    assert following.delivered(30.0) == 5
    moved = following.next_source(AUTHORITIES, 30.0)
    assert moved is not None and moved.source == B


def test_decisions_keep_streamed_blocks_counting() -> None:
    following = start(now=0.0).streamed_block(60).proved(B, 40, 1.0)
    for second in range(1, 40):
        following = following.decided_height(5 + second, float(second))
    assert following.next_source(AUTHORITIES, 40.0) is None


def test_proofs_of_the_source_or_of_decided_heights_do_not_count() -> None:
    following = start().proved(A, 9, 0.0).proved(B, 5, 0.0).proved(C, 4, 0.0)
    assert following.proofs == ()
    following = following.proved(B, 6, 0.0).proved(B, None, 1.0)
    assert following.proofs == (), "an authority that shows nothing any more"


def test_a_proof_stays_dated_from_when_the_authority_was_first_seen_ahead() -> None:
    following = start().proved(B, 6, 1.0).proved(B, 7, 2.0).proved(B, 6, 3.0)
    [proof] = following.proofs
    assert (proof.height, proof.since) == (7, 1.0)


def test_an_ended_stream_moves_to_an_authority_known_ahead() -> None:
    following = start().proved(C, 6, 0.0)
    assert following.after_stream_end(AUTHORITIES, 0.1).source == C


def test_an_ended_stream_otherwise_moves_through_every_authority_in_turn() -> None:
    following = start()
    seen = []
    for step in range(5):
        following = following.after_stream_end(AUTHORITIES, float(step))
        seen.append(following.source)
    assert seen == [B, C, D, A, B]


def test_a_source_that_is_no_longer_an_authority_is_left_at_once() -> None:
    moved = start(now=0.0).next_source((B, C, D), 0.1)
    assert moved is not None and moved.source == B


def test_proofs_from_non_authorities_do_not_count() -> None:
    following = start().proved(OUTSIDER.public_key, 9, 0.0)
    assert following.next_source(AUTHORITIES, 10.0) is None


# Invariants under any sequence of events -------------------------------------------------

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["streamed", "decided", "proved", "silent", "ended", "check"]),
        st.sampled_from(AUTHORITIES),
        st.integers(min_value=0, max_value=12),
        st.floats(min_value=0.0, max_value=5.0),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_switches_for_lag_are_a_hold_apart_and_proofs_stay_one_per_authority(
    events: list[tuple[str, bytes, int, float]],
) -> None:
    following = start(now=0.0)
    now = 0.0
    last_switch = 0.0
    for kind, authority, height, elapse in events:
        now += elapse
        if kind == "streamed":
            following = following.streamed_block(height)
        elif kind == "decided":
            following = following.decided_height(height, now)
        elif kind in ("proved", "silent"):
            following = following.proved(authority, height if kind == "proved" else None, now)
        elif kind == "ended":
            following = following.after_stream_end(AUTHORITIES, now)
            last_switch = now
        else:
            hold = following.hold
            moved = following.next_source(AUTHORITIES, now)
            if moved is not None:
                assert now - last_switch >= hold
                assert moved.source != following.source
                last_switch = now
                following = moved
        keys = [p.authority for p in following.proofs]
        assert len(keys) == len(set(keys)) and following.source not in keys
        assert all(p.height > following.decided for p in following.proofs)
        assert TIMING.hold <= following.hold <= TIMING.max_hold


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=3.0), min_size=1, max_size=30))
def test_a_silent_source_is_left_within_hold_plus_grace_of_a_proof(gaps: list[float]) -> None:
    """However the checks are spaced, the first check at least `hold` after the last switch
    and `grace` after the proof switches."""
    following = start(now=0.0).proved(C, 6, 0.0)
    now = 0.0
    for gap in gaps:
        now += gap
        moved = following.next_source(AUTHORITIES, now)
        if now >= max(TIMING.hold, TIMING.grace):
            assert moved is not None and moved.source == C
            return
        assert moved is None


# Certificates without their block ---------------------------------------------------------


def certificate(height: int, signers: list[int], chain: str = CHAIN) -> CommitCertificate:
    block_hash = bytes([7]) * 32
    message = signing_bytes(chain, MessageKind.PRECOMMIT, height, 0, block_hash)
    return CommitCertificate(
        height,
        0,
        block_hash,
        tuple(CommitSignature(KEYS[i].public_key, KEYS[i].sign(message)) for i in signers),
    )


def test_a_quorum_of_precommits_proves_a_commit() -> None:
    assert proves_commit(CHAIN, certificate(6, [0, 1, 2]), 6, VALIDATORS, verify_signature)


def test_too_few_or_repeated_or_foreign_signers_prove_nothing() -> None:
    assert not proves_commit(CHAIN, certificate(6, [0, 1]), 6, VALIDATORS, verify_signature)
    assert not proves_commit(CHAIN, certificate(6, [0, 1, 1]), 6, VALIDATORS, verify_signature)
    assert not proves_commit(CHAIN, certificate(6, [0, 1, 4]), 6, VALIDATORS, verify_signature)


def test_a_certificate_for_another_height_or_chain_proves_nothing() -> None:
    assert not proves_commit(CHAIN, certificate(7, [0, 1, 2]), 6, VALIDATORS, verify_signature)
    other = certificate(6, [0, 1, 2], chain="another-chain")
    assert not proves_commit(CHAIN, other, 6, VALIDATORS, verify_signature)


def test_signatures_that_do_not_verify_prove_nothing() -> None:
    cert = certificate(6, [0, 1, 2])
    forged = CommitCertificate(
        6,
        0,
        cert.block_hash,
        tuple(CommitSignature(s.validator, b"x" * 64) for s in cert.signatures),
    )
    assert not proves_commit(CHAIN, forged, 6, VALIDATORS, verify_signature)


def test_only_the_given_validator_set_counts() -> None:
    three = ValidatorSet(tuple(k.public_key for k in KEYS[2:5]))
    assert not proves_commit(CHAIN, certificate(6, [0, 1, 2]), 6, three, verify_signature)


# The probe over real gRPC -----------------------------------------------------------------


async def test_an_authority_answers_a_probe_with_a_certificate_and_no_block(
    tmp_path: Path,
) -> None:
    node = await make_node(tmp_path, "authority-0")
    genesis = make_genesis([node])  # alone: a quorum of one
    initialize_state(node.directory / "consensus")
    service = await start_node(node, genesis)
    client = GrpcTransport(
        Identity.generate(), CHAIN_SHELL, grpc.aio.insecure_channel, lambda: int(time.time() * 1000)
    )
    client.set_authorities({node.identity.public_key: node.address}, stream=False)
    try:
        service.submit(record(1))
        await wait_for(lambda: service.height >= 1)
        key = node.identity.public_key
        message = await client.fetch_certificate(key, 1, 5.0)
        assert message is not None
        validators = ValidatorSet((key,))
        cert = certificate_from_pb(message)
        assert proves_commit(CHAIN_SHELL, cert, 1, validators, verify_signature)
        assert await client.fetch_certificate(key, 2, 5.0) is None, "not committed yet"
        async with grpc.aio.insecure_channel(node.address) as channel:
            stream = pb_grpc.ConsensusStub(channel).GetBlocks(
                pb.GetBlocksRequest(from_height=1, limit=1, certificates_only=True), timeout=5
            )
            [item] = [item async for item in stream]
        assert not item.HasField("block") and item.certificate.height == 1
    finally:
        await client.close()
        await stop(node)
