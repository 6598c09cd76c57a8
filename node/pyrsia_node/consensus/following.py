"""Which authority a follower streams committed blocks from, and when it moves on.

A follower (a node that is not a validator: a peer) streams committed blocks from one
authority, its *source*. Every `FollowTiming.probe_interval` it asks each other authority
for the commit certificate of the next height it has not decided (a probe of a few hundred
bytes: `GetBlocks` with `certificates_only`). `Following` is the state of that choice as an
immutable value: the shell reports what happened (blocks the source streamed, the height
the follower's core decided, probe answers that `proves_commit` accepted, a stream that
ended) and asks `next_source` and `after_stream_end` where to go. This module performs no
IO and reads no clock.

Invariants:

* Safety is not decided here. A block is accepted only by the consensus core, with a valid
  commit certificate of a quorum of that height's validators, whichever authority sent it;
  the source decides only where blocks come from. A probe answer counts only when
  `proves_commit` holds (a quorum of the validators for that height precommitted a block
  there), so an authority cannot draw followers to itself with heights the network has not
  decided.
* No source keeps the follower behind: once another authority proved height p at time t and
  the source has not delivered p by t + `grace`, the follower leaves the source for the
  authority that proved the highest height, as soon as `hold` has passed since its last
  switch. A block the source streamed counts as delivered while the follower's decided
  height keeps moving; after `stall` seconds without a decision only decided heights count,
  so a source streaming blocks the core refuses is left like a silent one.
* No flapping: two switches for lag are at least `hold` apart; `hold` doubles (up to
  `max_hold`) with every switch for lag that comes less than `max_hold` after the hold
  before it ran out, and falls back to `FollowTiming.hold` after a source kept longer.
* A stream that ends (an error, the server closing it) moves on at once: to an authority
  that proved a height above the follower's, else to the next authority in key order, so
  every authority is tried in turn. A source that stops being an authority is left the
  same way.
* Bounded state: at most one proof per authority.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

from pyrsia_node.consensus.messages import (
    CommitCertificate,
    MessageKind,
    SignatureVerifier,
    signing_bytes,
)
from pyrsia_node.consensus.validators import ValidatorSet


@dataclass(frozen=True, slots=True)
class FollowTiming:
    """Seconds.

    `probe_interval`: how often the other authorities are probed (and each probe's time
    limit). `grace`: how long the source may trail a height another authority proved.
    `hold`: the least time between two switches for lag, doubled while switches keep
    coming (less than `max_hold` after the hold ran out), up to `max_hold`. `stall`: how
    long streamed blocks count as delivered without the follower deciding any of them."""

    probe_interval: float = 1.0
    grace: float = 1.0
    hold: float = 2.0
    max_hold: float = 60.0
    stall: float = 30.0


@dataclass(frozen=True, slots=True)
class Proof:
    """`authority` holds a commit certificate for `height`, a height the follower had not
    decided when this was first seen, at `since`."""

    authority: bytes
    height: int
    since: float


@dataclass(frozen=True, slots=True)
class Following:
    """The follower's source and what it knows about the source and the others.

    `decided`: the last height the follower's core decided. `streamed`: the highest height
    the source streamed since it was chosen (at least `decided`). `progressed_at`: when
    `decided` last grew, or the source was chosen. `switched_at`, `hold`: when the source
    was chosen, and the least time before a switch for lag."""

    timing: FollowTiming
    source: bytes
    decided: int
    streamed: int
    progressed_at: float
    switched_at: float
    hold: float
    proofs: tuple[Proof, ...] = field(default=())

    @classmethod
    def begin(
        cls, authorities: Sequence[bytes], decided: int, now: float, timing: FollowTiming
    ) -> Following:
        """Start with the first authority in key order."""
        return cls(timing, min(authorities), decided, decided, now, now, timing.hold)

    def streamed_block(self, height: int) -> Following:
        """The source streamed the block at `height`."""
        if height <= self.streamed:
            return self
        return replace(self, streamed=height)

    def decided_height(self, height: int, now: float) -> Following:
        """The follower's core has decided every height up to `height`."""
        if height <= self.decided:
            return self
        return replace(
            self,
            decided=height,
            streamed=max(self.streamed, height),
            progressed_at=now,
            proofs=tuple(p for p in self.proofs if p.height > height),
        )

    def proved(self, authority: bytes, height: int | None, now: float) -> Following:
        """A probe's answer: `authority` holds a valid commit certificate for `height`;
        None: it showed none (it has not got that far, or did not answer)."""
        others = tuple(p for p in self.proofs if p.authority != authority)
        if height is None or height <= self.decided or authority == self.source:
            return self if others == self.proofs else replace(self, proofs=others)
        known = next((p for p in self.proofs if p.authority == authority), None)
        if known is not None and known.height >= height:
            return self
        since = now if known is None else known.since
        return replace(self, proofs=(*others, Proof(authority, height, since)))

    def delivered(self, now: float) -> int:
        """The height the source is taken to have delivered (see the module invariants)."""
        if self.streamed > self.decided and now - self.progressed_at >= self.timing.stall:
            return self.decided
        return self.streamed

    def next_source(self, authorities: Collection[bytes], now: float) -> Following | None:
        """The state after leaving the source, or None to keep it: it is no longer an
        authority, or it lags (another authority proved a height it has not delivered for
        `grace` seconds) and `hold` has passed since the last switch."""
        if self.source not in authorities:
            return self.after_stream_end(authorities, now)
        if now - self.switched_at < self.hold:
            return None
        delivered = self.delivered(now)
        overdue = [
            p
            for p in self.proofs
            if p.authority in authorities
            and p.height > delivered
            and now - p.since >= self.timing.grace
        ]
        if not overdue:
            return None
        kept_long = now - self.switched_at >= self.hold + self.timing.max_hold
        hold = self.timing.hold if kept_long else min(2 * self.hold, self.timing.max_hold)
        return self._switch(_best(overdue).authority, now, hold)

    def after_stream_end(self, authorities: Collection[bytes], now: float) -> Following:
        """The state after the source's stream ended: the authority that proved the highest
        height above the follower's, else the next authority after the source in key
        order."""
        ahead = [p for p in self.proofs if p.authority in authorities and p.height > self.decided]
        if ahead:
            return self._switch(_best(ahead).authority, now, self.hold)
        ordered = sorted(authorities)
        later = [key for key in ordered if key > self.source]
        return self._switch((later or ordered)[0], now, self.hold)

    def _switch(self, source: bytes, now: float, hold: float) -> Following:
        return replace(
            self,
            source=source,
            streamed=self.decided,
            progressed_at=now,
            switched_at=now,
            hold=hold,
            proofs=tuple(p for p in self.proofs if p.authority != source),
        )


def _best(proofs: Sequence[Proof]) -> Proof:
    """The highest height; among equals the longest known, then the lowest key."""
    return min(proofs, key=lambda p: (-p.height, p.since, p.authority))


def proves_commit(
    chain_id: str,
    cert: CommitCertificate,
    height: int,
    validators: ValidatorSet,
    verify: SignatureVerifier,
) -> bool:
    """Whether `cert` holds a quorum of `validators`' (the set for `height`) valid
    precommits for one block at `height` on `chain_id`: the check of
    `messages.verify_commit_certificate` without the block, which a probe does not carry."""
    if cert.height != height:
        return False
    message = signing_bytes(chain_id, MessageKind.PRECOMMIT, height, cert.round, cert.block_hash)
    counted: set[bytes] = set()
    for item in cert.signatures:
        if item.validator in counted or item.validator not in validators:
            continue
        if verify(item.validator, item.signature, message):
            counted.add(item.validator)
    return len(counted) >= validators.quorum
