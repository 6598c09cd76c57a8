"""The Tendermint state machine (arXiv 1807.04938, Algorithm 1) as a sans-IO core.

Events go in through `ConsensusCore.handle` (a proposal, a vote, a fired timeout, a new
record, a block with its commit certificate from sync); a list of actions comes out
(persist, broadcast, schedule a timeout, commit, request sync, report equivocation). The
shell executes the actions in order. The core never performs IO, never reads the system
clock (time comes from the injected `clock`, used only to pace sync requests) and uses no
randomness: the same events in the same order give the same actions.

Invariants the core maintains, each checked by tests/test_consensus*.py:

* Safety of the algorithm: lockedRound/lockedValue and validRound/validValue follow the
  paper's lines 22-54 exactly; a proposer re-proposes validValue; a node skips to round r'
  on f+1 distinct validators' messages from r' (line 55). With at most f = n - q Byzantine
  validators no two honest nodes commit different blocks at one height.
* One signature per slot: the core signs at most one message per (height, round, type);
  `_sign_*` refuses a second one, and after a restart the messages already signed come back
  from the write-ahead state instead of being signed again.
* Write-ahead: every action list that broadcasts a newly signed message carries, before it,
  a `Persist` whose state contains that message and the current lock. The shell must not
  execute a later action until a `Persist` is durable (fsynced).
* State loss: a core started with `state_lost=True` (its key may have signed before, but
  the write-ahead state is gone) signs nothing until it has received messages straight from
  a quorum of other validators (relayed copies do not count: they may be old) and committed
  past the highest height among them plus one, and past every height at which it sees its
  own key's signature; by quorum intersection the key cannot have signed at a height that
  high. Assumption: the node was down longer than the longest message delay.
* First vote counts: only the first valid vote per (height, round, type, validator) counts
  towards "2f+1 of any value" and round skips, and only the first proposal per round gets
  this node's prevote; a conflicting, validly signed second one is kept in `evidence` and
  reported with `EquivocationFound`. It still counts towards quorums *for its own value*
  (as the paper's message sets do; at most `MAX_VALUES_PER_SLOT` values per key), because
  otherwise an equivocator can show honest nodes different first votes and stall them.
* Block validity: every record is pending here (checked with `record_valid` when it was
  submitted, and again whenever the authorities in force change) or passes `record_valid`
  now and is not `record_committed` (already in the log). `record_valid` judges a record by
  the chain's `authorities_in_force` (the set after every committed change), so a check
  made at one height holds for the whole height.
* A validator-set change (a record `validator_set_change` decodes) ends its block: no record
  follows it there, so every record of a block is judged by the authorities in force where
  it lands in the log (`pyrsia_node.ledger.authorities`), the set before the block.
* Validator sets come from `ChainState`: a governance record committed at H changes the set
  from H + 2, decoded by the injected `validator_set_change`; the authorities in force
  change at once.

* No endless empty blocks: a height with nothing pending waits in NEW_HEIGHT (after the
  `Timeouts.commit` pause) until a record arrives, a round-0 proposal or f+1 validators'
  round-0 messages show that the others have started, or `Timeouts.empty_block` passes.
  Starting round 0 later is only a delay, so safety is untouched; liveness holds because
  the timer always ends the wait. A lone validator therefore commits inside one `handle`
  call only while records are pending, each block taking at least one of them.

Messages for the next height are buffered (bounded) and replayed when the node gets there;
older heights are dropped; any message from a higher height triggers a paced `RequestSync`.
Own messages, the prevotes that justify validValue (the proof of lock) and others' votes of
the current and previous round are re-broadcast every `Timeouts.retransmit` seconds, which
is what keeps the protocol live over lossy links and after another validator lost the
messages it sent.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

from pyrsia_node.consensus.chain import ChainState
from pyrsia_node.consensus.messages import (
    Block,
    CommitCertificate,
    CommitSignature,
    ConsensusMessage,
    InvalidCommitCertificate,
    MessageKind,
    Proposal,
    SignatureVerifier,
    Vote,
    VoteType,
    signing_bytes,
    verify_commit_certificate,
)
from pyrsia_node.consensus.validators import (
    HASH_SIZE,
    ValidatorSetChangeDecoder,
    no_validator_set_changes,
)
from pyrsia_node.consensus.wal import Step, WalState
from pyrsia_node.identity import verify_signature

MAX_VALUES_PER_SLOT = 3
"""Values one key may have counted per (height, round, type): its first and two more."""


class Signer(Protocol):
    """What the core needs from a key; `pyrsia_node.identity.Identity` is one."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


