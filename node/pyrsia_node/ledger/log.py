"""The durable, append-only transparency log: records, their Merkle tree, cosigned checkpoints.

Storage under the log's directory (schema 2)::

    records.dat   canonical record bytes, back to back, in entry order
    offsets.dat   per entry, the u64 big-endian end offset of its record in records.dat
    tree.dat      every perfect subtree hash (32 bytes) in the order appends complete them:
                  leaf i's hash, then each parent it completes (the post-order layout of a
                  Merkle mountain range), so node (level, k) sits at ``tree_position``
    commit.dat    the commit point: two 32-byte slots, each (u64 sequence number, u64
                  committed size, u32 CRC-32 of those 16 bytes); slot = sequence mod 2
    log.sqlite3   SQLite, WAL mode: the lookup indexes, the governance index and the
                  checkpoint notes (synchronous=FULL; NORMAL for the index writer's rows)

One ``append`` is one batch, committed in three steps:

1. write the batch's bytes to the three data files at their committed lengths;
2. ``fdatasync`` each of them (concurrently) and wait for all three;
3. write the next commit record (sequence + 1, the new size) over the older slot of
   ``commit.dat`` and ``fdatasync`` it.

A batch exists exactly when its commit record is durable, and its bytes were durable
before that, so when ``append`` returns the batch survives SIGKILL and power loss alike.
Opening the log takes the intact slot (checksum right) with the highest sequence number: a
write torn by a power cut damages only the slot it was writing, the other still holds the
previous commit. It then cuts the data files to the lengths the committed size implies,
erasing whatever tail an interrupted append left: a writer killed at any instant leaves
the last committed batch, never part of one. A lock file keeps a second process from
opening the same log. (Logs from before ``commit.dat`` had their commit point in the
SQLite row ``meta.size``: an empty commit file takes its size from there, once.)

Why data files and not SQLite rows: per append the log writes each record once, 8 bytes of
offset and, amortised, 64 bytes of tree hashes, all sequential, plus one commit record;
a proof reads O(log n) hashes, each one ``pread`` at a computed position, whatever the size;
appends never read (the unpaired right-edge subtrees stay in memory).

The lookup indexes (record hash -> index, package id -> indexes; B-trees keyed by 64-bit
hashes, every hit checked against the entry) are derived data, kept off the append's
critical path: ``append`` only adds each entry to in-memory maps of pending entries, and
a background thread with its own SQLite connection writes them once ``index_batch`` are
pending (fewer while the index is small: ``_flush_due``). A flush freezes the pending
maps (appends go on into fresh ones), sorts their rows by key and inserts them in key-range
slices of ``index_chunk`` rows, one short transaction each, the last one also advancing
``meta.indexed``; then it drops the frozen maps. Freezing and dropping are O(1) under the
log's lock, and appends never touch SQLite (only ``put_checkpoint`` may wait for its write
lock, at most one slice). So at every moment
each entry is in memory or below ``indexed`` in SQLite, and lookups consult both (SQLite
may also hold rows of a flush in progress: genuine entries, found in memory too; ranges
are cut at ``indexed``). On open the entries from ``meta.indexed`` on are re-read from the records
into memory, and a flush killed part way is redone with ``INSERT OR IGNORE``. Sorted keys
make a flush touch each index page about once, whatever the number of slices. The index
writer's connection commits with synchronous=NORMAL: its rows need not be durable at once
(lost ones are redone from the records, and ``indexed`` moves with them); a WAL checkpoint
syncs them. The index writer checkpoints the WAL after a flush, or each second when
appends came. The governance index (positions of governance records) is written the same
way, its pending part kept in memory beside the others.

A schema-1 log (records and tree nodes as SQLite rows) is migrated on open.

Invariants, checked by :meth:`TransparencyLog.verify_integrity`: every record decodes
canonically, the tree file holds exactly the perfect subtrees of ``size`` leaves and each
is the hash of its children (leaves: of their records), the indexes hold exactly the
entries below ``indexed`` (after a crash mid-flush, also some genuine entries above it)
and memory the rest. Blocking IO: call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from pyrsia_node import merkle
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote
from pyrsia_node.ledger.records import (
    ArtifactRecord,
    GovernanceRecord,
    check_record,
    decode_record,
    package_id_of,
)

DB_FILE = "log.sqlite3"
LOCK_FILE = "log.lock"
RECORDS_FILE = "records.dat"
OFFSETS_FILE = "offsets.dat"
TREE_FILE = "tree.dat"
COMMIT_FILE = "commit.dat"
SCHEMA_VERSION = 2
INDEX_BATCH = 1 << 16
# While the index is small a flush touches few pages whatever its size, so it comes sooner:
# after an eighth of the entries indexed so far, at least this many (a 65,536-entry flush
# on every node at once stalled a saturated consensus network for seconds).
INDEX_BATCH_MIN = 1 << 13
INDEX_CHUNK = 1 << 12
CHECKPOINT_INTERVAL = 1.0  # seconds between the index writer's WAL checkpoints, when idle

_HASH = merkle.HASH_SIZE
_logger = logging.getLogger(__name__)
_OFFSET = struct.Struct(">Q")
_OFFSETS_PAIR = struct.Struct(">QQ")
_COMMIT = struct.Struct(">QQI")  # sequence number, size, CRC-32 of the two
_COMMIT_SLOT = 32
_READ_CHUNK = 1 << 12

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leaf_index (
    prefix INTEGER NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (prefix, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS package_index (
    key INTEGER NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (key, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS governance (idx INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL);
"""


