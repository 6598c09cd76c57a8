"""A deterministic simulator that drives real consensus cores over a fake network.

One seed fixes everything: keys, which faults a schedule has, every delay, drop,
duplicate, partition, crash, restart and state wipe. The scheduler is a single priority
queue ordered by (simulated time, sequence number), so a seed replays exactly.

Faults during the chaotic phase: message drops, duplicates and reordering (random
delays), partitions that change over time, crashes with restart from the last persisted
write-ahead state (encoded and decoded with the real codec), restarts with a wiped state
(write-ahead state and ledger lost, the key kept), and Twins: two cores sharing one key,
which makes that key Byzantine (it equivocates whenever the twins see different things).
Some schedules commit a governance record that adds an authority, and some of those a later
one that removes a genesis authority (each in force at H + 2).

After every step the simulator checks, for honest nodes (every node except twins):
  agreement   no two honest nodes commit different blocks at one height;
  prefix      every honest chain is a prefix of the longest (commits are contiguous and
              extend the canonical chain);
  certificate every commit carries a certificate valid for that height's validator set;
  one vote    no honest key signs two different messages for one (height, round, type),
              across crashes, restarts and wipes, nor signs at a height whose validator
              set does not hold it;
  write-ahead every message a node signed was in a persisted write-ahead state before it
              was broadcast;
  checkpoints every node's checkpoint (Merkle tree of its committed records after each
              block) is consistent, by an RFC 9162 consistency proof, with each of its
              earlier checkpoints and with the canonical tree.
After the network heals (no drops, no partitions, every node restarted) the honest nodes
must commit at least `LIVENESS_BLOCKS` more blocks within `LIVENESS_TIME` simulated seconds.

Assumption used by the state-wipe guard and kept by the schedules: a wiped node stays down
longer than the longest message delay.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrsia_node.consensus import (
    Block,
    Broadcast,
    ChainState,
    Commit,
    CommitCertificate,
    CommitReceived,
    ConsensusConfig,
    ConsensusCore,
    ConsensusMessage,
    EquivocationFound,
    Event,
    Persist,
    Proposal,
    ProposalReceived,
    RecordSubmitted,
    RequestSync,
    ScheduleTimeout,
    Timeout,
    TimeoutFired,
    Timeouts,
    ValidatorSet,
    ValidatorSetChange,
    VoteReceived,
    WalState,
    verify_commit_certificate,
)
from pyrsia_node.consensus.messages import MessageKind
from pyrsia_node.identity import Identity, verify_signature
from pyrsia_node.merkle import MemoryTree, consistency_proof, leaf_hash, verify_consistency

CHAIN_ID = "pyrsia-sim"
LIVENESS_BLOCKS = 2
LIVENESS_TIME = 40.0
MAX_DELAY = 0.05
SYNC_BATCH = 8
REPLAY_HINT = "PYRSIA_SIM_SEED={seed} .venv/bin/pytest tests/test_consensus_sim.py -k replay -q"
TIMEOUTS = Timeouts(
    propose=0.3,
    prevote=0.2,
    precommit=0.2,
    delta=0.1,
    retransmit=0.25,
    sync_interval=0.25,
)

GOV_ADD = b"gov:add:"
GOV_REMOVE = b"gov:remove:"


def governance_change(record: bytes) -> ValidatorSetChange | None:
    """The simulator's governance encoding: ``gov:add:<key>`` or ``gov:remove:<key>``."""
    if record.startswith(GOV_ADD) and len(record) == len(GOV_ADD) + 32:
        return ValidatorSetChange(add=(record[len(GOV_ADD) :],))
    if record.startswith(GOV_REMOVE) and len(record) == len(GOV_REMOVE) + 32:
        return ValidatorSetChange(remove=(record[len(GOV_REMOVE) :],))
    return None


class SimulationFailure(AssertionError):
    """An invariant broke; the message carries the seed and how to replay it."""


