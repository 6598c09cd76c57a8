"""The durable, append-only transparency log: records, their Merkle tree, cosigned checkpoints.

Storage is one SQLite database in write-ahead-log mode with ``synchronous=FULL`` under the
log's directory. One ``append`` is one transaction, so it is durable on return with one
WAL fsync per batch, and a writer killed at any instant (SIGKILL, power loss) leaves the
state of the last committed batch: never a prefix of a batch, never entries without their
tree nodes. A lock file keeps a second process from opening the same log for writing.

Tables: ``entries`` (index -> leaf hash, record bytes; indexed by leaf hash), ``nodes``
(every perfect subtree above the leaves, keyed by (level, position)), ``packages``
(package id -> entry index) and ``checkpoints`` (tree size -> cosigned note).
Append writes O(log n) rows (amortised two), a proof reads O(log n) nodes, each one B-tree
lookup; the unpaired right-edge nodes of the tree stay in memory so appends never read.

Invariants, checked by :meth:`TransparencyLog.verify_integrity`: entries are numbered
0..size-1 without gaps, every leaf hash is ``leaf_hash(record)``, every stored node is the
hash of its two children and exactly the perfect subtrees of ``size`` leaves are stored;
every record decodes canonically. Blocking IO: call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from pyrsia_node import merkle
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote
from pyrsia_node.ledger.records import ArtifactRecord, decode_record

DB_FILE = "log.sqlite3"
LOCK_FILE = "log.lock"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_leaf ON entries (leaf);
CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL, pos INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY (level, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packages (
    package_id TEXT NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (package_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL);
"""


class LogError(Exception):
    """The log cannot do what was asked; the message says why."""


class LogLocked(LogError):
    """Another process holds the log open."""


class EntryNotFound(LogError):
    """An index, size or record hash outside what the log holds."""


class LogCorrupted(LogError):
    """Stored data violates the log's invariants (found by ``verify_integrity``)."""


