"""The gate in front of the consensus core's pending records: dedupe and size limits.

A record is admitted once while pending (by its record hash) and never when the ledger
already holds it; records that are too large, malformed, or would push the pool past its
count or byte limit are refused with a reason the submitter can act on. The core keeps its
own list of pending records (they are what it proposes); this class decides what reaches
it, hands out pending records by leaf hash (to complete compact proposals, here and for
other authorities) and forgets a record once it is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        is_committed: Callable[[bytes], bool],
        is_valid: Callable[[bytes], bool],
    ) -> None:
        self.limits = limits
        self._is_committed = is_committed
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
        size = len(record)
        if size > self.limits.max_record_bytes:
            raise RecordRejected(
                f"record of {size} bytes exceeds the limit of {self.limits.max_record_bytes}"
            )
        key = leaf_hash(record)
        if key in self._pending:
            return False
        if not self._is_valid(record):
            raise RecordRejected(
                "record refused: not a canonical ledger record, or its attestations do not "
                "reach the threshold among the authorities in force"
            )
        if self._is_committed(key):
            raise RecordRejected("record is already in the ledger")
        if len(self._pending) >= self.limits.max_records:
            raise RecordRejected("mempool is full (record count); retry later")
        if self._bytes + size > self.limits.max_total_bytes:
            raise RecordRejected("mempool is full (bytes); retry later")
        self._pending[key] = record
        self._hashes[record] = key
        self._bytes += size
        return True

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
