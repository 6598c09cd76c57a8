"""Conversion between consensus values and their pyrsia.v1 protobuf messages.

Protobuf is only the carrier: every signature is checked against canonical bytes rebuilt
from the fields (`messages.signing_bytes`, `hello_signing_bytes`), never against protobuf
encodings. Decoding raises `WireError` on anything malformed; it does not verify
signatures (the core and `verify_hello` do).

Proposals go between authorities in compact form (`compact_proposal_to_pb`): the block's
records as leaf hashes, which the receiver resolves from records it holds
(`compact_record_hashes`, then `proposal_from_compact_pb`). The rebuilt block is hashed
from the records themselves, so a wrong record for a hash cannot pass the proposer's
signature.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyrsia.v1 import consensus_pb2 as pb

from pyrsia_node.consensus.canonical import Writer
from pyrsia_node.consensus.messages import (
    Block,
    CommitCertificate,
    CommitSignature,
    ConsensusMessage,
    Proposal,
    SignatureVerifier,
    Vote,
    VoteType,
)
from pyrsia_node.consensus.validators import HASH_SIZE, PUBLIC_KEY_SIZE
from pyrsia_node.identity import verify_signature
from pyrsia_node.merkle import leaf_hash

HELLO_DOMAIN = b"pyrsia/consensus-stream/v1\x00"
HELLO_MAX_AGE_MS = 60_000

_VOTE_TYPES = {
    pb.CONSENSUS_VOTE_TYPE_PREVOTE: VoteType.PREVOTE,
    pb.CONSENSUS_VOTE_TYPE_PRECOMMIT: VoteType.PRECOMMIT,
}
_VOTE_TYPES_PB = {v: k for k, v in _VOTE_TYPES.items()}


class WireError(ValueError):
    """A protobuf message does not carry a well-formed consensus value."""


def _key(value: bytes, what: str) -> bytes:
    if len(value) != PUBLIC_KEY_SIZE:
        raise WireError(f"{what}: expected a 32-byte Ed25519 public key, got {len(value)} bytes")
    return value


def _hash(value: bytes, what: str) -> bytes:
    if len(value) != HASH_SIZE:
        raise WireError(f"{what}: expected a 32-byte hash, got {len(value)} bytes")
    return value


def block_to_pb(block: Block) -> pb.ConsensusBlock:
    return pb.ConsensusBlock(
        chain_id=block.chain_id,
        height=block.height,
        prev_hash=block.prev_hash,
        proposer=block.proposer,
        records=list(block.records),
    )


def block_from_pb(message: pb.ConsensusBlock) -> Block:
    return Block(
        message.chain_id,
        message.height,
        _hash(message.prev_hash, "block prev_hash"),
        _key(message.proposer, "block proposer"),
        tuple(message.records),
    )


def certificate_to_pb(cert: CommitCertificate) -> pb.CommitCertificate:
    return pb.CommitCertificate(
        height=cert.height,
        round=cert.round,
        block_hash=cert.block_hash,
        signatures=[
            pb.CommitSignature(validator=s.validator, signature=s.signature)
            for s in cert.signatures
        ],
    )


def certificate_from_pb(message: pb.CommitCertificate) -> CommitCertificate:
    return CommitCertificate(
        message.height,
        message.round,
        _hash(message.block_hash, "certificate block_hash"),
        tuple(
            CommitSignature(_key(s.validator, "certificate signer"), s.signature)
            for s in message.signatures
        ),
    )


def committed_to_pb(block: Block, cert: CommitCertificate) -> pb.CommittedBlock:
    return pb.CommittedBlock(block=block_to_pb(block), certificate=certificate_to_pb(cert))


def committed_from_pb(message: pb.CommittedBlock) -> tuple[Block, CommitCertificate]:
    return block_from_pb(message.block), certificate_from_pb(message.certificate)


def message_to_pb(message: ConsensusMessage) -> pb.ConsensusEnvelope:
    if isinstance(message, Proposal):
        return pb.ConsensusEnvelope(
            proposal=pb.ConsensusProposal(
                block=block_to_pb(message.block),
                round=message.round,
                valid_round=message.valid_round,
                proposer=message.proposer,
                signature=message.signature,
            )
        )
    return pb.ConsensusEnvelope(
        vote=pb.ConsensusVote(
            type=_VOTE_TYPES_PB[message.type],
            height=message.height,
            round=message.round,
            block_hash=message.block_hash or b"",
            validator=message.validator,
            signature=message.signature,
        )
    )


def message_from_pb(envelope: pb.ConsensusEnvelope) -> ConsensusMessage:
    body = envelope.WhichOneof("body")
    if body == "proposal":
        p = envelope.proposal
        return Proposal(
            block_from_pb(p.block),
            p.round,
            p.valid_round,
            _key(p.proposer, "proposer"),
            p.signature,
        )
    if body == "vote":
        v = envelope.vote
        vote_type = _VOTE_TYPES.get(v.type)
        if vote_type is None:
            raise WireError(f"vote type {v.type} is neither prevote nor precommit")
        block_hash = _hash(v.block_hash, "vote block_hash") if v.block_hash else None
        return Vote(
            vote_type, v.height, v.round, block_hash, _key(v.validator, "voter"), v.signature
        )
    raise WireError(f"envelope carries {body!r}, not a proposal or vote")


def compact_proposal_to_pb(proposal: Proposal) -> pb.ConsensusEnvelope:
    """`proposal` with its block's records replaced by their leaf hashes."""
    block = proposal.block
    return pb.ConsensusEnvelope(
        proposal=pb.ConsensusProposal(
            compact_block=pb.CompactBlock(
                chain_id=block.chain_id,
                height=block.height,
                prev_hash=block.prev_hash,
                proposer=block.proposer,
                record_hashes=[leaf_hash(record) for record in block.records],
            ),
            round=proposal.round,
            valid_round=proposal.valid_round,
            proposer=proposal.proposer,
            signature=proposal.signature,
        )
    )


