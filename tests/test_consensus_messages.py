"""Canonical bytes, domain separation and commit certificate verification."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from pyrsia_node.consensus import (
    Block,
    CommitCertificate,
    CommitSignature,
    InvalidCommitCertificate,
    MessageKind,
    Proposal,
    ValidatorSet,
    Vote,
    VoteType,
    signing_bytes,
    verify_commit_certificate,
)
from pyrsia_node.consensus.canonical import CanonicalDecodeError
from pyrsia_node.consensus.messages import decode_message, encode_message
from pyrsia_node.consensus.wire import (
    WireError,
    compact_proposal_to_pb,
    compact_record_hashes,
    message_from_pb,
    message_to_pb,
    proposal_from_compact_pb,
)
from pyrsia_node.identity import Identity
from pyrsia_node.merkle import leaf_hash

CHAIN = "pyrsia-test"
KEYS = [Identity(Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)) for i in range(5)]
VALIDATORS = ValidatorSet(tuple(k.public_key for k in KEYS[:4]))
BLOCK = Block(CHAIN, 7, b"\x01" * 32, KEYS[0].public_key, (b"a", b"b"))

keys32 = st.binary(min_size=32, max_size=32)
blocks = st.builds(
    Block,
    chain_id=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    height=st.integers(1, 2**63),
    prev_hash=keys32,
    proposer=keys32,
    records=st.lists(st.binary(max_size=40), max_size=5).map(tuple),
)


def precommit_sig(index: int, block: Block, round_: int, chain: str = CHAIN) -> CommitSignature:
    key = KEYS[index]
    message = signing_bytes(chain, MessageKind.PRECOMMIT, block.height, round_, block.hash)
    return CommitSignature(key.public_key, key.sign(message))


def cert(block: Block, signers: list[int], round_: int = 2) -> CommitCertificate:
    return CommitCertificate(
        block.height, round_, block.hash, tuple(precommit_sig(i, block, round_) for i in signers)
    )


@pytest.mark.parametrize(
    "other",
    [
        ("other-chain", MessageKind.PREVOTE, 5, 1, b"\x02" * 32),
        ("pyrsia-test", MessageKind.PRECOMMIT, 5, 1, b"\x02" * 32),
        ("pyrsia-test", MessageKind.PREVOTE, 6, 1, b"\x02" * 32),
        ("pyrsia-test", MessageKind.PREVOTE, 5, 2, b"\x02" * 32),
        ("pyrsia-test", MessageKind.PREVOTE, 5, 1, b"\x03" * 32),
        ("pyrsia-test", MessageKind.PREVOTE, 5, 1, None),
    ],
)
def test_signing_bytes_separate_chain_kind_height_round_and_value(
    other: tuple[str, MessageKind, int, int, bytes | None],
) -> None:
    base = signing_bytes("pyrsia-test", MessageKind.PREVOTE, 5, 1, b"\x02" * 32)
    assert signing_bytes(*other) != base


def test_proposal_signing_bytes_cover_the_valid_round() -> None:
    a = signing_bytes(CHAIN, MessageKind.PROPOSAL, 1, 2, BLOCK.hash, -1)
    b = signing_bytes(CHAIN, MessageKind.PROPOSAL, 1, 2, BLOCK.hash, 1)
    assert a != b


def test_signing_bytes_start_with_the_domain_tag() -> None:
    assert signing_bytes(CHAIN, MessageKind.PREVOTE, 1, 0, None).startswith(
        b"pyrsia/consensus/v1\x00"
    )


@given(blocks)
def test_block_canonical_bytes_round_trip(block: Block) -> None:
    decoded = Block.from_canonical_bytes(block.canonical_bytes())
    assert decoded == block
    assert decoded.hash == block.hash


def test_block_hash_commits_to_every_field() -> None:
    variants = [
        Block("other", 7, BLOCK.prev_hash, BLOCK.proposer, BLOCK.records),
        Block(CHAIN, 8, BLOCK.prev_hash, BLOCK.proposer, BLOCK.records),
        Block(CHAIN, 7, b"\x02" * 32, BLOCK.proposer, BLOCK.records),
        Block(CHAIN, 7, BLOCK.prev_hash, KEYS[1].public_key, BLOCK.records),
        Block(CHAIN, 7, BLOCK.prev_hash, BLOCK.proposer, (b"ab",)),
        Block(CHAIN, 7, BLOCK.prev_hash, BLOCK.proposer, (b"b", b"a")),
    ]
    assert len({v.hash for v in variants} | {BLOCK.hash}) == len(variants) + 1


def test_truncated_or_padded_block_bytes_are_rejected() -> None:
    data = BLOCK.canonical_bytes()
    with pytest.raises(CanonicalDecodeError):
        Block.from_canonical_bytes(data[:-1])
    with pytest.raises(CanonicalDecodeError):
        Block.from_canonical_bytes(data + b"\x00")


@given(
    st.sampled_from(list(VoteType)),
    st.integers(0, 2**63),
    st.integers(0, 2**32 - 1),
    st.one_of(st.none(), keys32),
)
def test_vote_encoding_round_trips(
    vote_type: VoteType, height: int, round_: int, block_hash: bytes | None
) -> None:
    vote = Vote(vote_type, height, round_, block_hash, KEYS[0].public_key, b"\x05" * 64)
    assert decode_message(encode_message(vote)) == vote


def test_proposal_encoding_round_trips() -> None:
    proposal = Proposal(BLOCK, 3, 1, KEYS[0].public_key, b"\x06" * 64)
    assert decode_message(encode_message(proposal)) == proposal


def test_a_compact_proposal_names_its_records_by_leaf_hash_and_round_trips() -> None:
    proposal = Proposal(BLOCK, 3, 1, KEYS[0].public_key, b"\x06" * 64)
    compact = compact_proposal_to_pb(proposal).proposal
    assert compact_record_hashes(compact) == [leaf_hash(b"a"), leaf_hash(b"b")]
    assert proposal_from_compact_pb(compact, [b"a", b"b"]) == proposal
    assert compact_record_hashes(message_to_pb(proposal).proposal) is None  # a full block
    assert message_from_pb(message_to_pb(proposal)) == proposal


def test_a_compact_proposal_with_other_records_is_another_block() -> None:
    proposal = Proposal(BLOCK, 3, 1, KEYS[0].public_key, b"\x06" * 64)
    compact = compact_proposal_to_pb(proposal).proposal
    assert proposal_from_compact_pb(compact, [b"a", b"c"]).block.hash != BLOCK.hash
    with pytest.raises(WireError):
        proposal_from_compact_pb(compact, [b"a"])
    compact.compact_block.record_hashes.append(b"short")
    with pytest.raises(WireError):
        compact_record_hashes(compact)


def test_certificate_canonical_bytes_round_trip() -> None:
    c = cert(BLOCK, [0, 1, 2])
    assert CommitCertificate.from_canonical_bytes(c.canonical_bytes()) == c


def test_certificate_with_a_quorum_verifies() -> None:
    verify_commit_certificate(BLOCK, cert(BLOCK, [0, 1, 2]), VALIDATORS)
    verify_commit_certificate(BLOCK, cert(BLOCK, [0, 1, 2, 3]), VALIDATORS)


def test_certificate_below_quorum_is_rejected() -> None:
    with pytest.raises(InvalidCommitCertificate, match="2 valid precommits"):
        verify_commit_certificate(BLOCK, cert(BLOCK, [0, 1]), VALIDATORS)


def test_repeated_signer_counts_once() -> None:
    with pytest.raises(InvalidCommitCertificate):
        verify_commit_certificate(BLOCK, cert(BLOCK, [0, 1, 1]), VALIDATORS)


def test_signatures_of_non_validators_do_not_count() -> None:
    with pytest.raises(InvalidCommitCertificate):
        verify_commit_certificate(BLOCK, cert(BLOCK, [0, 1, 4]), VALIDATORS)


def test_signatures_for_another_round_do_not_count() -> None:
    good = cert(BLOCK, [0, 1])
    stray = precommit_sig(2, BLOCK, round_=3)
    mixed = CommitCertificate(BLOCK.height, 2, BLOCK.hash, (*good.signatures, stray))
    with pytest.raises(InvalidCommitCertificate):
        verify_commit_certificate(BLOCK, mixed, VALIDATORS)


def test_signatures_for_another_chain_do_not_count() -> None:
    sigs = tuple(precommit_sig(i, BLOCK, 2, chain="other-chain") for i in (0, 1, 2))
    with pytest.raises(InvalidCommitCertificate):
        verify_commit_certificate(
            BLOCK, CommitCertificate(BLOCK.height, 2, BLOCK.hash, sigs), VALIDATORS
        )


def test_certificate_for_another_block_or_height_is_rejected() -> None:
    other = Block(CHAIN, 7, BLOCK.prev_hash, BLOCK.proposer, (b"x",))
    with pytest.raises(InvalidCommitCertificate, match="different block"):
        verify_commit_certificate(other, cert(BLOCK, [0, 1, 2]), VALIDATORS)
    c = cert(BLOCK, [0, 1, 2])
    moved = CommitCertificate(8, c.round, c.block_hash, c.signatures)
    with pytest.raises(InvalidCommitCertificate, match="height 8"):
        verify_commit_certificate(BLOCK, moved, VALIDATORS)


def test_certificate_is_checked_against_the_given_validator_set() -> None:
    later = ValidatorSet(tuple(k.public_key for k in KEYS[2:]))
    with pytest.raises(InvalidCommitCertificate):
        verify_commit_certificate(BLOCK, cert(BLOCK, [0, 1, 2]), later)
