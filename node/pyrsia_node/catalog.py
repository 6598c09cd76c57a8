"""The registry's view of the transparency log: which images are committed.

``LedgerCatalog`` implements ``registry.Catalog`` over committed docker artifact records.
Each record carries the authorities' attestations; the image it describes (tag, root
manifest or index, platform manifests, blobs) is rebuilt from its first attestation's
in-toto statement. A tag resolves to the image of the latest committed record of its
package id; a digest resolves when any committed record of that repository covers it.

The index lives in SQLite (``catalog.sqlite3`` in the node's data directory), not in
memory: a node holds no per-image state however many images the log commits, and a restart
indexes only the entries appended since the last refresh instead of the whole log.
``refresh`` (once at start, then from consensus' commit hook) indexes the entries appended
since, in log order, in a worker thread: ``INDEX_CHUNK`` entries per transaction, each
also storing how many entries are indexed and the log's root hash at that size. A crash
at any point leaves the index at the end of a whole transaction, and the next refresh goes
on from there (tags are replaced and digests added, so redoing an entry changes nothing).
On open, an index whose stored root is not this log's root at the stored size (another
log, a log that lost entries) or that SQLite cannot read is rebuilt from the log: it is
derived data, and the log is the truth.

The commit hook hands over each block's records with ``committed``, so entries are taken
from the committed block instead of read back from the log; the log is read only for
entries nobody handed over (at start, or after a restart). Consensus' record check hands
over the image each valid record commits with ``checked``, so a record checked here is not
decoded again when it commits.

Which records are servable: every committed docker record whose statement matches it. The
catalog does not judge attestations again, because committing already did with the one
definition of who counts: consensus admits an artifact record only when the threshold of
the authorities in force at its log index (``ledger.authorities``) attest it, and every
attestation it carries is by one of them and attests the same image; so the first names
the image.

What it must never do: vouch for content no committed record covers, or read upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pyrsia_node import merkle
from pyrsia_node.attestation import AcquiredImage, AttestationError, parse_statement
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import ArtifactRecord, PackageType, RecordError, decode_record
from pyrsia_node.registry import ManifestRef, RepositoryName

log = logging.getLogger(__name__)

# Images of checked, not yet committed records kept for ``committed``: more than the
# records waiting in a saturated network's mempool (~20,000 in the consensus bench).
CHECKED_IMAGES = 1 << 15
# Log entries indexed per SQLite transaction.
INDEX_CHUNK = 10_000
SCHEMA_VERSION = 1


class CatalogError(Exception):
    """A committed artifact record does not describe an image the catalog can serve."""


def record_image(record: ArtifactRecord) -> AcquiredImage:
    """The image a committed docker record describes, from its first attestation.

    Raises ``CatalogError`` when the statement cannot be read or names another package or
    other artifacts than the record lists (consensus admits no such record; a log written
    by anything else may hold one)."""
    if record.package_type is not PackageType.DOCKER:
        raise CatalogError(f"{record.package_id}: not a docker record")
    try:
        image = parse_statement(record.attestations[0].payload).image
    except AttestationError as exc:
        raise CatalogError(f"{record.package_id}: unreadable attestation: {exc}") from exc
    if image.reference != record.package_id:
        raise CatalogError(
            f"{record.package_id}: its attestation describes {image.reference} instead"
        )
    if {a.digest for a in image.artifacts} != {a.digest for a in record.artifacts}:
        raise CatalogError(f"{record.package_id}: its attestation lists other artifacts")
    return image


class LedgerCatalog:
    """A ``registry.Catalog`` over the records of ``ledger``, indexed in the SQLite file
    ``path``; call ``refresh`` after every commit (and once at start: lookups before the
    first refresh find nothing). ``size`` is how many log entries are indexed."""

    def __init__(self, ledger: TransparencyLog, path: Path) -> None:
        self._ledger = ledger
        self._path = path
        self._writer: sqlite3.Connection | None = None
        # Lookups run in worker threads, one at a time on this connection.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._lock = asyncio.Lock()
        self._work: asyncio.Future[int] | None = None
        self._indexed = asyncio.Condition()
        # first log index -> the records consensus appended there, each with its image
        # when the record check handed it over (see `committed`).
        self._handed_over: dict[int, list[tuple[bytes, AcquiredImage | None]]] = {}
        # record bytes -> the image the record check found it commits (see `checked`).
        self._checked: OrderedDict[bytes, AcquiredImage] = OrderedDict()
        self.size = 0

    def checked(self, record: bytes, image: AcquiredImage) -> None:
        """Consensus' record check found that ``record`` commits ``image``
        (``build.check_artifact_record``); kept until the record commits, for at most the
        last ``CHECKED_IMAGES`` records."""
        self._checked[record] = image
        while len(self._checked) > CHECKED_IMAGES:
            self._checked.popitem(last=False)

    def committed(self, first: int, records: Sequence[bytes]) -> None:
        """``records`` were just appended to the log at index ``first`` on; the next
        ``refresh`` indexes them from these bytes (and the images ``checked`` kept for
        them) instead of reading them back."""
        entries = [(record, self._checked.pop(record, None)) for record in records]
        if records and first >= self.size:
            self._handed_over[first] = entries

    async def refresh(self) -> None:
        """Index the log entries appended since the last refresh, in log order, in a
        worker thread; ``size`` moves once they all are."""
        async with self._lock:
            # Shielded: a cancelled refresh's thread runs on, and `close` waits for it.
            self._work = asyncio.ensure_future(asyncio.to_thread(self._index_new_entries))
            self.size = await asyncio.shield(self._work)
            for first in [i for i in self._handed_over if i < self.size]:
                del self._handed_over[first]
        async with self._indexed:
            self._indexed.notify_all()

    async def wait_indexed(self, index: int) -> None:
        """Return once log entry ``index`` is indexed (bound it with a timeout)."""
        async with self._indexed:
            await self._indexed.wait_for(lambda: self.size > index)

    async def close(self) -> None:
        """Close the index, once the refresh under way (cancelled or not) has ended."""
        if self._work is not None:
            with contextlib.suppress(Exception):
                await self._work
        with self._read_lock:
            for db in (self._writer, self._reader):
                if db is not None:
                    db.close()
            self._writer = self._reader = None

    async def resolve(self, name: RepositoryName, reference: str) -> ManifestRef | None:
        if ":" in reference:  # a digest: no tag has a colon
            query = "SELECT digest, media_type, size FROM manifests WHERE repository=? AND digest=?"
        else:
            query = "SELECT digest, media_type, size FROM tags WHERE repository=? AND tag=?"
        rows = await asyncio.to_thread(self._read, query, (str(name), reference))
        return ManifestRef(*rows[0]) if rows else None

    async def tags(self, name: RepositoryName) -> Sequence[str] | None:
        query = "SELECT tag FROM tags WHERE repository=? ORDER BY tag"
        rows = await asyncio.to_thread(self._read, query, (str(name),))
        return [tag for (tag,) in rows] or None

    async def has_blob(self, name: RepositoryName, digest: str) -> bool:
        query = (
            "SELECT 1 FROM blobs WHERE repository=?1 AND digest=?2 "
            "UNION ALL SELECT 1 FROM manifests WHERE repository=?1 AND digest=?2 LIMIT 1"
        )
        return bool(await asyncio.to_thread(self._read, query, (str(name), digest)))

    # In worker threads ------------------------------------------------------------------

    def _read(self, query: str, parameters: tuple[str, ...]) -> list[tuple[Any, ...]]:
        with self._read_lock:
            if self._writer is None:
                return []  # not opened (checked, rebuilt) yet, or closed: nothing to find
            if self._reader is None:
                self._reader = _connect(self._path)
            return self._reader.execute(query, parameters).fetchall()

    def _index_new_entries(self) -> int:
        db = self._writer if self._writer is not None else self._open()
        start = _stored_size(db)
        end = self._ledger.size
        handed_over = dict(self._handed_over)  # `committed` adds to it meanwhile
        rows = _Rows()
        position = start
        for data, checked in self._entries(start, end, handed_over):
            image = checked or image_of(data)
            if image is not None:
                rows.add(image)
            position += 1
            if position % INDEX_CHUNK == 0 or position == end:
                rows.write(db, position, self._ledger.root(position))
                rows = _Rows()
        return end

    def _open(self) -> sqlite3.Connection:
        """The writer's connection to an index of a prefix of this log: the stored one when
        it is, else a rebuilt (empty) one."""
        try:
            db = _connect(self._path)
            try:
                _create(db)
                size, root = _stored_size(db), _stored_root(db)
            except sqlite3.DatabaseError:
                db.close()
                raise
        except sqlite3.DatabaseError as exc:
            log.warning(
                "catalog: %s is unreadable (%s); rebuilding it from the log", self._path, exc
            )
            for suffix in ("", "-wal", "-shm"):
                self._path.with_name(self._path.name + suffix).unlink(missing_ok=True)
            db = _connect(self._path)
            _create(db)
            size, root = 0, merkle.EMPTY_ROOT
        if size > self._ledger.size or self._ledger.root(size) != root:
            log.warning(
                "catalog: %s indexes %d entries of another log (this one holds %d); "
                "rebuilding it from this log",
                self._path,
                size,
                self._ledger.size,
            )
            with db:
                for table in ("tags", "manifests", "blobs"):
                    db.execute(f"DELETE FROM {table}")
                _store_position(db, 0, merkle.EMPTY_ROOT)
        self._writer = db
        return db

    def _entries(
        self,
        start: int,
        end: int,
        handed_over: dict[int, list[tuple[bytes, AcquiredImage | None]]],
    ) -> Iterator[tuple[bytes, AcquiredImage | None]]:
        """Entries ``[start, end)`` with the images handed over for them, from the blocks
        handed over where they cover whole spans, read from the log elsewhere."""
        firsts = sorted(i for i in handed_over if start <= i < end)
        index = start
        for first in firsts:
            records = handed_over[first]
            if first < index or first + len(records) > end:
                continue  # overlaps what was read, or reaches past the end: read instead
            if first > index:
                yield from ((data, None) for data in self._ledger.entries(index, first))
            yield from records
            index = first + len(records)
        if index < end:
            yield from ((data, None) for data in self._ledger.entries(index, end))


class _Rows:
    """The index rows of a run of images, in log order."""

    def __init__(self) -> None:
        self.tags: list[tuple[str, str, str, str, int]] = []
        self.manifests: list[tuple[str, str, str, int]] = []
        self.blobs: list[tuple[str, str]] = []

    def add(self, image: AcquiredImage) -> None:
        repository = str(RepositoryName(image.registry, image.repository))
        root = image.root
        self.tags.append((repository, image.tag, root.digest, root.media_type, root.size))
        for manifest in (root, *image.manifests):
            self.manifests.append((repository, manifest.digest, manifest.media_type, manifest.size))
        self.blobs.extend((repository, blob.digest) for blob in image.blobs)

    def write(self, db: sqlite3.Connection, size: int, root: bytes) -> None:
        """Store the rows and the new position (``size`` entries, the log's ``root`` at
        that size) in one transaction. A later image's tag and manifest rows replace
        earlier ones: the latest committed record of a package id names its tag."""
        with db:
            db.executemany("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)", self.tags)
            db.executemany("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)", self.manifests)
            db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?)", self.blobs)
            _store_position(db, size, root)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags (
    repository TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (repository, tag)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    repository TEXT NOT NULL, digest TEXT NOT NULL,
    media_type TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (repository, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    repository TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repository, digest)) WITHOUT ROWID;
"""


