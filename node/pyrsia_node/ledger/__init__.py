"""The ledger: what the network agreed on, in a verifiable, durable, append-only log.

Layout (one job per module; import the names below, the rest is internal):
  records     canonical, versioned byte encoding of artifact and governance records
  checkpoint  C2SP tlog-checkpoint signed notes, Ed25519 cosigning, quorum verification
  log         durable storage: records and tree hashes in append-only files, the commit
              point a checksummed record in commit.dat; indexes (written by a background
              thread) and checkpoints in SQLite (WAL)
  authorities the authorities in force at a tree size, replayed from the genesis and the
              log's governance records
  bundle      offline proof bundles (record + inclusion proof + checkpoint + authority keys
              + governance records with their proofs)

The Merkle hashing and proof algorithms themselves live in ``pyrsia_node.merkle``.
"""

from pyrsia_node.ledger.authorities import AuthoritiesInForce, authorities_in_force
from pyrsia_node.ledger.bundle import BundleError, ProofBundle, VerifiedBundle, verify_bundle
from pyrsia_node.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    SignedNote,
    cosign,
    origin_for,
    sign,
    verify_checkpoint,
)
from pyrsia_node.ledger.log import EntryNotFound, LogError, TransparencyLog
from pyrsia_node.ledger.records import (
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    GovernanceAction,
    GovernanceRecord,
    PackageType,
    RecordError,
    check_record,
    decode_record,
    record_hash,
)

__all__ = [
    "Artifact",
    "ArtifactRecord",
    "AuthoritiesInForce",
    "BundleError",
    "Checkpoint",
    "CheckpointError",
    "DsseEnvelope",
    "EntryNotFound",
    "GovernanceAction",
    "GovernanceRecord",
    "LogError",
    "PackageType",
    "ProofBundle",
    "RecordError",
    "SignedNote",
    "TransparencyLog",
    "VerifiedBundle",
    "authorities_in_force",
    "check_record",
    "cosign",
    "decode_record",
    "origin_for",
    "record_hash",
    "sign",
    "verify_bundle",
    "verify_checkpoint",
]
