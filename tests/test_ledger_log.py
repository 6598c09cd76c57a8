"""The durable log: append, proofs, lookups, checkpoints storage, and crash safety."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pyrsia_node import merkle
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import log as log_module
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote, sign
from pyrsia_node.ledger.log import (
    EntryNotFound,
    LogCorrupted,
    LogError,
    LogLocked,
    TransparencyLog,
    tree_length,
    tree_position,
)
from pyrsia_node.ledger.records import GovernanceAction, GovernanceRecord, RecordError

# Shared verbatim with the writer subprocess, which must not import pytest (start-up time).
RECORD_SOURCE = textwrap.dedent(
    """
    from pyrsia_node.ledger.records import (
        IN_TOTO_PAYLOAD_TYPE, Artifact, ArtifactRecord, DsseEnvelope, PackageType,
    )

    ENVELOPE = DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, b"{}", (("authority-0", b"s" * 64),))


    def record(i):
        tag = f"v{i}" if i % 3 else "latest"
        return ArtifactRecord(
            PackageType.DOCKER,
            f"docker.io/library/pkg{i % 7}:{tag}",
            (Artifact(f"sha256:{i:064x}", i, "application/vnd.oci.image.manifest.v1+json"),),
            (ENVELOPE,),
        ).encode()
    """
)
_namespace: dict[str, Any] = {}
exec(RECORD_SOURCE, _namespace)


def record(i: int) -> bytes:
    """Record ``i`` of a test log: seven packages, each with many versions."""
    value: bytes = _namespace["record"](i)
    return value


@pytest.fixture
def log(tmp_path: Path) -> TransparencyLog:
    return TransparencyLog(tmp_path / "ledger")


def test_empty_log_has_the_empty_root(log: TransparencyLog) -> None:
    assert log.size == 0
    assert log.root() == merkle.EMPTY_ROOT


def test_append_returns_first_index_and_grows_the_tree(log: TransparencyLog) -> None:
    assert log.append([record(0), record(1), record(2)]) == 0
    assert log.append([record(3)]) == 3
    assert log.size == 4
    assert log.entry(2) == record(2)
    assert log.root() == merkle.root_hash([merkle.leaf_hash(record(i)) for i in range(4)])


def test_empty_batch_changes_nothing(log: TransparencyLog) -> None:
    log.append([record(0)])
    assert log.append([]) == 1
    assert log.size == 1


def test_non_canonical_record_is_rejected_and_nothing_is_written(log: TransparencyLog) -> None:
    with pytest.raises(RecordError):
        log.append([record(0), b"\x01\x01garbage"])
    assert log.size == 0


def test_proofs_from_storage_verify_for_every_index_and_size(log: TransparencyLog) -> None:
    for start in range(0, 70, 9):
        log.append([record(i) for i in range(start, min(start + 9, 70))])
    roots = [log.root(n) for n in range(71)]
    leaves = [merkle.leaf_hash(record(i)) for i in range(70)]
    for size in range(71):
        assert roots[size] == merkle.root_hash(leaves[:size])
        for index in range(size):
            proof = log.inclusion_proof(index, size)
            merkle.verify_inclusion(leaves[index], index, size, proof, roots[size])
        for size1 in range(size + 1):
            proof = log.consistency_proof(size1, size)
            merkle.verify_consistency(size1, size, proof, roots[size1], roots[size])


def test_state_survives_reopening(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path) as first:
        first.append([record(i) for i in range(11)])
        root = first.root()
    with TransparencyLog(tmp_path) as again:
        assert again.size == 11
        assert again.root() == root
        again.append([record(11)])
        again.verify_integrity()


def test_second_open_of_the_same_directory_is_refused(log: TransparencyLog) -> None:
    with pytest.raises(LogLocked, match="another process"):
        TransparencyLog(log.directory)


def test_lookup_by_record_hash_returns_the_first_index(log: TransparencyLog) -> None:
    log.append([record(0), record(1), record(0)])
    assert log.index_of(merkle.leaf_hash(record(1))) == 1
    assert log.index_of(merkle.leaf_hash(record(0))) == 0
    with pytest.raises(EntryNotFound, match="no record"):
        log.index_of(merkle.leaf_hash(b"nothing"))


def test_search_by_package_id_returns_latest_first(log: TransparencyLog) -> None:
    log.append([record(i) for i in range(60)])
    found = log.find_package("docker.io/library/pkg3:latest")
    assert found == sorted((i for i in range(60) if i % 7 == 3 and i % 3 == 0), reverse=True)
    assert log.find_package("docker.io/library/pkg3:latest", limit=1) == found[:1]
    assert log.find_package("docker.io/library/pkg3:latest", before=found[0]) == found[1:]
    assert log.find_package("docker.io/library/none:1") == []


def test_records_appended_as_checked_are_indexed_like_any_other(tmp_path: Path) -> None:
    governance = GovernanceRecord.create(
        Identity.generate(), "c", 1, GovernanceAction.REMOVE, "authority-3", bytes(32)
    ).encode()
    batch = [record(i) for i in range(20)] + [governance]
    with TransparencyLog(tmp_path / "checked") as checked:
        checked.append(batch, checked=True)
        checked.verify_integrity()
        with TransparencyLog(tmp_path / "plain") as plain:
            plain.append(batch)
            assert checked.root() == plain.root()
            for package in ("docker.io/library/pkg3:latest", "docker.io/library/pkg5:v5"):
                assert checked.find_package(package) == plain.find_package(package)
            assert checked.governance_indexes() == plain.governance_indexes() == [20]


def test_governance_records_are_logged_but_not_indexed_as_packages(log: TransparencyLog) -> None:
    governance = Identity.generate()
    change = GovernanceRecord.create(
        governance, "c", 1, GovernanceAction.REMOVE, "authority-3", bytes(32)
    )
    log.append([change.encode(), record(1)])
    assert log.entry(0) == change.encode()
    assert log.find_package("docker.io/library/pkg1:v1") == [1]


def test_out_of_range_requests_raise_entry_not_found(log: TransparencyLog) -> None:
    log.append([record(0), record(1)])
    with pytest.raises(EntryNotFound):
        log.entry(2)
    with pytest.raises(EntryNotFound):
        log.inclusion_proof(2, 2)
    with pytest.raises(EntryNotFound):
        log.inclusion_proof(0, 3)
    with pytest.raises(EntryNotFound):
        log.consistency_proof(2, 1)
    with pytest.raises(EntryNotFound):
        log.root(3)


def test_checkpoints_are_stored_only_for_this_logs_roots(log: TransparencyLog) -> None:
    log.append([record(i) for i in range(5)])
    key = Identity.generate()
    good = Checkpoint("pyrsia.io/test", 3, log.root(3))
    note = SignedNote(good.body(), (sign(good, "authority-0", key),)).format()
    assert log.put_checkpoint(note) == good
    assert log.latest_checkpoint() == note
    assert log.checkpoint(3) == note
    assert log.checkpoint(4) is None
    bad = Checkpoint("pyrsia.io/test", 4, log.root(3))
    with pytest.raises(LogError, match="not this log's root"):
        log.put_checkpoint(SignedNote(bad.body(), (sign(bad, "authority-0", key),)).format())
    beyond = Checkpoint("pyrsia.io/test", 6, log.root(3))
    with pytest.raises(EntryNotFound):
        log.put_checkpoint(SignedNote(beyond.body(), (sign(beyond, "a", key),)).format())


def test_tree_positions_follow_the_append_order() -> None:
    """tree.dat holds each perfect subtree at tree_position(level, index), written in the
    order appends complete them: every size's file is the previous one plus new hashes."""
    written: list[tuple[int, int]] = []
    for size in range(1, 200):
        index, level = size - 1, 0
        written.append((0, index))
        while (index >> level) & 1:
            level += 1
            written.append((level, index >> level))
        assert len(written) == tree_length(size)
    assert [tree_position(level, index) for level, index in written] == list(range(len(written)))


