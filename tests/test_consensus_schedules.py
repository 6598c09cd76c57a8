"""Further fault schedules on real node processes, beyond tests/test_consensus_faults.py.

Each test runs a `FaultNetwork` (4 authorities and 1 peer on loopback, consensus traffic
through the test's `FaultProxy`) with records submitted all along, injects one kind of
fault and then checks what must hold whatever the schedule:

* one chain: every node holds the same block at every height, and every block's commit
  certificate holds a quorum of valid precommits;
* no equivocation: no node ever logged two conflicting messages signed by one key;
* no node's consensus loop died (a failed write-ahead or commit stops it loudly);
* one state: once records stop, every node has the same (height, log size, root) and every
  authority the same checkpoint of its whole log, cosigned by a quorum;
* commits resume within 10 s of the last fault ending;
* after every kill -9, the dead node's files are opened as its next start would open them:
  the write-ahead state loads and is not behind the block store, the block store is a
  prefix of the network's chain, the transparency log passes `verify_integrity` and holds
  exactly the records of the stored blocks (or of all but the last, which the node's start
  re-appends).

Bugs these schedules found, each test failing without its fix:

* a write-ahead frame torn by a kill mid-append was skipped on load, but the restarted
  node appended its next states after the torn bytes, so the load after its next crash
  stopped there and returned a state older than votes it had signed since (risk of
  equivocation; `WriteAheadFile.load` now cuts the torn tail):
  `test_states_written_after_a_torn_write_ahead_frame_are_loaded_after_the_next_kill`;
* an authority restarted with its consensus directory (write-ahead state and blocks) wiped
  but its ledger kept never caught up: every synced block was refused because its records
  were "already in the log", so it stayed at height 0 for good (consensus now counts only
  log entries within the stored blocks as committed and re-uses the held ones as blocks
  come back): `test_an_authority_restarted_with_its_state_wiped_...[consensus-dir]` and
  `test_a_log_that_is_not_the_chains_stops_consensus_instead_of_growing`.

CI runs the short schedules (about 75 s on 2 cores): random kill -9/SIGTERM of one
authority at a time, the peer's source authority SIGSTOPped past a round's timeouts, a
wiped consensus directory, a torn write-ahead frame, isolating the current proposer, a log
of another chain. Randomised schedules print their seed (``fault schedule seed N``); rerun one with
``PYRSIA_FAULT_SEED=N``. Long variants (about 17 min: 40-step kill schedules with quorum
losses, every authority killed at once, kills under heavy load, wipes of all data but the
keys or of the write-ahead file alone, rolling 1|3 partitions, random one-way link cuts,
two authorities paused, a peer killed while syncing) run only with
``PYRSIA_LONG_FAULTS=1``:

    PYRSIA_LONG_FAULTS=1 .venv/bin/pytest tests/test_consensus_schedules.py -q

Set these two variables for this module only: nodes refuse unknown ``PYRSIA_*`` settings,
so the fixture removes them before it starts nodes, but other modules' nodes would stop.

Every test is bounded in time (pytest-timeout) and the fixture stops every process it
started, by pid; a paused (SIGSTOPped) node is continued before that.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia.v1 import consensus_pb2_grpc as pb_grpc
from pyrsia_node import tls
from pyrsia_node.consensus import ValidatorSet, WriteAheadFile, verify_commit_certificate
from pyrsia_node.consensus.blocks import BlockStore
from pyrsia_node.consensus.messages import Block, CommitCertificate
from pyrsia_node.consensus.service import initialize_state
from pyrsia_node.consensus.wire import committed_from_pb
from pyrsia_node.genesis import Genesis
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.log import LogError
from pyrsia_node.localnet import fetch_json
from test_consensus_faults import (
    AUTHORITIES,
    FaultNetwork,
    RecordFeeder,
    assert_cosigned_checkpoint,
    settle_to_one_state,
    wait_until,
)
from test_consensus_service import make_genesis, start, stop, wait_for
from test_consensus_service import make_node as service_node
from test_consensus_service import record as service_record

LONG = os.environ.get("PYRSIA_LONG_FAULTS") == "1"
SEED = os.environ.get("PYRSIA_FAULT_SEED")
long_only = pytest.mark.skipif(not LONG, reason="long fault schedule: set PYRSIA_LONG_FAULTS=1")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900 if LONG else 240)]

EVERYONE = (*AUTHORITIES, "peer-0")
RESUME_SECONDS = 10.0
PAUSE_SECONDS = 6.0  # longer than a round's three timeouts (1 s each, 0.5 s more per round)
SYNC_GAP = 150  # blocks a peer misses before it is restarted and killed while syncing


def schedule_seed() -> int:
    seed = int(SEED or random.SystemRandom().randrange(1 << 32))
    print(f"fault schedule seed {seed} (replay: PYRSIA_FAULT_SEED={seed})")
    return seed


@pytest.fixture
def network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultNetwork]:
    # Nodes refuse unknown PYRSIA_* variables: the test knobs must not reach them.
    monkeypatch.delenv("PYRSIA_LONG_FAULTS", raising=False)
    monkeypatch.delenv("PYRSIA_FAULT_SEED", raising=False)
    running = FaultNetwork(tmp_path / "net")
    try:
        running.start()
        yield running
    finally:
        for process in running.net.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
        running.stop()


# Reading the network -------------------------------------------------------------------


def chain(network: FaultNetwork, name: str, up_to: int) -> list[tuple[Block, CommitCertificate]]:
    """Blocks 1..up_to with their certificates from `name`, paging through GetBlocks."""
    options = [("grpc.ssl_target_name_override", tls.TARGET_NAME)]
    address = network.net.node(name).grpc_address
    found: list[tuple[Block, CommitCertificate]] = []
    with grpc.secure_channel(address, network._credentials, options=options) as channel:
        stub = pb_grpc.ConsensusStub(channel)
        while len(found) < up_to:
            request = pb.GetBlocksRequest(
                from_height=len(found) + 1, limit=up_to - len(found), follow=False
            )
            page = [committed_from_pb(item) for item in stub.GetBlocks(request, timeout=20)]
            if not page:
                break
            found += page
    return found[:up_to]


def assert_one_certified_chain(network: FaultNetwork, names: tuple[str, ...]) -> None:
    """Same blocks on every node up to the lowest height, each with a valid certificate."""
    common = min(network.height(name) for name in names)
    assert common >= 1
    reference = chain(network, names[0], common)
    assert len(reference) == common
    genesis = Genesis.load(network.net.root / "genesis.json")
    validators = ValidatorSet.from_genesis(genesis)  # no governance records in these tests
    for block, cert in reference:
        verify_commit_certificate(block, cert, validators)
    hashes = [block.hash for block, _ in reference]
    for name in names[1:]:
        theirs = [block.hash for block, _ in chain(network, name, common)]
        assert theirs == hashes, f"{name} diverges from {names[0]} below height {common}"


def assert_no_equivocation_or_dead_loop(network: FaultNetwork) -> None:
    for node in network.net.nodes:
        text = (node.data_dir / "node.log").read_text(errors="replace")
        assert "equivocation by" not in text, f"{node.name} saw an equivocation"
        assert "consensus stopped" not in text, f"{node.name}'s consensus loop died"


def assert_healthy_end(network: FaultNetwork) -> None:
    settle_to_one_state(network, EVERYONE, 40)
    assert_one_certified_chain(network, EVERYONE)
    assert_cosigned_checkpoint(network)
    assert_no_equivocation_or_dead_loop(network)


def wait_commits_resume(network: FaultNetwork, names: tuple[str, ...], blocks: int = 1) -> float:
    """Wait until every node in `names` has committed `blocks` more blocks."""
    before = network.heights(names)
    took = wait_until(
        lambda: all(network.height(n) >= before[n] + blocks for n in names),
        RESUME_SECONDS,
        lambda: f"heights {network.heights(names)} from {before}",
    )
    print(f"commits resumed on {', '.join(names)} within {took:.1f} s")
    return took


def wait_serving(network: FaultNetwork, name: str) -> None:
    """Until `name` answers with its consensus started (before, its height reads 0)."""
    wait_until(
        lambda: consensus_status(network, name) is not None, 30, lambda: f"{name} not serving"
    )


# A killed node's files -----------------------------------------------------------------


def check_files_of_dead_node(network: FaultNetwork, name: str, live: set[str]) -> int:
    """Open `name`'s stores as its next start will and check them; its stored height."""
    data = network.net.node(name).data_dir
    state = WriteAheadFile(data / "consensus" / "wal").load()
    blocks = BlockStore(data / "consensus" / "blocks")
    stored = [blocks.get(h) for h in range(1, blocks.height + 1)]
    if state is not None:  # None: never wrote one (a wiped node not yet started)
        assert state.height >= blocks.height, (
            f"{name}'s write-ahead state (height {state.height}) is behind its block store "
            f"(height {blocks.height}): votes it signed since may be forgotten"
        )
    with TransparencyLog(data / "ledger") as ledger:
        ledger.verify_integrity()
        counts = list(itertools.accumulate(len(block.records) for block, _ in stored))
        all_blocks, all_but_last = (counts[-1:] or [0])[0], (counts[-2:-1] or [0])[0]
        assert ledger.size in (all_blocks, all_but_last), (
            f"{name}'s log holds {ledger.size} records; its blocks {all_blocks}"
        )
        records = [r for block, _ in stored for r in block.records][: ledger.size]
        assert [ledger.entry(i) for i in range(ledger.size)] == records
    sources = sorted(live - {name})
    if stored and sources:  # the end checks compare every node's whole chain anyway
        source = max(sources, key=network.height)
        common = min(len(stored), max(network.height(source), 0))  # -1: it does not answer
        reference = [block.hash for block, _ in chain(network, source, common)]
        assert [block.hash for block, _ in stored[:common]] == reference, (
            f"{name} stored another chain than {source}"
        )
    return blocks.height