class LogError(Exception):
    """The log cannot do what was asked; the message says why."""


class LogLocked(LogError):
    """Another process holds the log open."""


class EntryNotFound(LogError):
    """An index, size or record hash outside what the log holds."""


class LogCorrupted(LogError):
    """Stored data violates the log's invariants (found on open or by ``verify_integrity``)."""


def tree_position(level: int, index: int) -> int:
    """Position (in hashes) of perfect subtree ``(level, index)`` in the tree file.

    The node completes when leaf ``m - 1`` is appended, ``m = (index + 1) << level``; the
    ``m - 1`` leaves before it left ``2(m - 1) - popcount(m - 1)`` hashes, then come that
    leaf and its completed parents, one per level.
    """
    last = ((index + 1) << level) - 1
    return 2 * last - last.bit_count() + level


def tree_length(size: int) -> int:
    """Number of hashes in the tree file of a log of ``size`` entries."""
    return 2 * size - size.bit_count()


# Hashes looked up per SQLite statement (SQLite before 3.32 allows 999 parameters).
_LOOKUP_CHUNK = 512


def _prefix(leaf: bytes) -> int:
    """The leaf-index key: the record hash's first 8 bytes as a signed SQLite integer."""
    return int.from_bytes(leaf[:8], "big", signed=True)


def _package_key(package_id: str) -> int:
    """The package-index key: 8 bytes of the id's SHA-256 (a third of the text's size)."""
    return _prefix(hashlib.sha256(package_id.encode()).digest())


class _Pending:
    """Entries not yet in the durable lookup indexes, from the first one's index on."""

    __slots__ = ("by_package", "first", "governance", "leaves", "packages")

    def __init__(self) -> None:
        self.leaves: list[bytes] = []  # leaf hashes in entry order
        self.first: dict[bytes, int] = {}  # leaf hash -> its first index here
        self.packages: list[tuple[str, int]] = []  # (package id, index) in entry order
        self.by_package: dict[str, list[int]] = {}  # package id -> indexes, ascending
        self.governance: list[int] = []  # indexes of governance records, ascending


