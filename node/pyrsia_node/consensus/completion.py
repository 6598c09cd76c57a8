"""Compact proposals that wait for records this node lacks.

A compact proposal names its block's records by leaf hash, and a validator completes it
from the records it holds. One that lacks some waits in `AwaitingRecords` while the shell
asks authorities for them (`ask_order`: the sender first, then every other authority once)
and admits what they send through the mempool's checks; the shell reports every record
the mempool admits, whether fetched or gossiped (`supplied`), and the table hands back each
proposal whose last missing record that was, so it completes as soon as the records are
here, from whichever source. This module performs no IO.

Invariants:

* Only hashes are kept here, never records: a proposal completes from the mempool, so its
  records reach the core as the mempool admitted them (and the core checks the block as
  always).
* Bounded: at most `per_sender` proposals per sending authority wait at once (the oldest
  makes way for a newer one), so no authority crowds out another's proposals and the table
  holds at most `per_sender` times the number of authorities. A proposal leaves when its
  last record arrives, when it is discarded (completed otherwise), when the node's height
  passes it (`drop_below`) or when its sender's newer proposals push it out.
* A proposal waits once: `add` refuses one that waits already (a retransmission), so each
  authority is asked at most once while it waits.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")


@dataclass(slots=True)
class _Waiting(Generic[P]):
    proposal: P
    sender: bytes
    height: int
    missing: set[bytes]


class AwaitingRecords(Generic[P]):
    """Proposals (any value `P`), by key (their signature), and the record hashes each
    still lacks."""

    def __init__(self, per_sender: int = 2) -> None:
        self._per_sender = per_sender
        self._waiting: dict[bytes, _Waiting[P]] = {}  # oldest first
        self._by_hash: dict[bytes, set[bytes]] = {}  # record hash -> keys lacking it

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def add(
        self, key: bytes, proposal: P, sender: bytes, height: int, missing: Iterable[bytes]
    ) -> bool:
        """Wait for `missing` on behalf of `proposal`; False when it waits already."""
        if key in self._waiting:
            return False
        own = [k for k, waiting in self._waiting.items() if waiting.sender == sender]
        for old in own[: max(0, len(own) - self._per_sender + 1)]:
            self.discard(old)
        lacking = set(missing)
        self._waiting[key] = _Waiting(proposal, sender, height, lacking)
        for record_hash in lacking:
            self._by_hash.setdefault(record_hash, set()).add(key)
        return True

    def missing(self, key: bytes) -> list[bytes]:
        """The record hashes the proposal `key` still lacks (none when it is not here)."""
        waiting = self._waiting.get(key)
        return [] if waiting is None else sorted(waiting.missing)

    def get(self, key: bytes) -> P | None:
        waiting = self._waiting.get(key)
        return None if waiting is None else waiting.proposal

    def supplied(self, record_hash: bytes) -> list[P]:
        """A record arrived: the proposals it was the last missing record of, which leave."""
        keys = self._by_hash.pop(record_hash, None)
        if not keys:
            return []
        complete = []
        for key in keys:
            waiting = self._waiting[key]
            waiting.missing.discard(record_hash)
            if not waiting.missing:
                del self._waiting[key]
                complete.append(waiting.proposal)
        return complete

    def discard(self, key: bytes) -> P | None:
        """Stop waiting for the proposal `key`; the proposal, if it was here."""
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return None
        for record_hash in waiting.missing:
            keys = self._by_hash.get(record_hash)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_hash[record_hash]
        return waiting.proposal

    def drop_below(self, height: int) -> None:
        """Forget the proposals for heights below `height` (decided already)."""
        for key in [k for k, waiting in self._waiting.items() if waiting.height < height]:
            self.discard(key)


def ask_order(sender: bytes, authorities: Collection[bytes], me: bytes) -> list[bytes]:
    """Whom to ask for a proposal's missing records: its sender, then every other authority
    (not this node) in key order from the sender on."""
    others = sorted(key for key in authorities if key not in (sender, me))
    return [sender, *[k for k in others if k > sender], *[k for k in others if k < sender]]
