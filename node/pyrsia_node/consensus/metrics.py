"""Prometheus metrics of one node's consensus, as the chart's dashboards and alerts read them.

`PyrsiaLedgerStalled` fires when `pyrsia_ledger_height` has not changed for a while and
`pyrsia_consensus_pending_records` is above zero; the "network health" dashboard plots the
height, the p50/p99 of `pyrsia_consensus_commit_latency_seconds`, the rate of
`pyrsia_consensus_round_changes_total` and the mean time per step of
`pyrsia_consensus_step_seconds`. Labels never carry peer ids or artifact names: the only
labels are the step of a height and a follower's reason to switch sources.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Commit latency spans a lone fast block (milliseconds) to a stalled round (tens of seconds).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


# A step lasts from a few milliseconds to a timeout (seconds, growing with the round).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEPS = ("new_height", "propose", "prevote", "precommit", "commit")


class ConsensusMetrics:
    def __init__(self, registry: CollectorRegistry, pending: Callable[[], int]) -> None:
        self.height = Gauge(
            "pyrsia_ledger_height",
            "Height of the last block this node committed (or synced)",
            registry=registry,
        )
        self.commit_latency = Histogram(
            "pyrsia_consensus_commit_latency_seconds",
            "From a record's submission to this node to its commit here",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.round_changes = Counter(
            "pyrsia_consensus_round_changes_total",
            "Rounds this node moved on from without a decision (timeouts or skips)",
            registry=registry,
        )
        self.pending = Gauge(
            "pyrsia_consensus_pending_records",
            "Records admitted to the mempool and not yet committed",
            registry=registry,
        )
        self.pending.set_function(lambda: float(pending()))
        self.round = Gauge(
            "pyrsia_consensus_round", "Round of the height in progress", registry=registry
        )
        self.committed_records = Counter(
            "pyrsia_consensus_committed_records_total",
            "Records in the blocks this node committed",
            registry=registry,
        )
        self.source_switches = Counter(
            "pyrsia_consensus_follow_source_switches_total",
            "Times this follower moved to another authority to stream blocks from: "
            "lag (another authority proved heights its source had not sent) or "
            "stream_end (its source's stream ended)",
            ["reason"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "pyrsia_consensus_step_seconds",
            "Time this node spent in each step of a height, until it moved on: new_height "
            "(from the decision: the commit's writes and the pause before round 0), propose "
            "(until it prevoted), prevote (until it precommitted), precommit (until a "
            "decision or the next round); commit: the commit's writes alone",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        for step in STEPS:
            self.step_seconds.labels(step)
        self.equivocations = Counter(
            "pyrsia_consensus_equivocations_total",
            "Conflicting, validly signed messages seen from one validator key for one slot",
            registry=registry,
        )
