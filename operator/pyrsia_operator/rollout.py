"""Which authority StatefulSets may change now without risking the quorum.

Authorities are rolled one at a time: an outdated authority is updated only when every other
authority already runs the desired template and is ready, and when taking it down still
leaves a quorum of ready authorities. A missing authority is always created (creating one
cannot lower the number of ready authorities). Pure: observations in, a plan out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyrsia_node.genesis import quorum

from pyrsia_operator.builders import TEMPLATE_HASH


@dataclass(frozen=True, slots=True)
class Observed:
    """An authority StatefulSet as last seen: its template hash and whether its pod is ready."""

    template_hash: str
    ready: bool


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    apply: tuple[str, ...]  # authorities whose StatefulSet is created or updated now
    waiting: tuple[str, ...]  # outdated authorities held back to protect the quorum
    reason: str = ""


def observe(statefulset: Mapping[str, Any]) -> Observed:
    meta = statefulset.get("metadata") or {}
    status = statefulset.get("status") or {}
    generation = meta.get("generation")
    observed_generation = status.get("observedGeneration")
    settled = generation is None or observed_generation is None or observed_generation >= generation
    ready = settled and int(status.get("readyReplicas") or 0) >= 1
    return Observed(str((meta.get("annotations") or {}).get(TEMPLATE_HASH, "")), ready)


def plan_authority_rollout(
    desired: Mapping[str, str], observed: Mapping[str, Observed], members: int
) -> RolloutPlan:
    """``desired``: authority name -> template hash; ``observed``: existing StatefulSets."""
    missing = [name for name in desired if name not in observed]
    outdated = [
        name
        for name in desired
        if name in observed and observed[name].template_hash != desired[name]
    ]
    if not outdated:
        return RolloutPlan(tuple(missing), ())
    needed = quorum(members)
    ready = sum(1 for name in desired if name in observed and observed[name].ready)
    unsettled = [
        name
        for name in desired
        if name in observed and name not in outdated and not observed[name].ready
    ]
    if unsettled:
        return RolloutPlan(
            tuple(missing),
            tuple(outdated),
            f"waiting for {', '.join(sorted(unsettled))} to become ready before the next update",
        )
    # Update a down authority first: it costs the quorum nothing.
    candidate = next((n for n in outdated if not observed[n].ready), outdated[0])
    after = ready - (1 if observed[candidate].ready else 0)
    if after < needed and members > 1:
        return RolloutPlan(
            tuple(missing),
            tuple(outdated),
            f"updating {candidate} would leave {after} ready authorities, below the quorum of "
            f"{needed}",
        )
    rest = tuple(n for n in outdated if n != candidate)
    return RolloutPlan((*missing, candidate), rest, f"updating {candidate}" if rest else "")