# Load ----------------------------------------------------------------------------------


class BulkFeeder:
    """Submits batches of `batch` records to random live authorities as fast as they take
    them (one channel per authority, reopened after a failure), in a thread."""

    def __init__(self, network: FaultNetwork, batch: int = 200, seed: int = 7) -> None:
        self._network = network
        self._batch = batch
        self._rng = random.Random(seed)
        self.live = set(AUTHORITIES)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._channels: dict[str, grpc.Channel] = {}

    def _stub(self, name: str) -> pb_grpc.ConsensusStub:
        if name not in self._channels:
            options = [("grpc.ssl_target_name_override", tls.TARGET_NAME)]
            address = self._network.net.node(name).grpc_address
            self._channels[name] = grpc.secure_channel(
                address, self._network._credentials, options=options
            )
        return pb_grpc.ConsensusStub(self._channels[name])

    def _run(self) -> None:
        while not self._stop.is_set():
            live = sorted(self.live)
            if not live:
                time.sleep(0.05)
                continue
            name = self._rng.choice(live)
            records = [self._network.record() for _ in range(self._batch)]
            try:
                response = self._stub(name).SubmitRecords(
                    pb.SubmitRecordsRequest(records=records), timeout=5
                )
                self.accepted += sum(r.accepted for r in response.results)
            except grpc.RpcError:
                channel = self._channels.pop(name, None)
                if channel is not None:
                    channel.close()
                time.sleep(0.05)

    def __enter__(self) -> BulkFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        for channel in self._channels.values():
            channel.close()