class MemoVerifier:
    """Real Ed25519 verification, computed once per (key, signature, message).

    Every receiver verifies every message; the answer is the same for all of them, so the
    simulator pays for it once. Nothing about the answer is faked.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes, bytes], bool] = {}
        self.calls = 0

    def __call__(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        self.calls += 1
        key = (public_key, signature, message)
        known = self._cache.get(key)
        if known is None:
            known = verify_signature(public_key, signature, message)
            self._cache[key] = known
        return known


@dataclass(frozen=True)
class Schedule:
    """The fault plan a seed draws."""

    seed: int
    validators: int
    twins: bool
    extra_node: bool
    removal: bool
    chaos_time: float
    drop: float
    duplicate: float
    partitions: bool
    crashes: bool
    wipes: bool
    records: int
    empty_block: float
    commit_pause: float
    late_records: int

    @classmethod
    def from_seed(cls, seed: int) -> Schedule:
        rng = random.Random(f"schedule-{seed}")
        validators = rng.choice((4, 4, 4, 5, 7))
        twins = rng.random() < 0.35
        extra_node = rng.random() < 0.25
        wipes = not twins and rng.random() < 0.3
        return cls(
            seed=seed,
            validators=validators,
            twins=twins,
            extra_node=extra_node,
            removal=extra_node and not twins and not wipes and rng.random() < 0.5,
            chaos_time=rng.uniform(1.0, 4.0),
            drop=rng.choice((0.0, 0.05, 0.2, 0.4)),
            duplicate=rng.choice((0.0, 0.1, 0.3)),
            partitions=rng.random() < 0.6,
            crashes=rng.random() < 0.5,
            wipes=wipes,
            records=rng.randint(0, 12),
            empty_block=rng.choice((0.0, 0.5, 2.0, 5.0)),
            commit_pause=rng.choice((0.0, 0.0, 0.1)),
            late_records=rng.choice((0, 0, 1, 3)),
        )


@dataclass
class SimNode:
    index: int
    identity: Identity
    honest: bool
    core: ConsensusCore | None = None
    incarnation: int = 0
    wal: bytes | None = None
    ledger: list[tuple[Block, CommitCertificate]] = field(default_factory=list)
    tree: MemoryTree = field(default_factory=MemoryTree)
    checkpoints: list[tuple[int, bytes]] = field(default_factory=list)
    wiped: bool = False
    persisted: set[bytes] = field(default_factory=set)

    @property
    def key(self) -> bytes:
        return self.identity.public_key


class Simulation:
    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.rng = random.Random(schedule.seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.trace: deque[str] = deque(maxlen=40)
        self.verifier = MemoVerifier()
        self.steps = 0

        identities = [self._identity(i) for i in range(schedule.validators + 1)]
        genesis_keys = identities[: schedule.validators]
        self.genesis = ValidatorSet(tuple(i.public_key for i in genesis_keys))
        self.extra_key = identities[-1].public_key
        self.nodes = [SimNode(i, ident, honest=True) for i, ident in enumerate(genesis_keys)]
        if schedule.extra_node:
            self.nodes.append(SimNode(len(self.nodes), identities[-1], honest=True))
        if schedule.twins:
            twin_of = self.nodes[schedule.validators - 1]
            twin_of.honest = False
            self.nodes.append(SimNode(len(self.nodes), twin_of.identity, honest=False))
        self.groups = [0] * len(self.nodes)
        self.drop = schedule.drop
        self.duplicate = schedule.duplicate
        self.healed = False

        # Canonical chain as the honest nodes agree on it.
        self.canonical: list[Block] = []
        self.canonical_chain = ChainState.genesis(self.genesis)
        self.canonical_states: list[ChainState] = [self.canonical_chain]
        self.canonical_tree = MemoryTree()
        self.canonical_sizes: list[int] = []
        self.commit_times: list[float] = []  # when each canonical block was first committed
        self.signed: dict[tuple[bytes, int, int, MessageKind], bytes] = {}
        self.equivocations = 0
        self.restarts = 0
        self.wiped_restarts = 0

    # Setup ------------------------------------------------------------------------------

    def _identity(self, index: int) -> Identity:
        seed = hashlib.sha256(f"key-{self.schedule.seed}-{index}".encode()).digest()
        return Identity(Ed25519PrivateKey.from_private_bytes(seed))

    def _make_core(
        self, node: SimNode, restored: WalState | None, state_lost: bool
    ) -> ConsensusCore:
        chain = ChainState.genesis(self.genesis)
        for block, _ in node.ledger:
            chain = chain.after(block, governance_change)
        return ConsensusCore(
            ConsensusConfig(
                CHAIN_ID,
                timeouts=replace(
                    TIMEOUTS,
                    empty_block=self.schedule.empty_block,
                    commit=self.schedule.commit_pause,
                ),
                max_block_records=4,
            ),
            node.identity,
            chain,
            clock=lambda: self.now,
            verify=self.verifier,
            validator_set_change=governance_change,
            restored=restored,
            state_lost=state_lost,
        )

    def _boot(self, node: SimNode, restored: WalState | None, state_lost: bool) -> None:
        node.incarnation += 1
        node.core = self._make_core(node, restored, state_lost)
        self._apply(node, node.core.start())

    # Scheduler --------------------------------------------------------------------------

    def _push(self, at: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def fail(self, reason: str) -> None:
        lines = "\n  ".join(self.trace)
        raise SimulationFailure(
            f"seed={self.schedule.seed} t={self.now:.3f} step={self.steps}: {reason}\n"
            f"schedule: {self.schedule}\n"
            f"replay: {REPLAY_HINT.format(seed=self.schedule.seed)}\n"
            f"last events:\n  {lines}"
        )

    def run(self) -> None:
        s = self.schedule
        for node in self.nodes:
            self._boot(node, None, False)
        t = 0.0
        while s.partitions and t < s.chaos_time:
            t += self.rng.uniform(0.2, 1.5)
            self._push(t, "partition", None)
        for _ in range(s.records):
            self._push(self.rng.uniform(0, s.chaos_time), "record", None)
        if s.extra_node:
            self._push(self.rng.uniform(0, s.chaos_time), "governance", None)
        if s.removal:
            self._push(self.rng.uniform(0, s.chaos_time), "removal", None)
        if s.crashes or s.wipes:
            t = 0.0
            while t < s.chaos_time:
                t += self.rng.uniform(0.3, 2.0)
                self._push(t, "crash", None)
        self._push(s.chaos_time, "heal", None)
        for _ in range(s.late_records):
            self._push(s.chaos_time + self.rng.uniform(0, 2 * s.empty_block + 1), "record", None)
        deadline = s.chaos_time + LIVENESS_TIME
        target: int | None = None
        while self._queue:
            at, _, kind, payload = heapq.heappop(self._queue)
            if at > deadline:
                break
            self.now = at
            self.steps += 1
            self._dispatch(kind, payload)
            if self.healed:
                if target is None:
                    target = self._honest_max_height() + LIVENESS_BLOCKS
                if all(len(n.ledger) >= target for n in self._honest()):
                    return
        heights = {n.index: len(n.ledger) for n in self.nodes}
        self.fail(f"no liveness after healing: target height {target}, heights {heights}")

    def _honest(self) -> list[SimNode]:
        return [n for n in self.nodes if n.honest]

    def _honest_max_height(self) -> int:
        return max(len(n.ledger) for n in self._honest())

    def _dispatch(self, kind: str, payload: Any) -> None:
        if kind == "deliver":
            index, incarnation, event = payload
            node = self.nodes[index]
            if node.core is None or incarnation not in (node.incarnation, -1):
                return
            self.trace.append(f"{self.now:.3f} n{index} <- {_describe(event)}")
            self._apply(node, node.core.handle(event))
        elif kind == "partition":
            self._repartition()
        elif kind == "record":
            record = f"record-{self.schedule.seed}-{self.steps}".encode()
            self._submit(record)
        elif kind == "governance":
            self._submit(GOV_ADD + self.extra_key)
        elif kind == "removal":
            # Only once the addition is in force, so the set never drops below four.
            if self.extra_key not in self.canonical_chain.validators:
                self._push(self.now + 0.5, "removal", None)
                return
            self._submit(GOV_REMOVE + self.genesis.validators[0])
        elif kind == "crash":
            self._crash()
        elif kind == "restart":
            self._restart(self.nodes[payload])
        elif kind == "heal":
            self._heal()

    def _submit(self, record: bytes) -> None:
        self.trace.append(f"{self.now:.3f} submit {record[:24]!r}")
        for node in self.nodes:
            if self.rng.random() < 0.7 or self.healed:
                self._deliver_later(node, RecordSubmitted(record), incarnation=-1)

    def _repartition(self) -> None:
        if self.healed:
            return
        choice = self.rng.random()
        if choice < 0.3:
            self.groups = [0] * len(self.nodes)
        elif choice < 0.6:
            isolated = self.rng.randrange(len(self.nodes))
            self.groups = [1 if i == isolated else 0 for i in range(len(self.nodes))]
        else:
            self.groups = [self.rng.randrange(2) for _ in self.nodes]
        self.trace.append(f"{self.now:.3f} partition {self.groups}")

    def _crash(self) -> None:
        if self.healed:
            return
        node = self.rng.choice(self.nodes)
        if node.core is None:
            return
        node.core = None
        node.incarnation += 1
        # A wiped validator abstains until it passes its signing floor; wiping a second
        # one meanwhile would exceed the f faults liveness tolerates.
        wipe = (
            self.schedule.wipes
            and node.honest
            and self.rng.random() < 0.5
            and not any(self._guarded(other) for other in self.nodes)
        )
        if wipe:
            node.wal = None
            node.ledger = []
            node.tree = MemoryTree()
            node.checkpoints = []
            node.wiped = True
        self.trace.append(f"{self.now:.3f} crash n{node.index} wipe={wipe}")
        self._push(self.now + MAX_DELAY + self.rng.uniform(0.1, 1.5), "restart", node.index)

    def _guarded(self, node: SimNode) -> bool:
        if node.wiped:
            return True
        if node.core is not None:
            floor, height = node.core.signing_floor, node.core.height
        elif node.wal is not None:
            floor, height = WalState.decode(node.wal).signing_floor, len(node.ledger) + 1
        else:
            return True
        return floor is None or height < floor

    def _restart(self, node: SimNode) -> None:
        if node.core is not None:
            return
        restored = WalState.decode(node.wal) if node.wal is not None else None
        state_lost = node.wiped
        node.wiped = False
        self.trace.append(f"{self.now:.3f} restart n{node.index} lost={state_lost}")
        self.restarts += 1
        self.wiped_restarts += state_lost
        self._boot(node, restored, state_lost=state_lost and restored is None)

    def _heal(self) -> None:
        self.healed = True
        self.drop = 0.0
        self.groups = [0] * len(self.nodes)
        self.trace.append(f"{self.now:.3f} heal")
        for node in self.nodes:
            if node.core is None:
                self._push(self.now + MAX_DELAY + 0.01, "restart", node.index)

    # Network ----------------------------------------------------------------------------

    def _deliver_later(self, node: SimNode, event: Event, incarnation: int | None = None) -> None:
        delay = self.rng.uniform(0.001, MAX_DELAY)
        inc = node.incarnation if incarnation is None else incarnation
        self._push(self.now + delay, "deliver", (node.index, inc, event))

    def _send(self, src: SimNode, dst: SimNode, event: Event) -> None:
        if self.groups[src.index] != self.groups[dst.index]:
            return
        if self.rng.random() < self.drop:
            return
        self._deliver_later(dst, event)
        if self.rng.random() < self.duplicate:
            self._deliver_later(dst, event)

    def _apply(self, node: SimNode, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Persist):
                node.wal = action.state.encode()
                node.persisted.update(m.signature for m in action.state.own_messages)
            elif isinstance(action, Broadcast):
                self._check_signed_once(node, action.message)
                self._check_persisted(node, action.message)
                event: Event = (
                    ProposalReceived(action.message, node.key)
                    if isinstance(action.message, Proposal)
                    else VoteReceived(action.message, node.key)
                )
                for other in self.nodes:
                    if other is not node:
                        self._send(node, other, event)
            elif isinstance(action, ScheduleTimeout):
                self._push(
                    self.now + action.delay,
                    "deliver",
                    (node.index, node.incarnation, TimeoutFired(action.timeout)),
                )
            elif isinstance(action, Commit):
                self._on_commit(node, action.block, action.certificate)
            elif isinstance(action, RequestSync):
                self._serve_sync(node, action)
            elif isinstance(action, EquivocationFound):
                self.equivocations += 1

    def _serve_sync(self, node: SimNode, request: RequestSync) -> None:
        for peer in self.nodes:
            if peer.key != request.peer or peer is node or peer.core is None:
                continue
            start = request.from_height - 1
            for block, cert in peer.ledger[start : start + SYNC_BATCH]:
                self._send(peer, node, CommitReceived(block, cert))
            return

    # Invariants -------------------------------------------------------------------------

    def _check_signed_once(self, node: SimNode, message: ConsensusMessage) -> None:
        sender = message.proposer if isinstance(message, Proposal) else message.validator
        if not node.honest or sender != node.key:
            return  # a Byzantine key, or another validator's vote this node relays
        kind = MessageKind.PROPOSAL if isinstance(message, Proposal) else MessageKind(message.type)
        states = self.canonical_states
        if message.height <= len(states) and sender not in states[message.height - 1].validators:
            self.fail(f"n{node.index} signed at height {message.height} as a non-validator")
        slot = (sender, message.height, message.round, kind)
        signed = message.signing_bytes(CHAIN_ID)
        first = self.signed.setdefault(slot, signed)
        if first != signed:
            self.fail(
                f"honest n{node.index} signed twice for height {message.height} round "
                f"{message.round} {kind.name}"
            )

    def _check_persisted(self, node: SimNode, message: ConsensusMessage) -> None:
        sender = message.proposer if isinstance(message, Proposal) else message.validator
        if sender == node.key and message.signature not in node.persisted:
            self.fail(
                f"n{node.index} broadcast its {type(message).__name__} for height "
                f"{message.height} round {message.round} before persisting it"
            )

    def _on_commit(self, node: SimNode, block: Block, cert: CommitCertificate) -> None:
        self.trace.append(f"{self.now:.3f} n{node.index} COMMIT h{block.height}")
        if not node.honest:
            node.ledger.append((block, cert))
            return
        height = block.height
        if height != len(node.ledger) + 1:
            self.fail(f"n{node.index} committed height {height} after {len(node.ledger)}")
        if height <= len(self.canonical):
            if self.canonical[height - 1].hash != block.hash:
                self.fail(f"disagreement at height {height}: n{node.index} committed another")
        else:
            state = self.canonical_states[-1]
            self.canonical.append(block)
            self.canonical_chain = state.after(block, governance_change)
            self.canonical_states.append(self.canonical_chain)
            for record in block.records:
                self.canonical_tree.append(leaf_hash(record))
            self.canonical_sizes.append(self.canonical_tree.size)
            self.commit_times.append(self.now)
        validators = self.canonical_states[height - 1].validators
        try:
            verify_commit_certificate(block, cert, validators, self.verifier)
        except Exception as exc:
            self.fail(f"n{node.index} committed height {height} with a bad certificate: {exc}")
        node.ledger.append((block, cert))
        self._check_checkpoints(node, block)

    def _check_checkpoints(self, node: SimNode, block: Block) -> None:
        for record in block.records:
            node.tree.append(leaf_hash(record))
        size, root = node.tree.size, node.tree.root()
        for old_size, old_root in node.checkpoints:
            proof = consistency_proof(node.tree, old_size, size)
            try:
                verify_consistency(old_size, size, proof, old_root, root)
            except ValueError as exc:
                self.fail(f"n{node.index} checkpoint {size} inconsistent with {old_size}: {exc}")
        canonical_size = self.canonical_sizes[block.height - 1]
        canonical_root = self.canonical_tree.root(canonical_size)
        latest = self.canonical_tree.size
        try:
            verify_consistency(
                size,
                latest,
                consistency_proof(self.canonical_tree, size, latest),
                root,
                self.canonical_tree.root(),
            )
        except ValueError as exc:
            self.fail(f"n{node.index} checkpoint {size} not a prefix of the canonical log: {exc}")
        if (size, root) != (canonical_size, canonical_root):
            self.fail(f"n{node.index} checkpoint at height {block.height} differs")
        node.checkpoints.append((size, root))


def _describe(event: Event) -> str:
    if isinstance(event, VoteReceived):
        v = event.vote
        target = v.block_hash.hex()[:6] if v.block_hash else "nil"
        return f"{v.type.name} h{v.height} r{v.round} {target} from {v.validator.hex()[:6]}"
    if isinstance(event, ProposalReceived):
        p = event.proposal
        return f"PROPOSAL h{p.height} r{p.round} vr{p.valid_round} {p.block.hash.hex()[:6]}"
    if isinstance(event, TimeoutFired):
        t: Timeout = event.timeout
        return f"timeout {t.kind.name} h{t.height} r{t.round}"
    if isinstance(event, CommitReceived):
        return f"sync block h{event.block.height}"
    return f"record {event.record[:24]!r}"


def run_seed(seed: int) -> Simulation:
    """Run one seeded schedule; raises `SimulationFailure` with replay instructions."""
    simulation = Simulation(Schedule.from_seed(seed))
    simulation.run()
    return simulation
