"""Consensus among authorities: Tendermint as a sans-IO core plus the pieces around it.

Layout (one job per module):
  canonical   fixed canonical byte encoding (signing bytes, hashes, write-ahead frames)
  validators  validator sets, governance changes to them (in force at H + 2), quorum
  messages    blocks, proposals, votes, commit certificates; signing bytes; verification
  chain       ChainState: next height, last block hash, validator sets for h and h + 1
  wal         the fsynced write-ahead state that keeps a validator safe across restarts
  core        the Tendermint state machine: events in, actions out; no IO, clock injected
  completion  compact proposals waiting for records: whom to ask, which record completes
  following   which authority a peer streams blocks from, and when it moves to another

The core never touches the network, the disk or the system clock; shells execute its
actions. Peers follow the chain with `verify_commit_certificate` and `ChainState.after`.
"""

from pyrsia_node.consensus.chain import ChainState
from pyrsia_node.consensus.core import (
    Action,
    Broadcast,
    Commit,
    CommitReceived,
    ConsensusConfig,
    ConsensusCore,
    ConsensusStateError,
    EquivocationFound,
    Event,
    Persist,
    ProposalReceived,
    RecordsSubmitted,
    RecordSubmitted,
    RequestSync,
    ScheduleTimeout,
    Signer,
    Timeout,
    TimeoutFired,
    TimeoutKind,
    Timeouts,
    VoteReceived,
)
from pyrsia_node.consensus.messages import (
    Block,
    CommitCertificate,
    CommitSignature,
    ConsensusMessage,
    InvalidCommitCertificate,
    MessageKind,
    Proposal,
    Vote,
    VoteType,
    signing_bytes,
    verify_commit_certificate,
)
from pyrsia_node.consensus.validators import (
    ValidatorSet,
    ValidatorSetChange,
    ValidatorSetChangeDecoder,
    no_validator_set_changes,
)
from pyrsia_node.consensus.wal import Step, WalError, WalState, WriteAheadFile

__all__ = [
    "Action",
    "Block",
    "Broadcast",
    "ChainState",
    "Commit",
    "CommitCertificate",
    "CommitReceived",
    "CommitSignature",
    "ConsensusConfig",
    "ConsensusCore",
    "ConsensusMessage",
    "ConsensusStateError",
    "EquivocationFound",
    "Event",
    "InvalidCommitCertificate",
    "MessageKind",
    "Persist",
    "Proposal",
    "ProposalReceived",
    "RecordSubmitted",
    "RecordsSubmitted",
    "RequestSync",
    "ScheduleTimeout",
    "Signer",
    "Step",
    "Timeout",
    "TimeoutFired",
    "TimeoutKind",
    "Timeouts",
    "ValidatorSet",
    "ValidatorSetChange",
    "ValidatorSetChangeDecoder",
    "Vote",
    "VoteReceived",
    "VoteType",
    "WalError",
    "WalState",
    "WriteAheadFile",
    "no_validator_set_changes",
    "signing_bytes",
    "verify_commit_certificate",
]
