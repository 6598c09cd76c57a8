"""The journal of submitted records: what an authority acknowledged survives its crash.

Invariant: a record this authority answered "admitted" for (admin API 202, `SubmitRecords`
accepted) is in the journal, fsynced, before the answer leaves, and stays there until a
rewrite finds it no longer pending (committed). On start the consensus service offers
every journaled record to its mempool again (the log refuses those committed meanwhile)
and rewrites the journal with what is pending; when the file grows past `compact_bytes`
it is rewritten the same way after a commit. Without it, records admitted by a node killed
before it gossiped them, or by every node holding them, were lost though acknowledged.

Records gossiped from other authorities are not journaled: their submitter's journal
holds them. Frames as in the write-ahead file (`wal.py`): ``u32 length | u32 crc32 |
record``; a torn tail is cut off on load. Blocking IO: the service calls `append` and
`rewrite` from one writer thread, in order (one write and one fdatasync per submission
call, off the event loop, which an fdatasync under load would stall for milliseconds).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from pyrsia_node.consensus.wal import _FRAME, _frame, _fsync_dir, _write_all


class RecordJournal:
    """Append-only, fsynced storage of submitted records; owned by one consensus shell."""

    def __init__(self, path: Path, compact_bytes: int = 32 << 20) -> None:
        self.path = path
        self.compact_bytes = compact_bytes
        self.size = 0

    def load(self) -> list[bytes]:
        """The intact records, in order; cuts off a torn tail (a crash mid-append)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records = []
        pos = 0
        while pos + _FRAME.size <= len(data):
            size, crc = _FRAME.unpack_from(data, pos)
            record = data[pos + _FRAME.size : pos + _FRAME.size + size]
            if len(record) != size or zlib.crc32(record) != crc:
                break
            records.append(record)
            pos += _FRAME.size + size
        if pos != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(pos)
                os.fsync(handle.fileno())
        self.size = pos
        return records

    def append(self, records: Sequence[bytes]) -> None:
        """Make `records` durable; returns only after fdatasync."""
        if not records:
            return
        data = b"".join(map(_frame, records))
        new = self.size == 0 and not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_all(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)
        self.size += len(data)

    def rewrite(self, records: Iterable[bytes]) -> None:
        """Replace the journal atomically with `records` (those still pending)."""
        data = b"".join(map(_frame, records))
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.size = len(data)
