"""The durable log: append, proofs, lookups, checkpoints storage, and crash safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pyrsia_node import merkle
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote, sign
from pyrsia_node.ledger.log import EntryNotFound, LogError, LogLocked, TransparencyLog
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


def test_integrity_check_detects_a_tampered_node(tmp_path: Path) -> None:
    import sqlite3

    with TransparencyLog(tmp_path) as log:
        log.append([record(i) for i in range(8)])
    db = sqlite3.connect(tmp_path / "log.sqlite3")
    db.execute("UPDATE nodes SET hash = ? WHERE level = 2 AND pos = 1", (bytes(32),))
    db.commit()
    db.close()
    with TransparencyLog(tmp_path) as log, pytest.raises(LogError, match="tree nodes"):
        log.verify_integrity()


WRITER_LOOP = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from pyrsia_node.ledger.log import TransparencyLog

    log = TransparencyLog(Path(sys.argv[1]))
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
    the log); after each, the reopened log holds exactly the last committed batch, every
    entry intact, and proofs against the previous state verify."""
    directory = tmp_path / "ledger"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1234)
    expected = merkle.MemoryTree()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    deadline = time.monotonic() + 90
    kills_while_writing = 0
    for attempt in range(120):
        assert time.monotonic() < deadline, "crash test exceeded its time budget"
        before = expected.size
        proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), str(attempt)],
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
            if attempt % 20 == 19:
                log.verify_integrity()
    assert expected.size > 0
    assert kills_while_writing >= 20, "too few kills landed inside an append"