class TransparencyLog:
    """An append-only log of canonical ledger records under ``directory``.

    Thread-safe: every public method holds one lock, so the node may call it from worker
    threads. The only mutators are :meth:`append` and :meth:`put_checkpoint`.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LogLocked(f"{directory} is open in another process; stop it first") from None
        self.directory = directory
        self._mutex = threading.RLock()
        self._db = sqlite3.connect(
            directory / DB_FILE, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
        )
        (schema,) = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if schema != SCHEMA_VERSION:
            self.close()
            raise LogError(f"log schema {schema} is not supported (expected {SCHEMA_VERSION})")
        (last,) = self._db.execute("SELECT max(idx) FROM entries").fetchone()
        self._size: int = 0 if last is None else last + 1
        # Unpaired right-edge perfect subtrees, by level: the tree's "frontier".
        self._frontier: dict[int, bytes] = {
            level: self.subtree_hash(level, (self._size >> level) - 1)
            for level in range(self._size.bit_length())
            if (self._size >> level) & 1
        }

    def __enter__(self) -> TransparencyLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._mutex:
            self._db.close()
            os.close(self._lock_fd)

    @property
    def size(self) -> int:
        return self._size

    def subtree_hash(self, level: int, index: int) -> bytes:
        """Hash of perfect subtree ``(level, index)``; see :class:`merkle.SubtreeHashes`."""
        with self._mutex:
            if level == 0:
                row = self._db.execute("SELECT leaf FROM entries WHERE idx = ?", (index,))
            else:
                row = self._db.execute(
                    "SELECT hash FROM nodes WHERE level = ? AND pos = ?", (level, index)
                )
            found = row.fetchone()
            if found is None:
                raise LogCorrupted(f"tree node (level {level}, index {index}) is missing")
            value: bytes = found[0]
            return value

    def append(self, records: Sequence[bytes]) -> int:
        """Append ``records`` as one atomic, durable batch; return the first one's index.

        Every record must be canonical (``records.decode_record``); nothing is written when
        one is not.
        """
        decoded = [decode_record(r) for r in records]
        with self._mutex:
            first = self._size
            frontier = dict(self._frontier)
            entry_rows: list[tuple[int, bytes, bytes]] = []
            node_rows: list[tuple[int, int, bytes]] = []
            package_rows: list[tuple[str, int]] = []
            for offset, (data, record) in enumerate(zip(records, decoded, strict=True)):
                index = first + offset
                h = merkle.leaf_hash(data)
                entry_rows.append((index, h, bytes(data)))
                if isinstance(record, ArtifactRecord):
                    package_rows.append((record.package_id, index))
                level, pos = 0, index
                while pos & 1:
                    h = merkle.node_hash(frontier.pop(level), h)
                    level, pos = level + 1, pos >> 1
                    node_rows.append((level, pos, h))
                frontier[level] = h
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO entries VALUES (?, ?, ?)", entry_rows)
                self._db.executemany("INSERT INTO nodes VALUES (?, ?, ?)", node_rows)
                self._db.executemany("INSERT INTO packages VALUES (?, ?)", package_rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._size = first + len(records)
            self._frontier = frontier
            return first

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._size:
            raise EntryNotFound(f"tree size {size} is outside 0..{self._size}")

    def root(self, size: int | None = None) -> bytes:
        """The RFC 9162 root hash of the first ``size`` entries (default: all)."""
        with self._mutex:
            if size is None or size == self._size:
                root: bytes | None = None
                for level in sorted(self._frontier):
                    h = self._frontier[level]
                    root = h if root is None else merkle.node_hash(h, root)
                return merkle.EMPTY_ROOT if root is None else root
            self._check_size(size)
            return merkle.range_hash(self, 0, size)

    def entry(self, index: int) -> bytes:
        """The canonical record bytes at ``index``."""
        with self._mutex:
            row = self._db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
            if row is None:
                raise EntryNotFound(f"no entry {index}; the log holds {self._size}")
            data: bytes = row[0]
            return data

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path of entry ``index`` in the tree of ``size`` entries (default: all)."""
        with self._mutex:
            size = self._size if size is None else size
            self._check_size(size)
            if not 0 <= index < size:
                raise EntryNotFound(f"entry {index} is not in a tree of size {size}")
            return merkle.inclusion_proof(self, index, size)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """Proof that the tree of ``size1`` entries is a prefix of the one of ``size2``."""
        with self._mutex:
            size2 = self._size if size2 is None else size2
            self._check_size(size2)
            if not 0 <= size1 <= size2:
                raise EntryNotFound(f"first size {size1} is outside 0..{size2}")
            return merkle.consistency_proof(self, size1, size2)

    def index_of(self, record_hash: bytes) -> int:
        """The first index whose record has leaf hash ``record_hash``."""
        with self._mutex:
            row = self._db.execute(
                "SELECT min(idx) FROM entries WHERE leaf = ?", (record_hash,)
            ).fetchone()
            if row[0] is None:
                raise EntryNotFound(f"no record with hash {record_hash.hex()}")
            index: int = row[0]
            return index

    def find_package(
        self, package_id: str, limit: int = 100, before: int | None = None
    ) -> list[int]:
        """Indexes of artifact records for ``package_id``, latest first, below ``before``."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT idx FROM packages WHERE package_id = ? AND idx < ? "
                "ORDER BY idx DESC LIMIT ?",
                (package_id, self._size if before is None else before, limit),
            ).fetchall()
            return [int(r[0]) for r in rows]

    def put_checkpoint(self, note_text: str) -> Checkpoint:
        """Store a (co)signed checkpoint note of this log, replacing one of the same size.

        The log checks only that the note's root is its own root at that size; signatures
        are the verifier's business (``checkpoint.verify_checkpoint``).
        """
        checkpoint = Checkpoint.parse(SignedNote.parse(note_text).body)
        with self._mutex:
            if checkpoint.size > self._size:
                raise EntryNotFound(
                    f"checkpoint size {checkpoint.size} is beyond the log's {self._size}"
                )
            if checkpoint.root != self.root(checkpoint.size):
                raise LogError(f"checkpoint root for size {checkpoint.size} is not this log's root")
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (checkpoint.size, note_text)
            )
        return checkpoint

    def latest_checkpoint(self) -> str | None:
        """The stored checkpoint note with the largest size, if any."""
        with self._mutex:
            row = self._db.execute(
                "SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            return None if row is None else str(row[0])

    def checkpoint(self, size: int) -> str | None:
        with self._mutex:
            row = self._db.execute(
                "SELECT note FROM checkpoints WHERE size = ?", (size,)
            ).fetchone()
            return None if row is None else str(row[0])

    def verify_integrity(self) -> None:
        """Recompute everything from the records (O(n) time and memory, for fsck and tests);
        raise :class:`LogCorrupted` at the first violated invariant."""
        with self._mutex:
            leaves: list[bytes] = []
            rows = self._db.execute("SELECT idx, leaf, data FROM entries ORDER BY idx")
            for expected, (index, leaf, data) in enumerate(rows):
                if index != expected:
                    raise LogCorrupted(f"entry {expected} is missing")
                if merkle.leaf_hash(data) != leaf:
                    raise LogCorrupted(f"entry {index}: stored leaf hash does not match")
                decode_record(data)
                leaves.append(leaf)
            if len(leaves) != self._size:
                raise LogCorrupted(f"{len(leaves)} entries stored, {self._size} expected")
            stored: dict[tuple[int, int], bytes] = {
                (lv, pos): h
                for lv, pos, h in self._db.execute("SELECT level, pos, hash FROM nodes")
            }
            expected_nodes: dict[tuple[int, int], bytes] = {}
            height, level = 0, leaves
            while len(level) > 1:
                height += 1
                level = [
                    merkle.node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)
                ]
                expected_nodes.update(((height, pos), h) for pos, h in enumerate(level))
            if stored != expected_nodes:
                wrong = sorted(set(stored.items()) ^ set(expected_nodes.items()))[:1]
                raise LogCorrupted(f"tree nodes differ from the records, first at {wrong[0][0]}")
            if self.root() != merkle.root_hash(leaves):
                raise LogCorrupted("the in-memory frontier does not match the stored tree")
