"""Consensus values and their canonical bytes: blocks, proposals, votes, commit certificates.

Every signature is over `signing_bytes`: a fixed domain tag, the chain id, the message kind,
the height, the round and the block hash (and, for proposals, the valid round). A signature
for one chain, kind, height or round therefore never verifies for another. Signatures are
never over protobuf encodings; the wire format carries the fields and the receiver rebuilds
these bytes.

A block is identified by `Block.hash`, the SHA-256 of its canonical bytes, which commit to
the chain id, height, previous block hash, proposer and every record in order.

This module never performs IO; verification takes the signature checker as a parameter so
that simulations can count or memoise calls.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from pyrsia_node.consensus.canonical import Reader, Writer
from pyrsia_node.consensus.validators import HASH_SIZE, PUBLIC_KEY_SIZE, ValidatorSet
from pyrsia_node.identity import verify_signature

DOMAIN = b"pyrsia/consensus/v1\x00"
BLOCK_DOMAIN = b"pyrsia/block/v1\x00"

SignatureVerifier = Callable[[bytes, bytes, bytes], bool]
"""(public_key, signature, message) -> valid; `pyrsia_node.identity.verify_signature`."""


class MessageKind(enum.IntEnum):
    PROPOSAL = 1
    PREVOTE = 2
    PRECOMMIT = 3


class VoteType(enum.IntEnum):
    PREVOTE = MessageKind.PREVOTE
    PRECOMMIT = MessageKind.PRECOMMIT


class InvalidCommitCertificate(Exception):
    """A commit certificate does not prove that a quorum precommitted the block."""

    def __init__(self, height: int, reason: str) -> None:
        super().__init__(f"commit certificate for height {height} rejected: {reason}")
        self.height = height
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Block:
    """An ordered batch of opaque records decided at one height."""

    chain_id: str
    height: int
    prev_hash: bytes
    proposer: bytes
    records: tuple[bytes, ...]
    hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", hashlib.sha256(self.canonical_bytes()).digest())

    def canonical_bytes(self) -> bytes:
        writer = Writer().raw(BLOCK_DOMAIN).blob(self.chain_id.encode()).u64(self.height)
        writer.blob(self.prev_hash).blob(self.proposer).u32(len(self.records))
        for record in self.records:
            writer.blob(record)
        return writer.bytes()

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> Block:
        reader = Reader(data)
        if reader.raw(len(BLOCK_DOMAIN)) != BLOCK_DOMAIN:
            raise ValueError("not a pyrsia block encoding")
        chain_id = reader.blob(253).decode()
        height = reader.u64()
        prev_hash = reader.blob(HASH_SIZE)
        proposer = reader.blob(PUBLIC_KEY_SIZE)
        records = tuple(reader.blob() for _ in range(reader.u32()))
        reader.end()
        return cls(chain_id, height, prev_hash, proposer, records)


def signing_bytes(
    chain_id: str,
    kind: MessageKind,
    height: int,
    round_: int,
    block_hash: bytes | None,
    valid_round: int = -1,
) -> bytes:
    """The bytes a validator signs; `block_hash` None is a vote for nil."""
    writer = Writer().raw(DOMAIN).blob(chain_id.encode()).u8(kind).u64(height).u32(round_)
    if block_hash is None:
        writer.u8(0)
    else:
        writer.u8(1).raw(block_hash)
    if kind is MessageKind.PROPOSAL:
        writer.i64(valid_round)
    return writer.bytes()


@dataclass(frozen=True, slots=True)
class Proposal:
    """<PROPOSAL, height, round, block, valid_round> signed by the round's proposer."""

    block: Block
    round: int
    valid_round: int
    proposer: bytes
    signature: bytes

    @property
    def height(self) -> int:
        return self.block.height

    def signing_bytes(self, chain_id: str) -> bytes:
        return signing_bytes(
            chain_id,
            MessageKind.PROPOSAL,
            self.block.height,
            self.round,
            self.block.hash,
            self.valid_round,
        )

    def verify(self, chain_id: str, verify: SignatureVerifier = verify_signature) -> bool:
        return verify(self.proposer, self.signature, self.signing_bytes(chain_id))