def test_integrity_check_detects_a_tampered_node(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path) as log:
        log.append([record(i) for i in range(8)])
    with open(tmp_path / "tree.dat", "r+b") as tree:
        tree.seek(tree_position(2, 1) * 32)
        tree.write(bytes(32))
    with TransparencyLog(tmp_path) as log, pytest.raises(LogCorrupted, match="tree nodes"):
        log.verify_integrity()


def test_integrity_check_detects_a_damaged_lookup_index(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path, index_batch=4) as log:
        log.append([record(i) for i in range(8)])
        log.wait_for_indexes()
    db = sqlite3.connect(tmp_path / "log.sqlite3")
    db.execute("DELETE FROM leaf_index WHERE idx = 5")
    db.commit()
    db.close()
    with TransparencyLog(tmp_path) as log, pytest.raises(LogCorrupted, match="record-hash"):
        log.verify_integrity()


def test_bytes_past_the_committed_size_are_cut_on_open(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path) as log:
        log.append([record(i) for i in range(5)])
        root = log.root()
    for name in ("records.dat", "offsets.dat", "tree.dat"):
        with open(tmp_path / name, "ab") as f:
            f.write(b"\xff" * 100)  # what a writer killed before its commit leaves
    with TransparencyLog(tmp_path) as log:
        assert log.size == 5
        assert log.root() == root
        log.append([record(5)])
        log.verify_integrity()