# Schedules -----------------------------------------------------------------------------


def run_kill_schedule(network: FaultNetwork, seed: int, steps: int, max_down: int) -> None:
    """Kill -9 (one time in four: SIGTERM, a graceful stop) and restart authorities at
    random moments, at most `max_down` down at once, under light load; check each dead
    node's files, then the end state."""
    rng = random.Random(seed)
    down: list[str] = []
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        for _ in range(steps):
            time.sleep(rng.uniform(0.1, 2.5))
            if down and (len(down) >= max_down or rng.random() < 0.5):
                name = down.pop(rng.randrange(len(down)))
                print(f"{time.monotonic():.1f} restart {name}")
                network.net.start(name)
                feeder.live.add(name)
                continue
            name = rng.choice(sorted(set(AUTHORITIES) - set(down)))
            sig = signal.SIGTERM if rng.random() < 0.25 else signal.SIGKILL
            print(f"{time.monotonic():.1f} {sig.name} {name} at height {network.height(name)}")
            network.net.kill(name, sig)
            feeder.live.discard(name)
            down.append(name)
            check_files_of_dead_node(network, name, feeder.live)
        for name in down:
            print(f"{time.monotonic():.1f} restart {name}")
            network.net.start(name)
            feeder.live.add(name)
        for name in down:
            wait_serving(network, name)
        wait_commits_resume(network, AUTHORITIES)
    assert feeder.accepted > 20
    assert_healthy_end(network)