@dataclass(frozen=True, slots=True)
class Vote:
    """<PREVOTE|PRECOMMIT, height, round, block hash or nil> signed by one validator."""

    type: VoteType
    height: int
    round: int
    block_hash: bytes | None
    validator: bytes
    signature: bytes

    def signing_bytes(self, chain_id: str) -> bytes:
        return signing_bytes(
            chain_id, MessageKind(self.type), self.height, self.round, self.block_hash
        )

    def verify(self, chain_id: str, verify: SignatureVerifier = verify_signature) -> bool:
        return verify(self.validator, self.signature, self.signing_bytes(chain_id))


ConsensusMessage = Proposal | Vote


@dataclass(frozen=True, slots=True)
class CommitSignature:
    validator: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class CommitCertificate:
    """A quorum of precommits for one block at one (height, round)."""

    height: int
    round: int
    block_hash: bytes
    signatures: tuple[CommitSignature, ...]

    def canonical_bytes(self) -> bytes:
        writer = Writer().u64(self.height).u32(self.round).blob(self.block_hash)
        writer.u32(len(self.signatures))
        for item in self.signatures:
            writer.blob(item.validator).blob(item.signature)
        return writer.bytes()

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> CommitCertificate:
        reader = Reader(data)
        height, round_, block_hash = reader.u64(), reader.u32(), reader.blob(HASH_SIZE)
        count = reader.u32()
        signatures = tuple(
            CommitSignature(reader.blob(PUBLIC_KEY_SIZE), reader.blob(64)) for _ in range(count)
        )
        reader.end()
        return cls(height, round_, block_hash, signatures)


def verify_commit_certificate(
    block: Block,
    cert: CommitCertificate,
    validator_set: ValidatorSet,
    verify: SignatureVerifier = verify_signature,
) -> None:
    """Raise `InvalidCommitCertificate` unless `cert` holds a quorum of `validator_set`'s
    valid precommits for `block` (at the block's height, in the block's chain).

    `validator_set` must be the set for `block.height`; the caller derives it from the chain
    (see `ChainState`). Signatures from non-validators or repeated validators do not count.
    """
    if cert.height != block.height:
        raise InvalidCommitCertificate(block.height, f"certificate is for height {cert.height}")
    if cert.block_hash != block.hash:
        raise InvalidCommitCertificate(block.height, "certificate is for a different block")
    message = signing_bytes(
        block.chain_id, MessageKind.PRECOMMIT, block.height, cert.round, block.hash
    )
    counted: set[bytes] = set()
    for item in cert.signatures:
        if item.validator in counted or item.validator not in validator_set:
            continue
        if verify(item.validator, item.signature, message):
            counted.add(item.validator)
    if len(counted) < validator_set.quorum:
        raise InvalidCommitCertificate(
            block.height,
            f"{len(counted)} valid precommits from validators, quorum is {validator_set.quorum}",
        )


def encode_message(message: ConsensusMessage) -> bytes:
    """Canonical bytes of a signed message (for the write-ahead file, not for signing)."""
    if isinstance(message, Proposal):
        writer = Writer().u8(MessageKind.PROPOSAL).blob(message.block.canonical_bytes())
        writer.u32(message.round).i64(message.valid_round)
        return writer.blob(message.proposer).blob(message.signature).bytes()
    writer = Writer().u8(message.type).u64(message.height).u32(message.round)
    writer.blob(message.block_hash if message.block_hash is not None else b"")
    return writer.blob(message.validator).blob(message.signature).bytes()


def decode_message(data: bytes) -> ConsensusMessage:
    reader = Reader(data)
    kind = MessageKind(reader.u8())
    message: ConsensusMessage
    if kind is MessageKind.PROPOSAL:
        block = Block.from_canonical_bytes(reader.blob())
        round_, valid_round = reader.u32(), reader.i64()
        proposer = reader.blob(PUBLIC_KEY_SIZE)
        message = Proposal(block, round_, valid_round, proposer, reader.blob(64))
    else:
        height, round_ = reader.u64(), reader.u32()
        block_hash = reader.blob(HASH_SIZE) or None
        validator = reader.blob(PUBLIC_KEY_SIZE)
        message = Vote(VoteType(kind), height, round_, block_hash, validator, reader.blob(64))
    reader.end()
    return message