def test_a_torn_commit_record_leaves_the_previous_one(tmp_path: Path) -> None:
    """Commit records alternate between two checksummed slots: damaging the newest (a
    write torn by a power cut) gives back the batch before it, whose bytes are intact."""
    with TransparencyLog(tmp_path) as log:
        log.append([record(0), record(1)])
        root = log.root()
        log.append([record(2)])
    raw = bytearray((tmp_path / "commit.dat").read_bytes())
    newest = max(range(2), key=lambda slot: int.from_bytes(raw[slot * 32 : slot * 32 + 8]))
    raw[newest * 32 + 12] ^= 1
    (tmp_path / "commit.dat").write_bytes(bytes(raw))
    with TransparencyLog(tmp_path) as log:
        assert log.size == 2
        assert log.root() == root
        log.append([record(2)])
        log.verify_integrity()
    (tmp_path / "commit.dat").write_bytes(bytes(64))
    with pytest.raises(LogCorrupted, match="no intact commit record"):
        TransparencyLog(tmp_path)


def test_a_log_from_before_the_commit_file_keeps_its_size(tmp_path: Path) -> None:
    """Logs whose commit point was the SQLite row meta.size open at that size."""
    with TransparencyLog(tmp_path, index_batch=4) as log:
        log.append([record(i) for i in range(6)])
        root = log.root()
    db = sqlite3.connect(tmp_path / "log.sqlite3")
    db.execute("UPDATE meta SET value = 6 WHERE key = 'size'")
    db.commit()
    db.close()
    (tmp_path / "commit.dat").unlink()
    with TransparencyLog(tmp_path) as log:
        assert log.size == 6
        assert log.root() == root
        log.verify_integrity()


def test_a_data_file_shorter_than_the_committed_size_is_corruption(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path) as log:
        log.append([record(i) for i in range(5)])
    os.truncate(tmp_path / "records.dat", 10)
    with pytest.raises(LogCorrupted, match=r"records\.dat"):
        TransparencyLog(tmp_path)


def test_lookups_span_the_flushed_indexes_and_the_pending_entries(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path, index_batch=20) as log:
        for start in range(0, 57, 8):
            log.append([record(i) for i in range(start, min(start + 8, 57))])
        log.append([record(3)])  # a second copy: lookups still give the first index
        assert log.index_of(merkle.leaf_hash(record(3))) == 3
        assert log.index_of(merkle.leaf_hash(record(50))) == 50
        package = "docker.io/library/pkg3:latest"
        expected = [57, *sorted((i for i in range(57) if i % 7 == 3 and i % 3 == 0), reverse=True)]
        assert log.find_package(package) == expected
        assert log.find_package(package, limit=2, before=50) == [i for i in expected if i < 50][:2]
        log.verify_integrity()
    with TransparencyLog(tmp_path) as again:
        assert again.index_of(merkle.leaf_hash(record(50))) == 50
        assert again.find_package(package) == expected
        again.verify_integrity()


