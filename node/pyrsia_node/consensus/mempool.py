"""The gate in front of the consensus core's pending records: dedupe and size limits.

A record is admitted once while pending (by its record hash) and never when the ledger
already holds it; records that are too large, malformed, or would push the pool past its
count or byte limit are refused with a reason the submitter can act on. The core keeps its
own list of pending records (they are what it proposes); this class decides what reaches
it, hands out pending records by leaf hash (to complete compact proposals, here and for
other authorities) and forgets a record once it is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from pyrsia_node.merkle import leaf_hash


class RecordRejected(Exception):
    """The mempool refused a record; ``reason`` says why and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MempoolLimits:
    max_records: int = 100_000
    max_record_bytes: int = 1 << 20
    max_total_bytes: int = 256 << 20


class Mempool:
    def __init__(
        self,
        limits: MempoolLimits,
        in_ledger: Callable[[Sequence[bytes]], Collection[bytes]],
        is_valid: Callable[[bytes], bool],
    ) -> None:
        """`in_ledger` answers which of the leaf hashes it is given the ledger holds (one
        call per `admit_all`); `is_valid` is the record check."""
        self.limits = limits
        self._in_ledger = in_ledger
        self._is_valid = is_valid
        self._pending: dict[bytes, bytes] = {}  # leaf hash -> record
        # record -> leaf hash, for the same records: membership and removal by the record
        # itself, without hashing 1 KiB with SHA-256 again per lookup (Python caches a
        # bytes object's own hash, and the core's pending dict computes it anyway).
        self._hashes: dict[bytes, bytes] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, record: bytes) -> bool:
        return record in self._hashes

    def get(self, record_hash: bytes) -> bytes | None:
        """The pending record whose leaf hash is `record_hash`, if any."""
        return self._pending.get(record_hash)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def admit(self, record: bytes) -> bool:
        """True when `record` is new and goes to the core; False for a pending duplicate.

        Raises `RecordRejected` for a record that must not be proposed."""
        (outcome,) = self.admit_all([record])
        if isinstance(outcome, RecordRejected):
            raise outcome
        return outcome

    def admit_all(self, records: Sequence[bytes]) -> list[bool | RecordRejected]:
        """`admit` for each of `records` in order: what it would return or raise for each.
        The ledger is asked about all the new ones in one `in_ledger` call."""
        outcomes: list[bool | RecordRejected] = [False] * len(records)
        new: list[tuple[int, bytes]] = []  # (position, leaf hash) of those not pending
        for position, record in enumerate(records):
            if len(record) > self.limits.max_record_bytes:
                outcomes[position] = RecordRejected(
                    f"record of {len(record)} bytes exceeds the limit of "
                    f"{self.limits.max_record_bytes}"
                )
                continue
            key = leaf_hash(record)
            if key not in self._pending:
                new.append((position, key))
        held = self._in_ledger([key for _, key in new]) if new else ()
        for position, key in new:
            if key in self._pending:  # a second copy within `records`
                continue
            record = records[position]
            try:
                self._check(record, key in held)
            except RecordRejected as exc:
                outcomes[position] = exc
                continue
            self._pending[key] = record
            self._hashes[record] = key
            self._bytes += len(record)
            outcomes[position] = True
        return outcomes

    def _check(self, record: bytes, in_ledger: bool) -> None:
        if not self._is_valid(record):
            raise RecordRejected(
                "record refused: not a canonical ledger record, or its attestations do not "
                "reach the threshold among the authorities in force"
            )
        if in_ledger:
            raise RecordRejected("record is already in the ledger")
        if len(self._pending) >= self.limits.max_records:
            raise RecordRejected("mempool is full (record count); retry later")
        if self._bytes + len(record) > self.limits.max_total_bytes:
            raise RecordRejected("mempool is full (bytes); retry later")

    def retain(self, keep: Callable[[bytes], bool]) -> None:
        """Forget the pending records `keep` refuses (e.g. after the validators changed)."""
        for key, record in list(self._pending.items()):
            if not keep(record):
                del self._pending[key]
                del self._hashes[record]
                self._bytes -= len(record)

    def committed(self, records: Iterable[bytes]) -> None:
        for record in records:
            key = self._hashes.pop(record, None)
            if key is not None:
                del self._pending[key]
                self._bytes -= len(record)