def compact_record_hashes(message: pb.ConsensusProposal) -> list[bytes] | None:
    """The leaf hashes of a compact proposal's records; None for a proposal carrying its
    block in full."""
    if not message.HasField("compact_block"):
        return None
    hashes = list(message.compact_block.record_hashes)
    for value in hashes:
        _hash(value, "compact block record hash")
    return hashes


def proposal_from_compact_pb(message: pb.ConsensusProposal, records: Sequence[bytes]) -> Proposal:
    """The proposal of a compact `message` whose records, in order, are `records`."""
    compact = message.compact_block
    if len(records) != len(compact.record_hashes):
        raise WireError(
            f"compact block names {len(compact.record_hashes)} records, got {len(records)}"
        )
    block = Block(
        compact.chain_id,
        compact.height,
        _hash(compact.prev_hash, "block prev_hash"),
        _key(compact.proposer, "block proposer"),
        tuple(records),
    )
    return Proposal(
        block,
        message.round,
        message.valid_round,
        _key(message.proposer, "proposer"),
        message.signature,
    )


def hello_signing_bytes(chain_id: str, sender: bytes, receiver: bytes, timestamp_ms: int) -> bytes:
    return (
        Writer()
        .raw(HELLO_DOMAIN)
        .blob(chain_id.encode())
        .blob(sender)
        .blob(receiver)
        .u64(timestamp_ms)
        .bytes()
    )


def verify_hello(
    hello: pb.StreamHello,
    chain_id: str,
    receiver: bytes,
    now_ms: int,
    verify: SignatureVerifier = verify_signature,
) -> bytes:
    """The sender's public key when `hello` opens a stream to `receiver` on `chain_id`."""
    if hello.chain_id != chain_id:
        raise WireError(f"stream is for chain {hello.chain_id!r}, this node is on {chain_id!r}")
    if hello.receiver != receiver:
        raise WireError("stream hello is addressed to another node")
    if abs(now_ms - hello.timestamp_ms) > HELLO_MAX_AGE_MS:
        raise WireError("stream hello is stale; check the clocks of both nodes")
    sender = _key(hello.public_key, "stream sender")
    message = hello_signing_bytes(chain_id, sender, receiver, hello.timestamp_ms)
    if not verify(sender, hello.signature, message):
        raise WireError("stream hello signature does not verify")
    return sender