def test_authorities_killed_at_random_moments_keep_one_chain(network: FaultNetwork) -> None:
    run_kill_schedule(network, schedule_seed(), steps=6, max_down=1)


@long_only
@pytest.mark.parametrize("repeat", range(3))
def test_long_random_kill_schedules_with_quorum_losses(network: FaultNetwork, repeat: int) -> None:
    run_kill_schedule(network, schedule_seed(), steps=40, max_down=2)


@long_only
def test_every_authority_killed_at_once_resumes_from_its_files(network: FaultNetwork) -> None:
    """kill -9 of the whole authority set within a few milliseconds, under load: each
    restarts from its own write-ahead state and stores, and the network goes on as one."""
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 3, 30, lambda: str(network.heights()))
        for name in AUTHORITIES:
            network.net.kill(name)
        feeder.live.clear()
        for name in AUTHORITIES:
            check_files_of_dead_node(network, name, {"peer-0"})
        for name in AUTHORITIES:
            network.net.start(name)
        for name in AUTHORITIES:
            wait_serving(network, name)
        feeder.live.update(AUTHORITIES)
        wait_commits_resume(network, AUTHORITIES, blocks=3)
    assert_healthy_end(network)


# A paused node -------------------------------------------------------------------------


def followed_authority(network: FaultNetwork, peer: str) -> str:
    """The authority whose block stream `peer` is reading (its status names it)."""

    def source() -> str | None:
        status = consensus_status(network, peer)
        return None if status is None else status.get("source")

    wait_until(lambda: source() in AUTHORITIES, 10, lambda: f"{peer} follows {source()}")
    name = source()
    assert name is not None
    return name


def test_a_paused_authority_rejoins_and_peers_keep_following(network: FaultNetwork) -> None:
    """SIGSTOP for longer than a round's timeouts, then SIGCONT, of the authority the peer
    follows: the others and the peer go on without it meanwhile; afterwards its stale
    messages harm nothing, it catches up and commits resume."""
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        victim = followed_authority(network, "peer-0")
        others = tuple(name for name in AUTHORITIES if name != victim)
        pid = network.net.processes[victim].pid
        os.kill(pid, signal.SIGSTOP)
        feeder.live.discard(victim)
        paused = time.monotonic()
        print(f"paused {victim}")
        before = network.heights((*others, "peer-0"))
        wait_until(
            lambda: all(network.height(n) >= before[n] + 3 for n in others),
            15,
            lambda: f"heights {network.heights(others)} from {before}",
        )
        target = max(network.heights(others).values())
        wait_until(
            lambda: network.height("peer-0") >= target,
            15,  # the peer's probes find the lag, then it follows another (see `following`)
            lambda: f"peer-0 at {network.height('peer-0')}, authorities at {target}",
        )
        time.sleep(max(0.0, PAUSE_SECONDS - (time.monotonic() - paused)))
        os.kill(pid, signal.SIGCONT)
        feeder.live.add(victim)
        print(f"continued {victim} after {time.monotonic() - paused:.1f} s")
        target = max(network.heights(others).values())
        wait_until(
            lambda: network.height(victim) >= target,
            RESUME_SECONDS,
            lambda: f"{victim} at {network.height(victim)}, others at {target}",
        )
        wait_commits_resume(network, AUTHORITIES)
    assert_healthy_end(network)