def test_batched_lookups_agree_with_one_lookup_per_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`indexes_of` over hashes in SQLite, in memory, repeated, copied twice in the log and
    absent, across more than one statement's worth (chunk of 4 here): the same first indexes
    `index_of` gives, nothing for the absent ones."""
    monkeypatch.setattr(log_module, "_LOOKUP_CHUNK", 4)
    with TransparencyLog(tmp_path, index_batch=10) as log:
        log.append([record(i) for i in range(23)])
        log.wait_for_indexes()  # all in SQLite; the copies below stay in memory
        # Copies of 5 and 21 (their first index stays the one in SQLite) and 23, only here.
        log.append([record(5), record(21), record(23)])
        hashes = [merkle.leaf_hash(record(i)) for i in (22, 0, 5, 9, 21, 5, 17, 23)]
        absent = [merkle.leaf_hash(b"nothing %d" % i) for i in range(6)]
        found = log.indexes_of(hashes + absent)
        assert found == {h: log.index_of(h) for h in hashes}
        assert [found[h] for h in hashes] == [22, 0, 5, 9, 21, 5, 17, 25]
        assert log.indexes_of([]) == {}
        assert log.indexes_of(absent[:1]) == {}


def test_lookups_are_right_at_every_moment_of_background_flushes(tmp_path: Path) -> None:
    """A reader thread checks lookups of every committed entry while the writer appends and
    the index writer moves entries from memory to SQLite in small slices."""
    errors: list[BaseException] = []
    stop = threading.Event()
    with TransparencyLog(tmp_path, index_batch=16, index_chunk=3) as log:

        def reader() -> None:
            rng = random.Random(5)
            try:
                while not stop.is_set():
                    size = log.size
                    if not size:
                        continue
                    index = rng.randrange(size)
                    assert log.index_of(merkle.leaf_hash(record(index))) == index
                    tag = f"v{index}" if index % 3 else "latest"
                    found = log.find_package(f"docker.io/library/pkg{index % 7}:{tag}", limit=size)
                    assert index in found
                    assert found == sorted(found, reverse=True)
                    assert len(found) == len(set(found))
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for start in range(0, 600, 5):
                log.append([record(i) for i in range(start, start + 5)])
        finally:
            stop.set()
            thread.join()
        assert not errors, errors
        log.verify_integrity()
        log.wait_for_indexes()
        assert log.find_package("docker.io/library/pkg3:latest", limit=1000) == sorted(
            (i for i in range(600) if i % 7 == 3 and i % 3 == 0), reverse=True
        )
        log.verify_integrity()


def test_a_failed_index_flush_keeps_lookups_right_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with TransparencyLog(tmp_path, index_batch=4, index_chunk=2) as log:
        log._db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON leaf_index BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        log.append([record(i) for i in range(8)])
        deadline = time.monotonic() + 10
        while "will retry" not in caplog.text:
            assert time.monotonic() < deadline, "the index writer did not try"
            time.sleep(0.01)
        log.append([record(i) for i in range(8, 10)])
        assert [log.index_of(merkle.leaf_hash(record(i))) for i in range(10)] == list(range(10))
        assert log.find_package("docker.io/library/pkg3:latest") == [3]
        log._db.execute("DROP TRIGGER refuse")
        log.wait_for_indexes()
        log.verify_integrity()
        assert log.index_of(merkle.leaf_hash(record(9))) == 9
    with sqlite3.connect(tmp_path / "log.sqlite3") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'indexed'").fetchone() == (10,)


def test_package_search_survives_colliding_index_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package index is keyed by 64 bits of the id's hash; a collision someone made on
    purpose must not mix packages, so every hit is checked against its record."""
    monkeypatch.setattr(log_module, "_package_key", lambda package_id: 7)
    with TransparencyLog(tmp_path, index_batch=10) as log:
        log.append([record(i) for i in range(30)])
        assert log.find_package("docker.io/library/pkg2:v2") == [2]
        assert log.find_package("docker.io/library/pkg3:latest", limit=2) == [24, 3]
        log.verify_integrity()


def test_governance_records_are_indexed_by_position(log: TransparencyLog) -> None:
    governance = Identity.generate()
    changes = [
        GovernanceRecord.create(governance, "c", n, GovernanceAction.REMOVE, "a", bytes(32))
        for n in (1, 2)
    ]
    log.append([record(0), changes[0].encode(), record(2)])
    log.append([changes[1].encode()])
    assert log.governance_indexes() == [1, 3]
    assert log.governance_indexes(3) == [1]
    with pytest.raises(EntryNotFound):
        log.governance_indexes(5)


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE entries (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX entries_by_leaf ON entries (leaf);
CREATE TABLE nodes (
    level INTEGER NOT NULL, pos INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY (level, pos)) WITHOUT ROWID;
CREATE TABLE packages (
    package_id TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (package_id, idx)) WITHOUT ROWID;
CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', 1);
"""


def test_a_schema_1_log_is_migrated_on_open(tmp_path: Path) -> None:
    """Logs written before the data files existed keep their entries and checkpoints."""
    records = [record(i) for i in range(23)]
    reference = merkle.MemoryTree([merkle.leaf_hash(r) for r in records])
    checkpoint = Checkpoint("pyrsia.io/test", 20, reference.root(20))
    note = SignedNote(checkpoint.body(), (sign(checkpoint, "a", Identity.generate()),)).format()
    db = sqlite3.connect(tmp_path / "log.sqlite3")
    db.executescript(SCHEMA_1)
    db.executemany(
        "INSERT INTO entries VALUES (?, ?, ?)",
        [(i, merkle.leaf_hash(r), r) for i, r in enumerate(records)],
    )
    db.execute("INSERT INTO checkpoints VALUES (20, ?)", (note,))
    db.commit()
    db.close()
    with TransparencyLog(tmp_path, index_batch=10) as log:
        assert log.size == 23
        assert log.root() == reference.root()
        assert log.entry(22) == records[22]
        assert log.checkpoint(20) == note
        assert log.find_package("docker.io/library/pkg1:v1") == [1]
        log.verify_integrity()
    tables = sqlite3.connect(tmp_path / "log.sqlite3").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'"
    )
    assert {"entries", "nodes"}.isdisjoint(name for (name,) in tables)


WRITER_LOOP = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from pyrsia_node.ledger.log import TransparencyLog

    # A small index batch and slices put index flushes (the background writer's
    # transactions) among the instants the kill can land on.
    log = TransparencyLog(Path(sys.argv[1]), index_batch=int(sys.argv[3]), index_chunk=7)
    rng = random.Random(int(sys.argv[2]))
    print("ready", log.size, flush=True)
    while True:
        end = log.size + rng.randint(1, 40)
        print("begin", end, flush=True)
        log.append([record(i) for i in range(log.size, end)])
        print("done", end, flush=True)
    """
)
WRITER = RECORD_SOURCE + WRITER_LOOP