def _connect(path: Path) -> sqlite3.Connection:
    # WAL: lookups read while a refresh writes. synchronous=NORMAL: a power cut may lose
    # the last transactions, never consistency, and a lost one is redone from the log.
    db = sqlite3.connect(path, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _create(db: sqlite3.Connection) -> None:
    with db:
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('size', 0)")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('root', ?)", (merkle.EMPTY_ROOT,))
    (schema,) = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if schema != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema {schema!r}, expected {SCHEMA_VERSION}")


def _stored_size(db: sqlite3.Connection) -> int:
    (size,) = db.execute("SELECT value FROM meta WHERE key='size'").fetchone()
    if not isinstance(size, int):
        raise sqlite3.DatabaseError(f"meta.size is {size!r}")
    return size


def _stored_root(db: sqlite3.Connection) -> bytes:
    (root,) = db.execute("SELECT value FROM meta WHERE key='root'").fetchone()
    if not isinstance(root, bytes):
        raise sqlite3.DatabaseError(f"meta.root is {root!r}")
    return root


def _store_position(db: sqlite3.Connection, size: int, root: bytes) -> None:
    db.execute("UPDATE meta SET value=? WHERE key='size'", (size,))
    db.execute("UPDATE meta SET value=? WHERE key='root'", (root,))


def image_of(data: bytes) -> AcquiredImage | None:
    """The image a committed docker record describes; None (logged) for other records."""
    try:
        record = decode_record(data)
    except RecordError as exc:
        log.warning("catalog: skipping an undecodable committed record: %s", exc)
        return None
    if not isinstance(record, ArtifactRecord):
        return None
    try:
        return record_image(record)
    except CatalogError as exc:
        log.warning("catalog: skipping a committed record: %s", exc)
        return None