@long_only
def test_long_two_paused_authorities_stop_commits_until_continued(network: FaultNetwork) -> None:
    """Two of four paused: no quorum, so nothing commits and nothing diverges; once both
    continue, commits resume within 10 s."""
    paused = ("authority-1", "authority-2")
    awake = tuple(name for name in AUTHORITIES if name not in paused)
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        for name in paused:
            os.kill(network.net.processes[name].pid, signal.SIGSTOP)
            feeder.live.discard(name)
        time.sleep(2.0)  # a block whose precommits were already out may still commit
        stalled = network.heights(awake)
        time.sleep(2 * PAUSE_SECONDS)
        assert network.heights(awake) == stalled, "committed without a quorum"
        for name in paused:
            os.kill(network.net.processes[name].pid, signal.SIGCONT)
            feeder.live.add(name)
        wait_commits_resume(network, AUTHORITIES, blocks=2)
    assert_healthy_end(network)


# A node whose state was wiped ----------------------------------------------------------


def consensus_status(network: FaultNetwork, name: str) -> dict[str, Any] | None:
    try:
        status = fetch_status(network, name)
    except (OSError, ValueError):
        return None
    consensus: dict[str, Any] | None = status.get("consensus")
    return consensus


def fetch_status(network: FaultNetwork, name: str) -> dict[str, Any]:
    status: dict[str, Any] = fetch_json(
        f"{network.net.node(name).http_url}/api/v1/status", timeout=2
    )
    return status


WIPES = [
    pytest.param(("consensus",), id="consensus-dir"),
    pytest.param(("consensus", "ledger", "blobs"), id="all-but-keys", marks=long_only),
    pytest.param(("consensus/wal",), id="write-ahead-file", marks=long_only),
]


@pytest.mark.parametrize("wiped", WIPES)
def test_an_authority_restarted_with_its_state_wiped_signs_only_after_catching_up(
    network: FaultNetwork, wiped: tuple[str, ...]
) -> None:
    """Same key, its consensus directory (write-ahead state and blocks) wiped, or all its
    data but the keys: the node must not sign at any height it may have signed at before,
    must catch up by block sync (its log, when kept, holding records its block store lost),
    and must then vote again (shown by commits that need its vote)."""
    victim, spare = "authority-2", "authority-3"
    others = tuple(name for name in AUTHORITIES if name != victim)
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 3, 30, lambda: str(network.heights()))
        network.net.kill(victim)
        feeder.live.discard(victim)
        # It may have signed at most at the height after the highest committed one.
        may_have_signed = max(network.heights(others).values()) + 1
        data = network.net.node(victim).data_dir
        for path in wiped:
            if (data / path).is_dir():
                shutil.rmtree(data / path)
            else:
                (data / path).unlink()
        network.net.start(victim)
        floors: list[int | None] = []

        def caught_up_and_signing() -> bool:
            status = consensus_status(network, victim)
            if status is None:
                return False
            floor = status["signing_floor"]
            floors.append(floor)
            return (
                floor is not None
                and status["height"] + 1 >= floor
                and status["height"] >= max(network.heights(others).values()) - 1
            )

        wait_until(caught_up_and_signing, 30, lambda: str(consensus_status(network, victim)))
        feeder.live.add(victim)
        print(f"{victim} signing floors seen: {sorted(set(map(str, floors)))}")
        log = (data / "node.log").read_text(errors="replace")
        assert "this key will not sign until" in log, "it must start without a signing floor"
        assert all(f is None or f > may_have_signed for f in floors), (
            f"signing floor {floors} is not above height {may_have_signed}"
        )
        network.net.kill(spare)  # from now on every quorum needs the wiped node's votes
        feeder.live.discard(spare)
        # A block whose precommits were out before the kill may still commit: ask for more.
        wait_commits_resume(network, tuple(n for n in AUTHORITIES if n != spare), blocks=3)
        network.net.start(spare)
        feeder.live.add(spare)
        wait_serving(network, spare)
        wait_commits_resume(network, AUTHORITIES)
    assert_healthy_end(network)