@pytest.mark.slow
def test_writer_killed_at_random_points_leaves_a_whole_batch(tmp_path: Path) -> None:
    """SIGKILL a writer subprocess 120 times at random instants (some before it even opened
    the log, many inside an append: writing the data files, syncing them, committing the
    size, flushing the lookup indexes); after each, the reopened log holds exactly the last
    committed batch, every entry intact, lookups find them, and proofs against the previous
    state verify."""
    directory = tmp_path / "ledger"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1234)
    expected = merkle.MemoryTree()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    deadline = time.monotonic() + 180  # 41-59 s measured on 2 cores at load average 5-9
    kills_while_writing = 0
    for attempt in range(120):
        assert time.monotonic() < deadline, "crash test exceeded its time budget"
        before = expected.size
        proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), str(attempt), str(rng.randint(5, 60))],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        if attempt % 10 == 9:
            time.sleep(rng.uniform(0, 0.25))  # anywhere, including start-up and open
        else:
            assert proc.stdout.readline().split() == ["ready", str(before)]
            time.sleep(rng.uniform(0, 0.06))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        output = proc.stdout.read()
        proc.stdout.close()
        # The kill may cut the writer's last line short: only whole lines count.
        whole = output.split("\n")[:-1]
        lines = [line.split() for line in whole]
        assert all(len(fields) == 2 for fields in lines), output
        done = [int(v) for k, v in lines if k == "done"]
        begun = [int(v) for k, v in lines if k == "begin"]
        last_done = max(done, default=before)
        allowed = {last_done} | ({begun[-1]} if begun and begun[-1] > last_done else set())
        kills_while_writing += bool(begun and begun[-1] > last_done)

        with TransparencyLog(directory) as log:
            assert log.size in allowed, (log.size, allowed)
            for i in range(before, log.size):
                assert log.entry(i) == record(i)
                expected.append(merkle.leaf_hash(record(i)))
            assert log.root() == expected.root()
            merkle.verify_consistency(
                before,
                log.size,
                log.consistency_proof(before, log.size),
                expected.root(before),
                log.root(),
            )
            if log.size:
                index = rng.randrange(log.size)
                merkle.verify_inclusion(
                    merkle.leaf_hash(record(index)),
                    index,
                    log.size,
                    log.inclusion_proof(index),
                    log.root(),
                )
            if log.size:
                index = rng.randrange(log.size)
                assert log.index_of(merkle.leaf_hash(record(index))) == index
                tag = f"v{index}" if index % 3 else "latest"
                package = f"docker.io/library/pkg{index % 7}:{tag}"
                assert index in log.find_package(package, limit=log.size)
            if attempt % 10 == 9:
                log.verify_integrity()
    assert expected.size > 0
    assert kills_while_writing >= 20, "too few kills landed inside an append"


def test_index_flushes_come_sooner_while_the_index_is_small(tmp_path: Path) -> None:
    """`_flush_due`: an eighth of the entries indexed, between INDEX_BATCH_MIN and the
    log's `index_batch`; a smaller `index_batch` is the bound on its own."""
    with TransparencyLog(tmp_path / "default") as log:
        due = []
        for indexed in (0, 8 * 20_000, 8 * 10**7):
            log._indexed = indexed
            due.append(log._flush_due())
        log._indexed = 0
        assert due == [log_module.INDEX_BATCH_MIN, 20_000, log_module.INDEX_BATCH]
    with TransparencyLog(tmp_path / "small", index_batch=10) as log:
        for indexed in (0, 1_000_000):
            log._indexed = indexed
            assert log._flush_due() == 10
        log._indexed = 0