class ConsensusStateError(Exception):
    """The restored state contradicts the chain; the node must not vote until resolved."""


class TimeoutKind(enum.IntEnum):
    PROPOSE = 1
    PREVOTE = 2
    PRECOMMIT = 3
    NEW_HEIGHT = 4
    RETRANSMIT = 5
    EMPTY_BLOCK = 6


@dataclass(frozen=True, slots=True)
class Timeout:
    kind: TimeoutKind
    height: int
    round: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; the three protocol timeouts grow linearly with the round.

    `commit`: pause after a commit before the next height starts (0: at once). Tendermint's
    timeout_commit: records arriving meanwhile join the next block, so a loaded network
    runs fewer, larger heights and each height's fixed work (votes, write-ahead and block
    fsyncs, log append, cosigning) is shared by more records. 50 ms, measured with
    `bench/bench_consensus.py` (4 authorities, interleaved against 0): CPU per record 18-26%
    lower at 1,500 records/s and ~6% at 2,000/s, p99 at 2,000/s ~470 ms instead of ~600;
    no change at saturation, where blocks are large anyway (bench/RESULTS.md).
    `empty_block`: at a new height with no pending record, how long (from the commit) to
    wait for one before starting round 0 anyway, which commits an empty block; a record,
    a round-0 proposal or f+1 validators in round 0 end the wait early. It is what keeps
    an idle network from committing empty blocks back to back, and a lone validator from
    looping forever inside one `handle` call.
    """

    propose: float = 1.0
    prevote: float = 1.0
    precommit: float = 1.0
    delta: float = 0.5
    commit: float = 0.05
    empty_block: float = 5.0
    retransmit: float = 1.0
    sync_interval: float = 1.0

    def for_round(self, kind: TimeoutKind, round_: int) -> float:
        base = {
            TimeoutKind.PROPOSE: self.propose,
            TimeoutKind.PREVOTE: self.prevote,
            TimeoutKind.PRECOMMIT: self.precommit,
        }[kind]
        return base + self.delta * round_


@dataclass(frozen=True, slots=True)
class ConsensusConfig:
    chain_id: str
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_block_records: int = 10_000
    # Record bytes per block; a proposal must fit gRPC's default 4 MiB message limit.
    max_block_bytes: int = 3 << 20
    max_pending_records: int = 100_000
    max_future_messages: int = 10_000
    max_round: int = 10_000
    max_evidence: int = 1_000


# Events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposalReceived:
    """`sender`: the authenticated node that handed us the message (None if unknown); it
    differs from the signer when a message is relayed."""

    proposal: Proposal
    sender: bytes | None = None


@dataclass(frozen=True, slots=True)
class VoteReceived:
    """`sender`: as for `ProposalReceived`."""

    vote: Vote
    sender: bytes | None = None


@dataclass(frozen=True, slots=True)
class TimeoutFired:
    timeout: Timeout


@dataclass(frozen=True, slots=True)
class RecordSubmitted:
    record: bytes


@dataclass(frozen=True, slots=True)
class RecordsSubmitted:
    """Several records at once, in order: the same as one `RecordSubmitted` each."""

    records: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class CommitReceived:
    """A block and its certificate from block sync."""

    block: Block
    certificate: CommitCertificate


Event = (
    ProposalReceived
    | VoteReceived
    | TimeoutFired
    | RecordSubmitted
    | RecordsSubmitted
    | CommitReceived
)


# Actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Persist:
    """Make `state` durable (fsync) before executing any later action."""

    state: WalState


@dataclass(frozen=True, slots=True)
class Broadcast:
    message: ConsensusMessage


@dataclass(frozen=True, slots=True)
class ScheduleTimeout:
    timeout: Timeout
    delay: float


@dataclass(frozen=True, slots=True)
class Commit:
    """`block` is decided; append it to the ledger in height order."""

    block: Block
    certificate: CommitCertificate


@dataclass(frozen=True, slots=True)
class RequestSync:
    """Fetch committed blocks from `from_height` on, e.g. from `peer`, and feed them back
    as `CommitReceived` events."""

    peer: bytes
    from_height: int


@dataclass(frozen=True, slots=True)
class EquivocationFound:
    """Two validly signed, conflicting messages from one key for the same slot."""

    first: ConsensusMessage
    second: ConsensusMessage


Action = Persist | Broadcast | ScheduleTimeout | Commit | RequestSync | EquivocationFound


def _accept_any_record(record: bytes) -> bool:
    return True


def _never_committed(record: bytes) -> bool:
    return False


def _slot(message: ConsensusMessage) -> tuple[int, int, MessageKind]:
    if isinstance(message, Proposal):
        return (message.height, message.round, MessageKind.PROPOSAL)
    return (message.height, message.round, MessageKind(message.type))


def _sender(message: ConsensusMessage) -> bytes:
    return message.proposer if isinstance(message, Proposal) else message.validator


class ConsensusCore:
    """One validator's (or follower's) Tendermint state; the only owner of that state."""

    def __init__(
        self,
        config: ConsensusConfig,
        signer: Signer,
        chain: ChainState,
        *,
        clock: Callable[[], float],
        verify: SignatureVerifier = verify_signature,
        validator_set_change: ValidatorSetChangeDecoder = no_validator_set_changes,
        record_valid: Callable[[bytes], bool] = _accept_any_record,
        record_committed: Callable[[bytes], bool] = _never_committed,
        restored: WalState | None = None,
        state_lost: bool = False,
    ) -> None:
        self.config = config
        self._signer = signer
        self._key = signer.public_key
        self._clock = clock
        self._verify = verify
        self._decoder = validator_set_change
        self._record_valid = record_valid
        self._record_committed = record_committed
        self._chain = chain
        self._pending: dict[bytes, None] = {}
        self._future: list[tuple[ConsensusMessage, bytes | None]] = []
        self._last_sync_request = float("-inf")
        self._missing_block_syncs = 0
        self.evidence: list[EquivocationFound] = []
        # State-loss guard: heights at which other validators were seen, own key's highest.
        self._seen_heights: dict[bytes, int] = {}
        self._own_seen_height = 0
        self._signing_floor: int | None = None if state_lost else 0
        self._actions: list[Action] = []
        self._outbox: list[ConsensusMessage] = []
        self._dirty = False
        self._reset_height()
        self._restored = restored
        if restored is not None:
            if restored.signing_floor is None:
                self._signing_floor = None
            elif self._signing_floor is not None:
                self._signing_floor = max(self._signing_floor, restored.signing_floor)
            if restored.height > chain.height:
                # The ledger lost blocks the write-ahead state had reached: we cannot
                # rebuild that height's locks, so never sign at or below it again.
                if self._signing_floor is not None:
                    self._signing_floor = max(self._signing_floor, restored.height + 1)
                self._restored = None
            elif restored.height < chain.height:
                self._restored = None

    # Read-only views -------------------------------------------------------------------

    @property
    def height(self) -> int:
        return self._height

    @property
    def round(self) -> int:
        return self._round

    @property
    def step(self) -> Step:
        return self._step

    @property
    def chain(self) -> ChainState:
        return self._chain

    @property
    def public_key(self) -> bytes:
        return self._key

    @property
    def signing_floor(self) -> int | None:
        return self._signing_floor

    def known_blocks(self) -> list[Block]:
        """The blocks of the current height this node holds: every proposal it counted,
        its locked and its valid block (what it or others may propose again)."""
        blocks = [p.block for by_hash in self._proposals.values() for p in by_hash.values()]
        blocks += [b for b in (self._locked_block, self._valid_block) if b is not None]
        return blocks

    def wal_state(self) -> WalState:
        return WalState(
            self._height,
            self._round,
            self._step,
            self._locked_round,
            self._locked_block,
            self._valid_round,
            self._valid_block,
            tuple(self._own.values()),
            self._signing_floor,
            tuple(self._proof_of_lock()),
        )

    def _proof_of_lock(self) -> list[Vote]:
        if self._valid_block is None:
            return []
        by_value = self._tally.get((self._valid_round, VoteType.PREVOTE), {})
        return list(by_value.get(self._valid_block.hash, {}).values())

    # Entry points ----------------------------------------------------------------------

    def start(self) -> list[Action]:
        """Begin (or resume from the restored write-ahead state); call once."""
        self._begin()
        self._schedule(Timeout(TimeoutKind.RETRANSMIT, self._height, 0), None)
        restored = self._restored
        self._restored = None
        if restored is None:
            self._dirty = True
            self._enter_height()
        else:
            self._resume(restored)
        self._run_rules()
        return self._flush()

    def handle(self, event: Event) -> list[Action]:
        self._begin()
        if isinstance(event, VoteReceived):
            self._on_message(event.vote, event.sender)
        elif isinstance(event, ProposalReceived):
            self._on_message(event.proposal, event.sender)
        elif isinstance(event, TimeoutFired):
            self._on_timeout(event.timeout)
        elif isinstance(event, RecordSubmitted):
            self._add_pending(event.record)
        elif isinstance(event, RecordsSubmitted):
            for record in event.records:
                self._add_pending(record)
        else:
            self._on_commit_received(event.block, event.certificate)
        self._run_rules()
        self._sync_if_decided_without_us()
        return self._flush()

    def _add_pending(self, record: bytes) -> None:
        if (
            len(self._pending) < self.config.max_pending_records
            and record not in self._pending
            and self._record_valid(record)
        ):
            self._pending[record] = None

    # Plumbing --------------------------------------------------------------------------

    def _begin(self) -> None:
        self._actions = []
        self._outbox = []
        self._dirty = False

    def _flush(self) -> list[Action]:
        actions = self._actions
        if self._dirty:
            actions.append(Persist(self.wal_state()))
        actions.extend(Broadcast(message) for message in self._outbox)
        self._actions = []
        self._outbox = []
        return actions

    def _schedule(self, timeout: Timeout, delay: float | None) -> None:
        if delay is None:
            delay = self.config.timeouts.retransmit
        self._actions.append(ScheduleTimeout(timeout, delay))

    def _reset_height(self) -> None:
        self._height = self._chain.height
        self._round = 0
        self._step = Step.NEW_HEIGHT
        self._awaiting_records = False
        self._locked_round = -1
        self._locked_block: Block | None = None
        self._valid_round = -1
        self._valid_block: Block | None = None
        # round -> block hash -> proposal; the first entry is the proposal that counts for
        # this node's own prevote, all of them (an equivocating proposer's too) can be
        # locked on or decided once a quorum voted for them.
        self._proposals: dict[int, dict[bytes, Proposal]] = {}
        # First vote per (round, type, validator): what "2f+1 of any value" counts.
        self._votes: dict[tuple[int, VoteType], dict[bytes, Vote]] = {}
        # Votes per value: first votes plus an equivocator's validly signed extra ones.
        self._tally: dict[tuple[int, VoteType], dict[bytes | None, dict[bytes, Vote]]] = {}
        self._extra_values: dict[tuple[int, VoteType, bytes], int] = {}
        self._round_senders: dict[int, set[bytes]] = {}
        self._prevote_timeouts: set[int] = set()
        self._precommit_timeouts: set[int] = set()
        self._line36_rounds: set[int] = set()
        self._own: dict[tuple[int, int, MessageKind], ConsensusMessage] = {}
        self._block_validity: dict[bytes, bool] = {}

    def _enter_height(self) -> None:
        """Start the current height: after `Timeouts.commit` (or at once), and then only
        once a record is pending or `Timeouts.empty_block` has passed."""
        self._awaiting_records = False
        delay = self.config.timeouts.commit
        if delay > 0:
            self._schedule(Timeout(TimeoutKind.NEW_HEIGHT, self._height, 0), delay)
        else:
            self._start_round_0_or_await_records()
        future, self._future = self._future, []
        for message, via in future:
            self._on_message(message, via)

    def _resume(self, state: WalState) -> None:
        self._round, self._step = state.round, state.step
        self._locked_round, self._locked_block = state.locked_round, state.locked_block
        self._valid_round, self._valid_block = state.valid_round, state.valid_block
        for message in state.own_messages:
            if message.height != self._height:
                continue
            self._own[_slot(message)] = message
            self._store(message)
            self._outbox.append(message)
        for vote in state.proof_of_lock:
            if vote.height == self._height and self._first_in_slot(vote) is None:
                self._store(vote)
        if self._step is Step.NEW_HEIGHT:
            self._enter_height()
        elif self._step is Step.PROPOSE:
            self._propose_or_wait()

    def _start_round_0_or_await_records(self) -> None:
        timeouts = self.config.timeouts
        wait = timeouts.empty_block - timeouts.commit
        if self._pending or self._valid_block is not None or wait <= 0:
            self._start_round(0)
            return
        self._awaiting_records = True
        self._schedule(Timeout(TimeoutKind.EMPTY_BLOCK, self._height, 0), wait)

    def _others_started_round_0(self) -> bool:
        """A round-0 proposal, or f+1 validators' messages from round 0: the network has
        started this height, so waiting for records any longer only delays it."""
        return bool(self._proposals.get(0)) or (
            len(self._round_senders.get(0, ())) >= self._chain.validators.skip_threshold
        )

    # State transitions (Algorithm 1) --------------------------------------------------

    def _start_round(self, round_: int) -> None:
        self._awaiting_records = False
        self._round = round_
        self._step = Step.PROPOSE
        self._dirty = True
        self._propose_or_wait()

    def _propose_or_wait(self) -> None:
        h, r = self._height, self._round
        if self._chain.validators.proposer(h, r) == self._key and self._can_sign():
            if (h, r, MessageKind.PROPOSAL) not in self._own:
                block = self._valid_block or self._new_block()
                self._sign_proposal(block)
            return
        self._schedule(
            Timeout(TimeoutKind.PROPOSE, h, r),
            self.config.timeouts.for_round(TimeoutKind.PROPOSE, r),
        )

    def _new_block(self) -> Block:
        # Pending records were checked with `record_valid` when they were submitted.
        records: list[bytes] = []
        size = 0
        for record in islice(self._pending, self.config.max_block_records):
            if size + len(record) > self.config.max_block_bytes:
                break
            records.append(record)
            size += len(record)
            if self._decoder(record) is not None:
                break  # a validator-set change ends its block
        return Block(
            self.config.chain_id, self._height, self._chain.prev_hash, self._key, tuple(records)
        )

    def _can_sign(self) -> bool:
        floor = self._signing_floor
        return self._key in self._chain.validators and floor is not None and self._height >= floor

    def _sign_proposal(self, block: Block) -> None:
        slot = (self._height, self._round, MessageKind.PROPOSAL)
        if slot in self._own or not self._can_sign():
            return
        message = signing_bytes(
            self.config.chain_id,
            MessageKind.PROPOSAL,
            self._height,
            self._round,
            block.hash,
            self._valid_round,
        )
        proposal = Proposal(
            block, self._round, self._valid_round, self._key, self._signer.sign(message)
        )
        self._emit_own(slot, proposal)

    def _sign_vote(self, vote_type: VoteType, block_hash: bytes | None) -> None:
        slot = (self._height, self._round, MessageKind(vote_type))
        if slot in self._own or not self._can_sign():
            return
        message = signing_bytes(
            self.config.chain_id, MessageKind(vote_type), self._height, self._round, block_hash
        )
        vote = Vote(
            vote_type,
            self._height,
            self._round,
            block_hash,
            self._key,
            self._signer.sign(message),
        )
        self._emit_own(slot, vote)

    def _emit_own(self, slot: tuple[int, int, MessageKind], message: ConsensusMessage) -> None:
        self._own[slot] = message
        self._store(message)
        self._outbox.append(message)
        self._dirty = True

    def _valid(self, block: Block) -> bool:
        known = self._block_validity.get(block.hash)
        if known is not None:
            return known
        valid = (
            block.chain_id == self.config.chain_id
            and block.height == self._height
            and block.prev_hash == self._chain.prev_hash
            and block.proposer in self._chain.validators
            and len(block.records) <= self.config.max_block_records
            and sum(map(len, block.records)) <= self.config.max_block_bytes
            and len(set(block.records)) == len(block.records)
            and all(self._decoder(r) is None for r in block.records[:-1])
            and all(
                r in self._pending or (self._record_valid(r) and not self._record_committed(r))
                for r in block.records
            )
        )
        self._block_validity[block.hash] = valid
        return valid

    def _count(self, round_: int, vote_type: VoteType, block_hash: bytes | None) -> int:
        return len(self._tally.get((round_, vote_type), {}).get(block_hash, {}))

    def _total(self, round_: int, vote_type: VoteType) -> int:
        return len(self._votes.get((round_, vote_type), {}))

    def _run_rules(self) -> None:
        while self._apply_one_rule():
            pass

    def _apply_one_rule(self) -> bool:
        """Apply the first enabled rule of Algorithm 1; True if the state changed."""
        h, r, q = self._height, self._round, self._chain.validators.quorum
        # Lines 49-54: decide, in any round.
        for round_, proposed in self._proposals.items():
            for block_hash, candidate in proposed.items():
                if self._count(round_, VoteType.PRECOMMIT, block_hash) >= q and self._valid(
                    candidate.block
                ):
                    self._decide(candidate.block, self._certificate(round_, block_hash))
                    return True
        if self._step is Step.NEW_HEIGHT:
            if self._awaiting_records and (self._pending or self._others_started_round_0()):
                self._start_round(0)
                return True
            return self._skip_round_if_behind()
        proposals = self._proposals.get(r, {})
        proposal = next(iter(proposals.values()), None)
        if self._step is Step.PROPOSE and proposal is not None:
            block, vr = proposal.block, proposal.valid_round
            acceptable: bool | None = None
            if vr == -1:  # lines 22-27
                acceptable = self._valid(block) and (
                    self._locked_round == -1 or self._locked_hash() == block.hash
                )
            elif self._count(vr, VoteType.PREVOTE, block.hash) >= q:  # lines 28-33
                acceptable = self._valid(block) and (
                    self._locked_round <= vr or self._locked_hash() == block.hash
                )
            if acceptable is not None:
                self._sign_vote(VoteType.PREVOTE, block.hash if acceptable else None)
                self._step = Step.PREVOTE
                self._dirty = True
                return True
        if (
            self._step is Step.PREVOTE
            and r not in self._prevote_timeouts
            and self._total(r, VoteType.PREVOTE) >= q
        ):  # lines 34-35
            self._prevote_timeouts.add(r)
            self._schedule(
                Timeout(TimeoutKind.PREVOTE, h, r),
                self.config.timeouts.for_round(TimeoutKind.PREVOTE, r),
            )
        polka = next(
            (
                p.block
                for block_hash, p in proposals.items()
                if self._count(r, VoteType.PREVOTE, block_hash) >= q and self._valid(p.block)
            ),
            None,
        )
        if polka is not None and self._step >= Step.PREVOTE and r not in self._line36_rounds:
            self._line36_rounds.add(r)  # lines 36-43
            if self._step is Step.PREVOTE:
                self._locked_block, self._locked_round = polka, r
                self._sign_vote(VoteType.PRECOMMIT, polka.hash)
                self._step = Step.PRECOMMIT
            self._valid_block, self._valid_round = polka, r
            self._dirty = True
            return True
        if self._step is Step.PREVOTE and self._count(r, VoteType.PREVOTE, None) >= q:
            self._sign_vote(VoteType.PRECOMMIT, None)  # lines 44-46
            self._step = Step.PRECOMMIT
            self._dirty = True
            return True
        if r not in self._precommit_timeouts and self._total(r, VoteType.PRECOMMIT) >= q:
            self._precommit_timeouts.add(r)  # lines 47-48
            self._schedule(
                Timeout(TimeoutKind.PRECOMMIT, h, r),
                self.config.timeouts.for_round(TimeoutKind.PRECOMMIT, r),
            )
        return self._skip_round_if_behind()

    def _skip_round_if_behind(self) -> bool:
        """Lines 55-56: f+1 validators are in a later round, so join the latest such."""
        needed = self._chain.validators.skip_threshold
        later = [
            round_
            for round_, senders in self._round_senders.items()
            if round_ > self._round and len(senders) >= needed
        ]
        if not later:
            return False
        self._start_round(max(later))
        return True

    def _sync_if_decided_without_us(self) -> None:
        """A quorum precommitted a block whose proposal this node never got (it was lost, or
        its records could not be fetched): the others have decided that block, and no rule
        of Algorithm 1 can fire here without it. Fetch it with its commit certificate by
        block sync (paced like every sync request, a different precommitter each time)
        instead of idling until messages of the next height arrive."""
        quorum = self._chain.validators.quorum
        for (round_, vote_type), by_value in self._tally.items():
            if vote_type is not VoteType.PRECOMMIT:
                continue
            for block_hash, votes in by_value.items():
                if (
                    block_hash is None
                    or len(votes) < quorum
                    or block_hash in self._proposals.get(round_, {})
                ):
                    continue
                now = self._clock()
                if now - self._last_sync_request < self.config.timeouts.sync_interval:
                    return
                self._last_sync_request = now
                peers = sorted(key for key in votes if key != self._key)
                if peers:
                    peer = peers[self._missing_block_syncs % len(peers)]
                    self._missing_block_syncs += 1
                    self._actions.append(RequestSync(peer, self._height))
                return

    def _locked_hash(self) -> bytes | None:
        return None if self._locked_block is None else self._locked_block.hash

    def _certificate(self, round_: int, block_hash: bytes) -> CommitCertificate:
        votes = self._tally.get((round_, VoteType.PRECOMMIT), {}).get(block_hash, {})
        signatures = tuple(
            CommitSignature(vote.validator, vote.signature)
            for vote in sorted(votes.values(), key=lambda v: v.validator)
        )
        return CommitCertificate(self._height, round_, block_hash, signatures)

    def _decide(self, block: Block, certificate: CommitCertificate) -> None:
        if any(message.height == self._height for message in self._outbox):
            # A message of this height signed in this same step must be durable before it
            # leaves, and the state persisted at the end of the step is the next height's.
            self._actions.append(Persist(self.wal_state()))
        self._actions.append(Commit(block, certificate))
        in_force = self._chain.authorities_in_force
        self._chain = self._chain.after(block, self._decoder)
        for record in block.records:
            self._pending.pop(record, None)
        if self._chain.authorities_in_force != in_force:
            # Pending records were checked against the authorities then in force.
            self._pending = {r: None for r in self._pending if self._record_valid(r)}
        self._reset_height()
        self._dirty = True
        self._enter_height()

    def _on_timeout(self, timeout: Timeout) -> None:
        kind, h, r = timeout.kind, timeout.height, timeout.round
        if kind is TimeoutKind.RETRANSMIT:
            self._outbox.extend(self._own.values())
            self._outbox.extend(self._relayed_votes())
            self._schedule(Timeout(TimeoutKind.RETRANSMIT, self._height, self._round), None)
            return
        if h != self._height:
            return
        if kind is TimeoutKind.NEW_HEIGHT:
            if self._step is Step.NEW_HEIGHT and not self._awaiting_records:
                self._start_round_0_or_await_records()
            return
        if kind is TimeoutKind.EMPTY_BLOCK:
            if self._step is Step.NEW_HEIGHT and self._awaiting_records:
                self._start_round(0)
            return
        if r != self._round:
            return
        if kind is TimeoutKind.PROPOSE and self._step is Step.PROPOSE:  # lines 57-60
            self._sign_vote(VoteType.PREVOTE, None)
            self._step = Step.PREVOTE
            self._dirty = True
        elif kind is TimeoutKind.PREVOTE and self._step is Step.PREVOTE:  # lines 61-64
            self._sign_vote(VoteType.PRECOMMIT, None)
            self._step = Step.PRECOMMIT
            self._dirty = True
        elif kind is TimeoutKind.PRECOMMIT:  # lines 65-67
            self._start_round(r + 1)

    def _relayed_votes(self) -> list[Vote]:
        """Others' votes that moved this node on, relayed so that every honest node can
        follow even when the original senders can no longer resend them (their state was
        wiped, or they crashed for good): the prevotes that made validValue valid (needed
        to accept its re-proposal, line 28) and every first vote of the current and the
        previous round (the precommits that ended the previous round, line 47, and the
        messages that let lagging nodes skip rounds, line 55)."""
        relayed = {vote.signature: vote for vote in self._proof_of_lock()}
        for round_ in (self._round - 1, self._round):
            for vote_type in (VoteType.PREVOTE, VoteType.PRECOMMIT):
                for vote in self._votes.get((round_, vote_type), {}).values():
                    relayed[vote.signature] = vote
        return [vote for vote in relayed.values() if vote.validator != self._key]

    def _on_commit_received(self, block: Block, certificate: CommitCertificate) -> None:
        if block.height != self._height or not self._valid(block):
            return
        try:
            verify_commit_certificate(block, certificate, self._chain.validators, self._verify)
        except InvalidCommitCertificate:
            return
        self._decide(block, certificate)

    # Incoming messages -----------------------------------------------------------------

    def _on_message(self, message: ConsensusMessage, via: bytes | None) -> None:
        height, round_, _ = _slot(message)
        if round_ > self.config.max_round:
            return
        if isinstance(message, Vote) and (
            message.block_hash is not None and len(message.block_hash) != HASH_SIZE
        ):
            return
        sender = _sender(message)
        # Only a message straight from its signer shows where the signer is now; a relayed
        # one may be old. The state-loss guard relies on that.
        direct = via == sender
        if height > self._height:
            self._on_future_message(message, sender, height, via)
            return
        if height < self._height:
            return
        validators = self._chain.validators
        if sender not in validators:
            return
        if isinstance(message, Proposal) and (
            validators.proposer(height, round_) != sender or not -1 <= message.valid_round < round_
        ):
            return
        if sender == self._key:
            self._on_own_key_message(message)
            return
        first = self._first_in_slot(message)
        if first is None:
            if message.verify(self.config.chain_id, self._verify):
                self._store(message)
                if direct:
                    self._observe(sender, height)
            return
        if direct and first.signature == message.signature:
            self._observe(sender, height)
        if self._already_counted(message) or not self._conflicts(first, message):
            return
        if self._report_equivocation(first, message):
            self._store_extra_value(message)

    def _on_future_message(
        self, message: ConsensusMessage, sender: bytes, height: int, via: bytes | None
    ) -> None:
        known = sender in self._chain.validators or sender in self._chain.next_validators
        if not known:
            return
        if height == self._height + 1 and len(self._future) < self.config.max_future_messages:
            self._future.append((message, via))
        if (
            self._signing_floor is None
            and sender in (via, self._key)
            and message.verify(self.config.chain_id, self._verify)
        ):
            self._observe(sender, height)
        now = self._clock()
        if now - self._last_sync_request >= self.config.timeouts.sync_interval:
            self._last_sync_request = now
            # The node that handed us the message has reached its height; the signer of a
            # relayed message need not be reachable.
            self._actions.append(RequestSync(via or sender, self._height))

    def _on_own_key_message(self, message: ConsensusMessage) -> None:
        """A message signed with our key that this core did not produce: a twin, or this
        key's use before its state was lost."""
        mine = self._own.get(_slot(message))
        if mine is not None and mine.signature == message.signature:
            return
        if not message.verify(self.config.chain_id, self._verify):
            return
        if mine is not None and self._conflicts(mine, message):
            self._report_equivocation(mine, message)
        self._observe(self._key, message.height)

    def _first_in_slot(self, message: ConsensusMessage) -> ConsensusMessage | None:
        if isinstance(message, Proposal):
            return next(iter(self._proposals.get(message.round, {}).values()), None)
        return self._votes.get((message.round, message.type), {}).get(message.validator)

    def _already_counted(self, message: ConsensusMessage) -> bool:
        if isinstance(message, Proposal):
            return message.block.hash in self._proposals.get(message.round, {})
        by_value = self._tally.get((message.round, message.type), {})
        return message.validator in by_value.get(message.block_hash, {})

    def _store_extra_value(self, message: ConsensusMessage) -> None:
        """Keep an equivocator's second value where quorums for that value can use it.

        The paper counts "2f+1 <PREVOTE, h, r, id(v)>" over all messages received, so a
        Byzantine key that voted for two values counts towards both; counting only its first
        vote lets it show different honest nodes different first votes and stall them
        forever. Quorum intersection still holds: a quorum for v holds q distinct keys.
        Only `MAX_VALUES_PER_SLOT` values per key and slot are kept, bounding memory.
        """
        if isinstance(message, Proposal):
            proposals = self._proposals[message.round]
            if len(proposals) < MAX_VALUES_PER_SLOT:
                proposals[message.block.hash] = message
            return
        slot = (message.round, message.type, message.validator)
        if self._extra_values.get(slot, 1) >= MAX_VALUES_PER_SLOT:
            return
        self._extra_values[slot] = self._extra_values.get(slot, 1) + 1
        by_value = self._tally.setdefault((message.round, message.type), {})
        by_value.setdefault(message.block_hash, {})[message.validator] = message

    @staticmethod
    def _conflicts(first: ConsensusMessage, second: ConsensusMessage) -> bool:
        if isinstance(first, Proposal) and isinstance(second, Proposal):
            return (first.block.hash, first.valid_round) != (
                second.block.hash,
                second.valid_round,
            )
        if isinstance(first, Vote) and isinstance(second, Vote):
            return first.block_hash != second.block_hash
        return False

    def _report_equivocation(self, first: ConsensusMessage, second: ConsensusMessage) -> bool:
        if not second.verify(self.config.chain_id, self._verify):
            return False
        found = EquivocationFound(first, second)
        if len(self.evidence) < self.config.max_evidence:
            self.evidence.append(found)
        self._actions.append(found)
        return True

    def _store(self, message: ConsensusMessage) -> None:
        """Count a verified message; the caller checked it is the first in its slot."""
        if isinstance(message, Proposal):
            self._proposals.setdefault(message.round, {})[message.block.hash] = message
            self._round_senders.setdefault(message.round, set()).add(message.proposer)
            return
        key = (message.round, message.type)
        self._votes.setdefault(key, {})[message.validator] = message
        by_value = self._tally.setdefault(key, {})
        by_value.setdefault(message.block_hash, {})[message.validator] = message
        self._round_senders.setdefault(message.round, set()).add(message.validator)

    def _observe(self, sender: bytes, height: int) -> None:
        """Feed the state-loss guard; a no-op once the signing floor is known."""
        if self._signing_floor is not None:
            return
        if sender == self._key:
            self._own_seen_height = max(self._own_seen_height, height)
            return
        self._seen_heights[sender] = max(self._seen_heights.get(sender, 0), height)
        validators = self._chain.validators
        heard = [h for key, h in self._seen_heights.items() if key in validators]
        if len(heard) >= validators.quorum:
            # Some honest member of this quorum precommitted every height this key could
            # have voted on, minus one: so it never signed at max(heard) + 2 or above.
            self._signing_floor = max(max(heard) + 2, self._own_seen_height + 1)
            self._dirty = True