# Kills in the middle of writes ---------------------------------------------------------


def tear_write_ahead_file(network: FaultNetwork, name: str) -> None:
    """Leave what a kill in the middle of writing a state leaves: a frame cut short."""
    wal = WriteAheadFile(network.net.node(name).data_dir / "consensus" / "wal")
    state = wal.load()
    assert state is not None
    payload = state.encode()
    torn = struct.pack(">II", len(payload), zlib.crc32(payload)) + payload[: len(payload) // 2]
    with wal.path.open("ab") as handle:
        handle.write(torn)


def kill_tear_and_restart(network: FaultNetwork, live: set[str], victim: str) -> int:
    """kill -9 ``victim``, check its files, leave a torn write-ahead frame as a kill in
    mid-write does, restart it and wait until it serves; the height it had stored."""
    network.net.kill(victim)
    live.discard(victim)
    stored = check_files_of_dead_node(network, victim, live)
    tear_write_ahead_file(network, victim)
    network.net.start(victim)
    live.add(victim)
    wait_serving(network, victim)
    return stored


def test_states_written_after_a_torn_write_ahead_frame_are_loaded_after_the_next_kill(
    network: FaultNetwork,
) -> None:
    """A kill in the middle of a write-ahead append leaves a torn frame; the states the
    restarted node writes afterwards must be the ones its next start loads. (Under light
    load no compaction rewrites the file in between.)"""
    victim = "authority-1"
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        stored = kill_tear_and_restart(network, feeder.live, victim)
        wait_until(
            lambda: network.height(victim) >= stored + 5,
            30,
            lambda: f"{victim} at {network.height(victim)}",
        )
        network.net.kill(victim)
        feeder.live.discard(victim)
        check_files_of_dead_node(network, victim, feeder.live)
        network.net.start(victim)
        feeder.live.add(victim)
        wait_serving(network, victim)
        wait_commits_resume(network, AUTHORITIES)
    assert_healthy_end(network)


@long_only
def test_authorities_killed_under_heavy_load_recover_their_files(network: FaultNetwork) -> None:
    """kill -9 during a stream of large blocks, each kill leaving a torn write-ahead frame
    as a kill in mid-write does: every store reopens whole, no committed block is lost and
    the node's next write-ahead states are the ones loaded after its next crash."""
    rng = random.Random(schedule_seed())
    first, second = rng.sample(AUTHORITIES, 2)
    with BulkFeeder(network) as feeder:
        wait_until(lambda: feeder.accepted > 2000, 30, lambda: f"{feeder.accepted} accepted")
        for victim in (first, second, first):
            time.sleep(rng.uniform(0.2, 2.0))
            print(f"{time.monotonic():.1f} kill -9 {victim} at height {network.height(victim)}")
            stored = kill_tear_and_restart(network, feeder.live, victim)
            assert network.height(victim) >= stored, f"{victim} lost committed blocks"
            # Let it sign and commit a few heights past the torn frame before the next kill.
            wait_until(
                lambda victim=victim, stored=stored: network.height(victim) >= stored + 3,
                30,
                lambda victim=victim: f"{victim} at {network.height(victim)}",
            )
        wait_commits_resume(network, AUTHORITIES)
        print(f"{feeder.accepted} records accepted")
    assert_healthy_end(network)


# Partitions ----------------------------------------------------------------------------


def wait_streams_through_proxy(network: FaultNetwork) -> None:
    pairs = list(itertools.permutations(AUTHORITIES, 2))
    wait_until(
        lambda: all(network.proxy.forwarded(c, t) >= 1 for c, t in pairs),
        30,
        lambda: str([p for p in pairs if network.proxy.forwarded(*p) < 1]),
    )


def current_proposer(network: FaultNetwork, name: str) -> str:
    """The proposer of the round `name` is in now."""
    status = consensus_status(network, name)
    assert status is not None
    genesis = Genesis.load(network.net.root / "genesis.json")
    key = ValidatorSet.from_genesis(genesis).proposer(
        int(status["height"]) + 1,
        int(status["round"]),
    )
    return next(a.name for a in genesis.authorities if a.public_key == key)


def isolate(network: FaultNetwork, name: str) -> None:
    network.proxy.split({name}, {*EVERYONE} - {name})


def test_isolating_the_current_proposer_moves_commits_to_the_next_round(
    network: FaultNetwork,
) -> None:
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        wait_streams_through_proxy(network)
        for _ in range(3):
            proposer = current_proposer(network, "authority-0")
            isolate(network, proposer)
            print(f"isolated {proposer}, the current proposer")
            wait_commits_resume(network, tuple(n for n in AUTHORITIES if n != proposer))
            time.sleep(1.0)
            network.proxy.heal()
            wait_commits_resume(network, AUTHORITIES)
        assert feeder.accepted > 20
    assert_healthy_end(network)


def run_rolling_partitions(network: FaultNetwork, seed: int, windows: int) -> None:
    """Isolate one authority after another (1|3), a new one every 2-4 s; the majority side
    must commit in every window."""
    rng = random.Random(seed)
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        wait_streams_through_proxy(network)
        isolated: str | None = None
        for _ in range(windows):
            isolated = rng.choice([n for n in AUTHORITIES if n != isolated])
            majority = tuple(n for n in AUTHORITIES if n != isolated)
            network.proxy.heal()
            isolate(network, isolated)
            started = time.monotonic()
            before = max(network.heights(majority).values())
            took = wait_until(
                lambda m=majority, b=before: max(network.heights(m).values()) > b,
                RESUME_SECONDS,
                lambda m=majority, b=before: f"{network.heights(m)} from {b}",
            )
            print(f"{started:.1f} isolated {isolated}: the others committed in {took:.1f} s")
            time.sleep(max(0.0, rng.uniform(2.0, 4.0) - (time.monotonic() - started)))
        network.proxy.heal()
        wait_commits_resume(network, AUTHORITIES)
        assert feeder.accepted > 20
    assert_healthy_end(network)


@long_only
def test_rolling_one_three_partitions(network: FaultNetwork) -> None:
    run_rolling_partitions(network, schedule_seed(), windows=5)


@long_only
@pytest.mark.parametrize("repeat", range(3))
def test_long_rolling_one_three_partitions(network: FaultNetwork, repeat: int) -> None:
    run_rolling_partitions(network, schedule_seed(), windows=25)


def cut_links(network: FaultNetwork, links: list[tuple[str, str]]) -> None:
    """Cut only these directed links (caller -> target): one-way partitions."""
    proxy = network.proxy

    def cut() -> None:
        proxy._blocked.clear()
        proxy._blocked.update(links)
        for route in proxy._routes:
            if (route.caller, route.target) in proxy._blocked:
                for connection in route.connections:
                    connection.transport.abort()

    proxy._run(cut)


def run_random_link_cuts(network: FaultNetwork, seed: int, windows: int) -> None:
    """Every 1-3 s a new random set of directed links between nodes is cut (one-way and
    non-transitive partitions, quorum sometimes lost); after the last one heals, commits
    resume within 10 s and the network ends as one."""
    rng = random.Random(seed)
    links = [pair for pair in itertools.permutations(EVERYONE, 2) if pair[1] != "peer-0"]
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        wait_streams_through_proxy(network)
        for _ in range(windows):
            cut = rng.sample(links, rng.randrange(1, len(links) // 2))
            cut_links(network, cut)
            print(f"{time.monotonic():.1f} cut {sorted(cut)} heights {network.heights()}")
            time.sleep(rng.uniform(1.0, 3.0))
        network.proxy.heal()
        wait_commits_resume(network, AUTHORITIES)
        assert feeder.accepted > 20
    assert_healthy_end(network)


@long_only
@pytest.mark.parametrize("repeat", range(3))
def test_long_random_one_way_link_cuts(network: FaultNetwork, repeat: int) -> None:
    run_random_link_cuts(network, schedule_seed(), windows=30)


# Peers ---------------------------------------------------------------------------------


@long_only
def test_a_peer_killed_while_syncing_catches_up(network: FaultNetwork) -> None:
    """A peer down while many blocks commit restarts, is killed -9 while it syncs them, and
    catches up after its second restart from what its files held."""
    peer = "peer-0"
    with RecordFeeder(network) as feeder:
        wait_until(lambda: min(network.heights().values()) >= 2, 30, lambda: str(network.heights()))
        network.net.kill(peer)
        behind = check_files_of_dead_node(network, peer, feeder.live)
        with BulkFeeder(network, batch=100) as bulk:
            wait_until(
                lambda: min(network.heights().values()) >= behind + SYNC_GAP,
                60,
                lambda: f"{network.heights()} ({bulk.accepted} accepted)",
            )
        target = max(network.heights().values())
        network.net.start(peer)
        started = time.monotonic()
        wait_until(
            lambda: network.height(peer) > behind, 30, lambda: f"{peer} at {network.height(peer)}"
        )
        network.net.kill(peer)
        stored = check_files_of_dead_node(network, peer, feeder.live)
        print(f"{peer} killed at height {stored} on its way from {behind} to {target}")
        network.net.start(peer)
        wait_until(
            lambda: network.height(peer) >= target,
            30,
            lambda: f"{peer} at {network.height(peer)}, authorities at {target}",
        )
        print(f"{peer} caught up {time.monotonic() - started:.1f} s after its first restart")
    assert_healthy_end(network)


# A log that is not the chain's ---------------------------------------------------------


async def test_a_log_that_is_not_the_chains_stops_consensus_instead_of_growing(
    tmp_path: Path,
) -> None:
    """A node whose consensus directory is gone keeps the records its log holds as blocks
    come back by sync; a log holding other records than the chain's stops it loudly."""
    authorities = [await service_node(tmp_path, f"authority-{i}") for i in range(4)]
    genesis = make_genesis(authorities)
    for node in authorities:
        initialize_state(node.directory / "consensus")
        await start(node, genesis)
    peer = await service_node(tmp_path, "peer-0")
    try:
        live = authorities[0].service
        assert live is not None
        live.submit(service_record(1))
        await wait_for(lambda: live.ledger is not None and live.ledger.size >= 1)
        with TransparencyLog(peer.directory / "ledger") as foreign:
            foreign.append([service_record(2)])
        service = await start(peer, genesis)
        await wait_for(lambda: not service.healthy)
        # Empty blocks may come before the one holding record 1; those store fine.
        holding = next(
            height
            for height in range(1, live.blocks.height + 1)
            if live.blocks.get(height)[0].records
        )
        assert service.height == holding - 1, (
            "nothing of a block is stored when its records are refused"
        )
        assert peer.ledger is not None and peer.ledger.size == 1
    finally:
        for node in authorities:
            await stop(node)
        if peer.service is not None:
            with contextlib.suppress(LogError):  # what stopped its consensus loop
                await peer.service.stop()
            await peer.service.transport.close()
            await peer.server.stop(None)
        if peer.ledger is not None:
            peer.ledger.close()