class TransparencyLog:
    """An append-only log of canonical ledger records under ``directory``.

    Thread-safe: every public method holds one lock, so the node may call it from worker
    threads. The only mutators are :meth:`append` and :meth:`put_checkpoint`.
    ``index_batch`` is how many entries wait in memory before the background thread
    writes them to the lookup indexes, ``index_chunk`` how many rows it writes per
    transaction (tests lower both to exercise the flush).
    """

    def __init__(
        self, directory: Path, *, index_batch: int = INDEX_BATCH, index_chunk: int = INDEX_CHUNK
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LogLocked(f"{directory} is open in another process; stop it first") from None
        self.directory = directory
        self._index_batch = max(1, index_batch)
        self._index_batch_min = min(self._index_batch, INDEX_BATCH_MIN)
        self._index_chunk = max(1, index_chunk)
        self._mutex = threading.RLock()
        # Held by the index writer for a whole flush; verify_integrity takes it to see the
        # indexes at rest. Order: _flush_lock before _mutex.
        self._flush_lock = threading.Lock()
        self._wake = threading.Condition(threading.Lock())
        self._closing = False
        self._fds: list[int] = []
        self._commit_fd = -1
        self._sync_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ledger-sync")
        self._db = self._connect()
        self._index_db: sqlite3.Connection | None = None
        self._checkpointed_size = -1
        self._indexer: threading.Thread | None = None
        try:
            self._open()
            self._index_db = self._connect()
            # See the module docstring: index rows need not be durable at COMMIT.
            self._index_db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints of the WAL into the database file happen on the index writer's
            # connection, never in an append's commit.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            self._release()
            raise
        self._indexer = threading.Thread(
            target=self._index_loop, name=f"ledger-indexer {directory}", daemon=True
        )
        self._indexer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.directory / DB_FILE, isolation_level=None, check_same_thread=False, timeout=600
        )
        return db

    def _open(self) -> None:
        schema, size, indexed = self._open_database()
        flags = os.O_RDWR | os.O_CREAT
        for name in (RECORDS_FILE, OFFSETS_FILE, TREE_FILE):
            self._fds.append(os.open(self.directory / name, flags, 0o644))
        self._records_fd, self._offsets_fd, self._tree_fd = self._fds
        self._commit_fd = os.open(self.directory / COMMIT_FILE, flags, 0o644)
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # the files' names are as durable as their bytes
        finally:
            os.close(directory_fd)
        committed = self._read_commit_record()
        if committed is None:
            # A new log, or one from before the commit file (its commit point was the
            # SQLite row ``meta.size``): from now on the commit file is the commit point.
            self._commit_seq = 0
        else:
            self._commit_seq, size = committed
        if schema == 1:
            size = 0  # a migration starts over (see _open_database)
        if committed is None or schema == 1:
            self._write_commit_record(size)
        self._size = size
        self._records_end = self._end_offset(size)
        self._cut_uncommitted_tails()
        # Unpaired right-edge perfect subtrees, by level: the tree's "frontier".
        self._frontier: dict[int, bytes] = {
            level: self.subtree_hash(level, (size >> level) - 1)
            for level in range(size.bit_length())
            if (size >> level) & 1
        }
        if indexed > size:
            raise LogCorrupted(f"indexes cover {indexed} entries of {size}")
        self._indexed = indexed
        # Entries not yet in the durable lookup indexes, looked up here meanwhile.
        # Two generations: ``_live`` takes appends; a flush turns it into ``_frozen`` (O(1),
        # under the mutex), writes that, then drops it (O(1)).
        self._live = _Pending()
        self._frozen: _Pending | None = None
        for index, data in self._iter_entries(indexed, size):
            self._remember(merkle.leaf_hash(data), index, check_record(data))
        if schema == 1:
            self._migrate_from_schema_1()

    def _read_commit_record(self) -> tuple[int, int] | None:
        """(sequence number, size) of the newest intact slot of the commit file; None when
        the file is empty."""
        raw = os.pread(self._commit_fd, 2 * _COMMIT_SLOT, 0)
        if not raw:
            return None
        best: tuple[int, int] | None = None
        for slot in range(len(raw) // _COMMIT_SLOT):
            seq, size, crc = _COMMIT.unpack_from(raw, slot * _COMMIT_SLOT)
            body = raw[slot * _COMMIT_SLOT : slot * _COMMIT_SLOT + 16]
            if crc == zlib.crc32(body) and seq % 2 == slot and (best is None or seq > best[0]):
                best = (seq, size)
        if best is None:
            raise LogCorrupted(f"{COMMIT_FILE} holds no intact commit record")
        return best

    def _write_commit_record(self, size: int) -> None:
        """Step 3 of an append: make ``size`` the committed size. Records alternate
        between two slots, so a torn write leaves the previous record whole."""
        seq = self._commit_seq + 1
        body = struct.pack(">QQ", seq, size)
        record = body + struct.pack(">I", zlib.crc32(body))
        self._write_all(
            self._commit_fd, record.ljust(_COMMIT_SLOT, b"\0"), (seq % 2) * _COMMIT_SLOT
        )
        os.fdatasync(self._commit_fd)
        self._commit_seq = seq

    def _open_database(self) -> tuple[int, int, int]:
        """Set up the SQLite side; return (schema, committed size, indexed entries)."""
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        (schema,) = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if schema not in (1, SCHEMA_VERSION):
            raise LogError(f"log schema {schema} is not supported (expected {SCHEMA_VERSION})")
        if schema == 1:
            # A migration starts over on every open until it commits: drop what a killed
            # attempt derived; the data files are then cut to size 0.
            db.executescript(
                "BEGIN; DELETE FROM leaf_index; DELETE FROM package_index;"
                "DELETE FROM governance; DELETE FROM meta WHERE key IN ('size', 'indexed');"
                "COMMIT;"
            )
        db.execute("INSERT OR IGNORE INTO meta VALUES ('size', 0)")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('indexed', 0)")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        return schema, meta["size"], meta["indexed"]

    def _migrate_from_schema_1(self) -> None:
        """Move a schema-1 log (records and tree nodes in SQLite tables) to the data files:
        re-append its records in order, then drop the old tables in one transaction."""
        db = self._db
        while True:
            rows = db.execute(
                "SELECT data FROM entries WHERE idx >= ? ORDER BY idx LIMIT 10000", (self._size,)
            ).fetchall()
            if not rows:
                break
            self.append([bytes(r[0]) for r in rows])
        db.executescript(
            "BEGIN; DROP TABLE entries; DROP TABLE nodes; DROP TABLE packages;"
            f"UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema'; COMMIT;"
        )
        db.execute("VACUUM")

    def _cut_uncommitted_tails(self) -> None:
        """Truncate each data file to its committed length, or fail if one is too short."""
        lengths = (
            (self._records_fd, RECORDS_FILE, self._records_end),
            (self._offsets_fd, OFFSETS_FILE, self._size * _OFFSET.size),
            (self._tree_fd, TREE_FILE, tree_length(self._size) * _HASH),
        )
        for fd, name, length in lengths:
            actual = os.fstat(fd).st_size
            if actual < length:
                raise LogCorrupted(
                    f"{name} has {actual} bytes, the committed size {self._size} needs {length}"
                )
            if actual > length:
                os.ftruncate(fd, length)
                os.fsync(fd)

    def __enter__(self) -> TransparencyLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _release(self) -> None:
        self._sync_pool.shutdown()
        if self._commit_fd >= 0:
            os.close(self._commit_fd)
        self._db.close()
        if self._index_db is not None:
            self._index_db.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        os.close(self._lock_fd)

    def close(self) -> None:
        """Stop the index writer (after its current transaction; entries it had not
        written are re-read on the next open) and release the log."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._indexer is not None:
            self._indexer.join()
        with self._mutex:
            self._release()

    @property
    def size(self) -> int:
        return self._size

    # Reading ---------------------------------------------------------------------------

    def _pread(self, fd: int, length: int, offset: int, what: str) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise LogCorrupted(f"{what}: {len(data)} of {length} bytes at offset {offset}")
        return data

    def _end_offset(self, count: int) -> int:
        """End of the first ``count`` records in the records file."""
        if count == 0:
            return 0
        raw = self._pread(self._offsets_fd, 8, (count - 1) * 8, f"offset of entry {count - 1}")
        value: int = _OFFSET.unpack(raw)[0]
        return value

    def _iter_entries(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """``(index, record)`` for entries ``[start, end)``, reading in chunks."""
        for chunk in range(start, end, _READ_CHUNK):
            stop = min(chunk + _READ_CHUNK, end)
            base = self._end_offset(chunk)
            raw = self._pread(
                self._offsets_fd, (stop - chunk) * 8, chunk * 8, f"offsets {chunk}..{stop}"
            )
            ends = struct.unpack(f">{stop - chunk}Q", raw)
            blob = self._pread(self._records_fd, ends[-1] - base, base, f"records {chunk}..")
            previous = base
            for offset, record_end in enumerate(ends):
                yield chunk + offset, blob[previous - base : record_end - base]
                previous = record_end

    def entries(self, start: int, end: int) -> Iterator[bytes]:
        """The canonical record bytes of entries ``[start, end)``, in order, read in chunks
        (``entry`` reads one at a time). The range is checked against the size now; entries
        once committed never change, so appends meanwhile do not disturb the reading."""
        with self._mutex:
            if not 0 <= start <= end <= self._size:
                raise EntryNotFound(f"entries {start}..{end}: the log holds {self._size}")
        return (record for _, record in self._iter_entries(start, end))

    def subtree_hash(self, level: int, index: int) -> bytes:
        """Hash of perfect subtree ``(level, index)``; see :class:`merkle.SubtreeHashes`."""
        with self._mutex:
            if level < 0 or index < 0 or (index + 1) << level > self._size:
                raise EntryNotFound(
                    f"tree node (level {level}, index {index}) is not in a tree of "
                    f"size {self._size}"
                )
            position = tree_position(level, index)
            return self._pread(
                self._tree_fd, _HASH, position * _HASH, f"tree node ({level}, {index})"
            )

    def entry(self, index: int) -> bytes:
        """The canonical record bytes at ``index``."""
        with self._mutex:
            if not 0 <= index < self._size:
                raise EntryNotFound(f"no entry {index}; the log holds {self._size}")
            if index == 0:
                start, end = 0, self._end_offset(1)
            else:
                raw = self._pread(self._offsets_fd, 16, (index - 1) * 8, f"offset of {index}")
                start, end = _OFFSETS_PAIR.unpack(raw)
            return self._pread(self._records_fd, end - start, start, f"entry {index}")

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
        found = self.indexes_of([record_hash]).get(record_hash)
        if found is None:
            raise EntryNotFound(f"no record with hash {record_hash.hex()}")
        return found

    def indexes_of(self, record_hashes: Sequence[bytes]) -> dict[bytes, int]:
        """The first index of each of ``record_hashes`` the log holds; absent ones are left
        out. One read of the SQLite index per ``_LOOKUP_CHUNK`` hashes: a read transaction
        per hash (its file locks, page cache check) cost a node admitting thousands of
        records a second ~10% of its event loop."""
        found: dict[bytes, int] = {}
        by_prefix: dict[int, list[bytes]] = {}
        for record_hash in record_hashes:
            by_prefix.setdefault(_prefix(record_hash), []).append(record_hash)
        with self._mutex:
            # Memory holds the entries from ``indexed`` on; SQLite those below (and maybe
            # some of a batch being written): the first index is the smaller find.
            for pending in (self._frozen, self._live):
                if pending is not None:
                    for record_hash in record_hashes:
                        index = pending.first.get(record_hash)
                        if index is not None and record_hash not in found:
                            found[record_hash] = index
            prefixes = list(by_prefix)
            for start in range(0, len(prefixes), _LOOKUP_CHUNK):
                chunk = prefixes[start : start + _LOOKUP_CHUNK]
                # Padded to a power of two with repeats: few distinct statements to cache.
                width = 1 << (len(chunk) - 1).bit_length()
                rows = self._db.execute(
                    "SELECT prefix, idx FROM leaf_index WHERE prefix IN "
                    f"({','.join('?' * width)}) ORDER BY idx",
                    chunk + chunk[:1] * (width - len(chunk)),
                )
                for prefix, index in rows:
                    if index >= self._size:
                        continue
                    for record_hash in by_prefix[prefix]:
                        known = found.get(record_hash)
                        if (known is None or index < known) and self.subtree_hash(
                            0, index
                        ) == record_hash:
                            found[record_hash] = index
        return found

    def find_package(
        self, package_id: str, limit: int = 100, before: int | None = None
    ) -> list[int]:
        """Indexes of artifact records for ``package_id``, latest first, below ``before``."""
        with self._mutex:
            before = self._size if before is None else before
            found: list[int] = []
            for pending in (self._live, self._frozen):  # newest first
                if pending is not None:
                    indexes = reversed(pending.by_package.get(package_id, ()))
                    found += [i for i in indexes if i < before][: limit - len(found)]
            if len(found) < limit:
                rows = self._db.execute(
                    "SELECT idx FROM package_index WHERE key = ? AND idx < ? ORDER BY idx DESC",
                    (_package_key(package_id), min(before, self._indexed)),
                )
                for (index,) in rows:
                    # Keys are 64-bit hashes: someone may have made two ids collide.
                    if check_record(self.entry(index)) == package_id:
                        found.append(index)
                        if len(found) == limit:
                            break
                rows.close()
            return found

    def governance_indexes(self, size: int | None = None) -> list[int]:
        """Indexes of the governance records among the first ``size`` entries, in order.

        Every governance record the log holds, valid or not: judging signatures is the
        reader's business (``ledger.authorities``)."""
        with self._mutex:
            size = self._size if size is None else size
            self._check_size(size)
            rows = self._db.execute(
                "SELECT idx FROM governance WHERE idx < ? ORDER BY idx", (min(size, self._indexed),)
            ).fetchall()
            found = [int(r[0]) for r in rows]
            for pending in (self._frozen, self._live):  # oldest first
                if pending is not None:
                    found += [i for i in pending.governance if i < size]
            return found

    # Appending -------------------------------------------------------------------------

    def _remember(self, leaf: bytes, index: int, package_id: str | None) -> None:
        """Hold an entry not yet in the durable lookup indexes."""
        pending = self._live
        pending.leaves.append(leaf)
        pending.first.setdefault(leaf, index)
        if package_id is None:
            pending.governance.append(index)
        else:
            pending.packages.append((package_id, index))
            pending.by_package.setdefault(package_id, []).append(index)

    def append(self, records: Sequence[bytes], *, checked: bool = False) -> int:
        """Append ``records`` as one atomic, durable batch; return the first one's index.

        Every record must be canonical (``records.check_record``, which accepts exactly
        what ``decode_record`` does); nothing is written when one is not. With ``checked``
        the caller vouches that it decoded every record already (consensus does, for each
        record it commits), and the log only reads each one's package id from its header.
        """
        records = [bytes(r) for r in records]
        # None: a governance record.
        package_ids = [(package_id_of if checked else check_record)(r) for r in records]
        with self._mutex:
            first = self._size
            if not records:
                return first
            frontier = dict(self._frontier)
            sha256 = hashlib.sha256
            tree: list[bytes] = []  # this batch's tail of tree.dat
            leaves: list[bytes] = []
            ends: list[int] = []
            end = self._records_end
            for index, data in enumerate(records, first):
                h = sha256(b"\x00" + data).digest()
                tree.append(h)
                leaves.append(h)
                end += len(data)
                ends.append(end)
                level, pos = 0, index
                while pos & 1:
                    h = sha256(b"\x01" + frontier.pop(level) + h).digest()
                    tree.append(h)
                    level, pos = level + 1, pos >> 1
                frontier[level] = h
            size = first + len(records)
            # Steps 1 and 2. Should a write or sync fail, nothing is committed: the next
            # append overwrites these bytes, or the next open cuts them.
            self._write_all(self._records_fd, b"".join(records), self._records_end)
            self._write_all(self._offsets_fd, struct.pack(f">{len(ends)}Q", *ends), first * 8)
            self._write_all(self._tree_fd, b"".join(tree), tree_length(first) * _HASH)
            # The three syncs run concurrently (each releases the GIL): the file system can
            # serve them with fewer journal commits than one after another.
            syncs = [self._sync_pool.submit(os.fdatasync, fd) for fd in self._fds[1:]]
            os.fdatasync(self._fds[0])
            for sync in syncs:
                sync.result()
            self._write_commit_record(size)
            pending = zip(leaves, package_ids, strict=True)
            for index, (leaf, package_id) in enumerate(pending, first):
                self._remember(leaf, index, package_id)
            self._size = size
            self._records_end = end
            self._frontier = frontier
            due = size - self._indexed >= self._flush_due()
        if due:
            with self._wake:
                self._wake.notify_all()
        return first

    @staticmethod
    def _write_all(fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    # Index writer (background thread) ------------------------------------------------

    def _index_loop(self) -> None:
        db = self._index_db
        assert db is not None
        while True:
            with self._wake:
                while not self._closing and self._size - self._indexed < self._flush_due():
                    if not self._wake.wait(timeout=CHECKPOINT_INTERVAL):
                        break
                if self._closing:
                    return
            try:
                with self._flush_lock:
                    self._flush_indexes()
                    if self._size != self._checkpointed_size:
                        # Commits grow the WAL between flushes; fold it into the database.
                        self._checkpointed_size = self._size
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                # Lookups stay right (the entries stay in memory); try again later.
                _logger.exception("ledger: writing the lookup indexes failed; will retry")
                time.sleep(CHECKPOINT_INTERVAL)

    def _flush_due(self) -> int:
        """Pending entries that start a flush: ``index_batch``, or fewer while the index is
        small (an eighth of the entries indexed, at least ``INDEX_BATCH_MIN``)."""
        return max(self._index_batch_min, min(self._index_batch, self._indexed // 8))

    def wait_for_indexes(self) -> None:
        """Write every pending entry to the lookup indexes now, in this thread (tests,
        benchmarks and tools that want the indexes at rest)."""
        with self._flush_lock:
            self._flush_indexes(everything=True)

    def _flush_indexes(self, *, everything: bool = False) -> None:
        """Write the pending entries (those due, or ``everything``) to the lookup indexes
        in key-range slices, then drop them from memory. Caller holds ``_flush_lock``."""
        with self._mutex:
            if self._frozen is None:  # else: a flush that failed part way, retried
                pending = self._size - self._indexed
                if pending == 0 or (not everything and pending < self._flush_due()):
                    return
                self._frozen, self._live = self._live, _Pending()
            frozen = self._frozen
            start = self._indexed
            end = start + len(frozen.leaves)
            leaves, packages = frozen.leaves, frozen.packages  # no longer appended to
            governance = [(index,) for index in frozen.governance]
        leaf_rows = [(_prefix(leaf), start + i) for i, leaf in enumerate(leaves)]
        package_rows = [(_package_key(p), index) for p, index in packages]
        slices = [
            *(("leaf_index", rows) for rows in self._key_ranges(leaf_rows)),
            *(("package_index", rows) for rows in self._key_ranges(package_rows)),
        ]
        db = self._index_db
        assert db is not None
        for number, (table, rows) in enumerate(slices, 1):
            if self._closing and not everything:
                return  # the next open re-reads these entries and redoes the flush
            # Each slice is sorted just before its insert: one sort of the whole flush
            # would hold the GIL (and so stall appends) for tens of milliseconds.
            rows.sort()
            db.execute("BEGIN IMMEDIATE")
            try:
                # OR IGNORE: a flush killed part way left some of these rows.
                db.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)", rows)
                if number == len(slices):
                    db.executemany("INSERT OR IGNORE INTO governance VALUES (?)", governance)
                    db.execute("UPDATE meta SET value = ? WHERE key = 'indexed'", (end,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        with self._mutex:
            self._frozen = None
            self._indexed = end
        if everything:
            self._flush_indexes(everything=True)  # what a failed flush had left frozen

    def _key_ranges(self, rows: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """``rows`` split into about ``index_chunk``-row slices by ranges of their (signed
        64-bit, hash-distributed) keys, in key order; each slice unsorted."""
        count = -(-len(rows) // self._index_chunk)
        slices: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        for row in rows:
            slices[((row[0] + (1 << 63)) * count) >> 64].append(row)
        return [rows for rows in slices if rows]

    # Checkpoints -----------------------------------------------------------------------

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

    # Checking --------------------------------------------------------------------------

    def verify_integrity(self) -> None:
        """Recompute everything from the records (O(n) time and memory, for fsck and tests);
        raise :class:`LogCorrupted` at the first violated invariant."""
        with self._flush_lock, self._mutex:
            tree: list[bytes] = []  # the tree file as appends would have written it
            frontier: dict[int, bytes] = {}
            leaves: list[bytes] = []
            leaf_rows: set[tuple[int, int]] = set()
            package_rows: set[tuple[int, int]] = set()
            pending_packages: list[tuple[str, int]] = []
            governance: list[int] = []
            for index, data in self._iter_entries(0, self._size):
                record = decode_record(data)
                h = merkle.leaf_hash(data)
                leaves.append(h)
                package_id = record.package_id if isinstance(record, ArtifactRecord) else None
                if index < self._indexed:
                    leaf_rows.add((_prefix(h), index))
                    if package_id is not None:
                        package_rows.add((_package_key(package_id), index))
                elif package_id is not None:
                    pending_packages.append((package_id, index))
                if isinstance(record, GovernanceRecord):
                    governance.append(index)
                tree.append(h)
                level, pos = 0, index
                while pos & 1:
                    h = merkle.node_hash(frontier.pop(level), h)
                    tree.append(h)
                    level, pos = level + 1, pos >> 1
                frontier[level] = h
            frozen = self._frozen or _Pending()
            pending_packages_keys = [(_package_key(p), i) for p, i in pending_packages]
            if len(leaves) != self._size:
                raise LogCorrupted(f"{len(leaves)} entries stored, {self._size} expected")
            stored = self._pread(self._tree_fd, len(tree) * _HASH, 0, "tree file")
            for position, expected in enumerate(tree):
                if stored[position * _HASH : (position + 1) * _HASH] != expected:
                    raise LogCorrupted(
                        f"tree nodes differ from the records, first at tree position {position}"
                    )
            # Rows at or above ``indexed`` are those of a flush killed part way: genuine
            # entries, also held in memory.
            for table, expected_rows, all_rows in (
                ("leaf_index", leaf_rows, {(_prefix(h), i) for i, h in enumerate(leaves)}),
                ("package_index", package_rows, package_rows | set(pending_packages_keys)),
            ):
                stored_rows = set(self._db.execute(f"SELECT * FROM {table}"))
                below = {row for row in stored_rows if row[1] < self._indexed}
                if below != expected_rows or not stored_rows <= all_rows:
                    what = "record-hash" if table == "leaf_index" else "package"
                    raise LogCorrupted(f"the {what} index differs from the records")
            stored_governance = {r[0] for r in self._db.execute("SELECT idx FROM governance")}
            if sorted(i for i in stored_governance if i < self._indexed) != [
                i for i in governance if i < self._indexed
            ] or not stored_governance <= set(governance):
                raise LogCorrupted("the governance index differs from the records")
            if frozen.governance + self._live.governance != [
                i for i in governance if i >= self._indexed
            ]:
                raise LogCorrupted("the in-memory governance index differs from the records")
            if (
                frozen.leaves + self._live.leaves != leaves[self._indexed :]
                or frozen.packages + self._live.packages != pending_packages
            ):
                raise LogCorrupted("the in-memory index of recent entries differs from them")
            if self.root() != merkle.root_hash(leaves):
                raise LogCorrupted("the in-memory frontier does not match the stored tree")
