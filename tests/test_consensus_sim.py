"""Seeded fault schedules over real consensus cores (see tests/consensus_sim.py).

`test_seeded_schedules` runs SEEDS schedules (1,000 by default; PYRSIA_SIM_SEEDS overrides)
in CHUNKS parametrised tests so that a failure names its chunk, and the failure message
names the seed and the command that replays it:

    PYRSIA_SIM_SEED=<seed> .venv/bin/pytest tests/test_consensus_sim.py -k replay -q

The other tests show that the schedules really exercise each fault and that the checks
can fail.
"""

from __future__ import annotations

import os
from itertools import pairwise

import pytest
from consensus_sim import (
    CHAIN_ID,
    Schedule,
    SimNode,
    Simulation,
    SimulationFailure,
    run_seed,
)
from pyrsia_node.consensus import Block, CommitCertificate, MessageKind, Vote, VoteType
from pyrsia_node.consensus.validators import GENESIS_PREV_HASH

SEEDS = int(os.environ.get("PYRSIA_SIM_SEEDS", "1000"))
CHUNKS = 20


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_seeded_schedules(chunk: int) -> None:
    for seed in range(chunk, SEEDS, CHUNKS):
        run_seed(seed)


@pytest.mark.skipif("PYRSIA_SIM_SEED" not in os.environ, reason="set PYRSIA_SIM_SEED to replay")
def test_replay() -> None:
    simulation = run_seed(int(os.environ["PYRSIA_SIM_SEED"]))
    print(simulation.schedule, "steps", simulation.steps)


def test_schedules_mix_every_fault() -> None:
    schedules = [Schedule.from_seed(seed) for seed in range(SEEDS)]
    assert {s.validators for s in schedules} == {4, 5, 7}
    for feature in ("twins", "extra_node", "removal", "partitions", "crashes", "wipes"):
        assert 0.05 * SEEDS < sum(getattr(s, feature) for s in schedules) < 0.9 * SEEDS, feature
    assert any(s.drop > 0 and s.duplicate > 0 for s in schedules)


def test_twins_equivocate_and_honest_nodes_detect_it() -> None:
    found = 0
    for seed in range(200):
        if Schedule.from_seed(seed).twins:
            found += run_seed(seed).equivocations
    assert found > 0


def test_wiped_nodes_restart_under_the_signing_guard() -> None:
    restarted = 0
    for seed in range(200):
        if Schedule.from_seed(seed).wipes:
            restarted += run_seed(seed).wiped_restarts
    assert restarted > 0


def test_added_authority_signs_after_its_governance_record_commits() -> None:
    for seed in range(100):
        if not Schedule.from_seed(seed).extra_node:
            continue
        simulation = run_seed(seed)
        extra = simulation.extra_key
        heights = [h for (key, h, _, _) in simulation.signed if key == extra]
        if not heights:
            continue
        added_at = next(
            b.height for b in simulation.canonical if any(r.endswith(extra) for r in b.records)
        )
        assert min(heights) >= added_at + 2
        return
    raise AssertionError("no schedule committed the governance record and let the key sign")


def test_removed_authority_leaves_the_validator_set() -> None:
    for seed in range(200):
        if not Schedule.from_seed(seed).removal:
            continue
        simulation = run_seed(seed)
        removed = simulation.genesis.validators[0]
        if removed in simulation.canonical_chain.next_validators:
            continue
        removed_at = next(
            b.height for b in simulation.canonical if any(r.endswith(removed) for r in b.records)
        )
        if len(simulation.canonical_states) < removed_at + 2:
            continue  # the run ended before the change came into force at H + 2
        assert removed in simulation.canonical_states[removed_at].validators  # at H + 1
        assert removed not in simulation.canonical_states[removed_at + 1].validators  # H + 2
        return
    raise AssertionError("no schedule committed a removal")


class ForgetfulSimulation(Simulation):
    """Restarts nodes with neither their write-ahead state nor the state-loss guard."""

    def _restart(self, node: SimNode) -> None:
        node.wal = None
        node.wiped = False
        super()._restart(node)


def test_simulator_catches_a_node_that_forgets_what_it_signed() -> None:
    for seed in range(300):
        schedule = Schedule.from_seed(seed)
        if not schedule.crashes:
            continue
        try:
            ForgetfulSimulation(schedule).run()
        except SimulationFailure as failure:
            assert "signed twice" in str(failure)
            assert f"PYRSIA_SIM_SEED={seed}" in str(failure)
            return
    raise AssertionError("no schedule exposed a node restarted without its write-ahead state")


def test_checker_rejects_two_blocks_at_one_height() -> None:
    simulation = Simulation(Schedule.from_seed(0))
    a, b = simulation.nodes[0], simulation.nodes[1]
    block_a = Block(CHAIN_ID, 1, GENESIS_PREV_HASH, a.key, (b"a",))
    block_b = Block(CHAIN_ID, 1, GENESIS_PREV_HASH, a.key, (b"b",))
    cert_a = CommitCertificate(1, 0, block_a.hash, ())
    with pytest.raises(SimulationFailure, match="bad certificate"):
        simulation._on_commit(a, block_a, cert_a)
    simulation2 = Simulation(Schedule.from_seed(0))
    simulation2.canonical.append(block_a)
    with pytest.raises(SimulationFailure, match="disagreement at height 1"):
        simulation2._on_commit(b, block_b, CommitCertificate(1, 0, block_b.hash, ()))


def test_checker_rejects_a_second_signature_for_one_slot() -> None:
    simulation = Simulation(Schedule.from_seed(0))
    node = simulation.nodes[0]
    first = Vote(VoteType.PREVOTE, 1, 0, None, node.key, b"\x00" * 64)
    second = Vote(VoteType.PREVOTE, 1, 0, b"\x01" * 32, node.key, b"\x00" * 64)
    simulation._check_signed_once(node, first)
    simulation._check_signed_once(node, first)
    with pytest.raises(SimulationFailure, match=f"signed twice.*{MessageKind.PREVOTE.name}"):
        simulation._check_signed_once(node, second)


def idle_schedule(empty_block: float, records: int = 0) -> Schedule:
    """Four honest validators, no faults at all, `records` records."""
    return Schedule(
        seed=7,
        validators=4,
        twins=False,
        extra_node=False,
        removal=False,
        chaos_time=20.0,
        drop=0.0,
        duplicate=0.0,
        partitions=False,
        crashes=False,
        wipes=False,
        records=records,
        empty_block=empty_block,
        commit_pause=0.0,
        late_records=0,
    )


def test_an_idle_network_commits_one_empty_block_per_empty_block_timeout() -> None:
    simulation = Simulation(idle_schedule(empty_block=2.0))
    simulation.run()
    # 20 s of chaos phase (here: no faults) plus the two liveness blocks: about 11 blocks,
    # each after a 2 s wait. Without the wait it would be thousands.
    times = simulation.commit_times
    assert 9 <= len(times) <= 12
    assert all(later - earlier >= 2.0 for earlier, later in pairwise(times))
    assert all(not block.records for block in simulation.canonical)


def test_records_end_the_wait_and_no_empty_block_is_committed_before_it_ends() -> None:
    simulation = Simulation(idle_schedule(empty_block=1000.0, records=5))
    # Once the five records are in, nothing is pending and the wait outlasts the run.
    with pytest.raises(SimulationFailure, match="no liveness after healing"):
        simulation.run()
    committed = [record for block in simulation.canonical for record in block.records]
    assert len(committed) == 5
    assert all(block.records for block in simulation.canonical)
