"""Status conditions of a network, computed from observations (pure).

Kubernetes conventions: each condition has ``type``, ``status`` ("True"/"False"/"Unknown"),
``reason`` (CamelCase), ``message``, ``observedGeneration`` and ``lastTransitionTime``, which
only moves when ``status`` changes. ``transitions`` tells the handler which conditions
changed, so it can emit one Event per transition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyrsia_node.genesis import quorum

READY = "Ready"
QUORUM = "QuorumAvailable"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class NetworkObservation:
    members: int  # authorities in the validator set
    authorities_ready: int
    peers_desired: int
    peers_ready: int
    rollout_pending: str = ""  # why authorities are not all updated yet, "" when they are
    spec_error: str = ""  # a spec the operator refuses, "" when it is valid
    reconcile_error: str = ""  # the last apply failure, "" when it succeeded
    was_ready: bool = False  # the network has been Ready before: missing nodes are faults now


def network_conditions(obs: NetworkObservation) -> list[Condition]:
    if obs.spec_error:
        return [
            Condition(READY, "False", "InvalidSpec", obs.spec_error),
            Condition(QUORUM, "Unknown", "InvalidSpec", "the spec must be fixed first"),
            Condition(PROGRESSING, "False", "InvalidSpec", obs.spec_error),
            Condition(DEGRADED, "True", "InvalidSpec", obs.spec_error),
        ]
    needed = quorum(obs.members) if obs.members else 1
    has_quorum = obs.members > 0 and obs.authorities_ready >= needed
    quorum_msg = f"{obs.authorities_ready}/{obs.members} authorities ready, quorum {needed}"
    all_auth = obs.authorities_ready >= obs.members
    all_peers = obs.peers_ready >= obs.peers_desired
    progressing = bool(obs.rollout_pending) or not (all_auth and all_peers)
    if obs.rollout_pending:
        progress = Condition(PROGRESSING, "True", "RollingUpdate", obs.rollout_pending)
    elif progressing:
        progress = Condition(
            PROGRESSING,
            "True",
            "WaitingForNodes",
            f"{quorum_msg}; {obs.peers_ready}/{obs.peers_desired} peers ready",
        )
    else:
        progress = Condition(PROGRESSING, "False", "Reconciled", "all nodes run the desired spec")
    if obs.reconcile_error:
        degraded = Condition(DEGRADED, "True", "ReconcileFailed", obs.reconcile_error)
    elif obs.was_ready and not all_auth and not obs.rollout_pending:
        degraded = Condition(DEGRADED, "True", "AuthoritiesDown", quorum_msg)
    else:
        degraded = Condition(DEGRADED, "False", "AsExpected", "no fault observed")
    ready = has_quorum and all_auth and all_peers and not obs.reconcile_error
    return [
        Condition(
            READY,
            "True" if ready else "False",
            "NetworkReady" if ready else ("QuorumLost" if not has_quorum else "NodesNotReady"),
            f"{quorum_msg}; {obs.peers_ready}/{obs.peers_desired} peers ready",
        ),
        Condition(
            QUORUM,
            "True" if has_quorum else "False",
            "QuorumReached" if has_quorum else "QuorumLost",
            quorum_msg,
        ),
        progress,
        degraded,
    ]


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[Condition],
    generation: int,
    now: str,
) -> tuple[list[dict[str, Any]], list[Condition]]:
    """New ``status.conditions`` and the conditions whose status changed (for Events)."""
    old = {c.get("type"): c for c in previous}
    merged: list[dict[str, Any]] = []
    changed: list[Condition] = []
    for cond in current:
        before = old.get(cond.type)
        moved = before is None or before.get("status") != cond.status
        if moved:
            changed.append(cond)
        merged.append(
            {
                "type": cond.type,
                "status": cond.status,
                "reason": cond.reason,
                "message": cond.message,
                "observedGeneration": generation,
                "lastTransitionTime": now
                if moved or before is None
                else before.get("lastTransitionTime", now),
            }
        )
    return merged, changed
