"""The ledger-backed catalog over a real transparency log on disk."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import re
import sys
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pyrsia_node import attestation as attestation_module
from pyrsia_node import catalog as catalog_module
from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.catalog import CatalogError, LedgerCatalog, record_image
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.records import ArtifactRecord, GovernanceAction, GovernanceRecord
from pyrsia_node.registry import RepositoryName

NOW = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
ALPINE = RepositoryName("docker.io", "library/alpine")


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def image(tag: str, root: int, layer: int, repository: str = "library/alpine") -> AcquiredImage:
    return AcquiredImage(
        "docker.io",
        repository,
        tag,
        Artifact(digest(root), 300, "application/vnd.oci.image.manifest.v1+json"),
        (),
        (
            Artifact(digest(1), 10, "application/vnd.oci.image.config.v1+json"),
            Artifact(digest(layer), 99, "application/vnd.oci.image.layer.v1.tar+gzip"),
        ),
    )


def record_bytes(seen: AcquiredImage, keys: list[Identity] | None = None) -> bytes:
    keys = keys or [Identity.generate() for _ in range(3)]
    envelopes = [attest(seen, "http://upstream.test/", NOW, k)[1] for k in keys]
    return artifact_record(seen, envelopes).encode()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[TransparencyLog]:
    with TransparencyLog(tmp_path / "ledger") as log:
        yield log


def catalog_of(ledger: TransparencyLog) -> LedgerCatalog:
    """The catalog of ``ledger`` with its index beside it, as a node keeps them."""
    return LedgerCatalog(ledger, ledger.directory.parent / "catalog.sqlite3")


async def test_a_committed_tag_resolves_with_its_blobs(ledger: TransparencyLog) -> None:
    ledger.append([record_bytes(image("1.0", root=100, layer=2))])
    catalog = catalog_of(ledger)
    await catalog.refresh()
    ref = await catalog.resolve(ALPINE, "1.0")
    assert ref is not None and ref.digest == digest(100) and ref.size == 300
    assert await catalog.resolve(ALPINE, digest(100)) == ref
    assert await catalog.has_blob(ALPINE, digest(2))
    assert await catalog.tags(ALPINE) == ["1.0"]
    assert await catalog.resolve(ALPINE, "2.0") is None
    other = RepositoryName("docker.io", "library/busybox")
    assert not await catalog.has_blob(other, digest(2))
    assert await catalog.tags(other) is None


async def test_a_later_commit_moves_the_tag_and_old_digests_stay(ledger: TransparencyLog) -> None:
    catalog = catalog_of(ledger)
    ledger.append([record_bytes(image("1.0", root=100, layer=2))])
    await catalog.refresh()
    ledger.append([record_bytes(image("1.0", root=101, layer=3))])
    await catalog.refresh()
    ref = await catalog.resolve(ALPINE, "1.0")
    assert ref is not None and ref.digest == digest(101)
    assert await catalog.resolve(ALPINE, digest(100)) is not None
    assert await catalog.has_blob(ALPINE, digest(2))
    assert catalog.size == 2


async def test_governance_and_unreadable_records_are_skipped(ledger: TransparencyLog) -> None:
    governance = GovernanceRecord.create(
        Identity.generate(), "chain", 1, GovernanceAction.ADD, "authority-9",
        Identity.generate().public_key, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3",
    )  # fmt: skip
    good = image("1.0", root=100, layer=2)
    lying = ArtifactRecord.decode(record_bytes(good))
    lying = replace(lying, package_id="docker.io/library/alpine:9.9")
    ledger.append([governance.encode(), lying.encode(), record_bytes(good)])
    catalog = catalog_of(ledger)
    await catalog.refresh()
    assert catalog.size == 3
    assert await catalog.tags(ALPINE) == ["1.0"]
    with pytest.raises(CatalogError, match=re.escape("describes docker.io/library/alpine:1.0")):
        record_image(lying)


async def test_wait_indexed_returns_once_the_entry_is_indexed(ledger: TransparencyLog) -> None:
    catalog = catalog_of(ledger)
    await catalog.refresh()
    waiter = asyncio.create_task(catalog.wait_indexed(0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    ledger.append([record_bytes(image("1.0", root=100, layer=2))])
    await catalog.refresh()
    await asyncio.wait_for(waiter, 1)


async def test_records_handed_over_at_commit_are_indexed_without_reading_the_log(
    ledger: TransparencyLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = record_bytes(image("1.0", root=100, layer=2))
    ledger.append([first])
    catalog = catalog_of(ledger)
    await catalog.refresh()
    later = [record_bytes(image("2.0", root=101, layer=3))]
    ledger.append(later)
    catalog.committed(1, later)

    def no_reads(*index: int) -> bytes:
        raise AssertionError(f"log entries {index} read back")

    monkeypatch.setattr(ledger, "entry", no_reads)
    monkeypatch.setattr(ledger, "entries", no_reads)
    await catalog.refresh()
    ref = await catalog.resolve(ALPINE, "2.0")
    assert ref is not None and ref.digest == digest(101)
    assert catalog.size == 2


async def test_entries_not_handed_over_are_read_from_the_log(ledger: TransparencyLog) -> None:
    catalog = catalog_of(ledger)
    ledger.append([record_bytes(image("1.0", root=100, layer=2))])
    handed = [record_bytes(image("2.0", root=101, layer=3))]
    ledger.append(handed)
    catalog.committed(1, handed)
    await catalog.refresh()
    assert (await catalog.tags(ALPINE)) == ["1.0", "2.0"]
    assert catalog.size == 2


async def test_a_record_the_check_handed_over_is_indexed_without_decoding_it_again(
    ledger: TransparencyLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = image("1.0", root=100, layer=2)
    checked = [record_bytes(seen)]
    catalog = catalog_of(ledger)
    catalog.checked(checked[0], seen)
    ledger.append(checked)
    catalog.committed(0, checked)

    def no_decoding(data: bytes) -> None:
        raise AssertionError("a checked record decoded again")

    monkeypatch.setattr(catalog_module, "decode_record", no_decoding)
    await catalog.refresh()
    ref = await catalog.resolve(ALPINE, "1.0")
    assert ref is not None and ref.digest == digest(100)


async def test_only_the_latest_checked_images_are_kept(
    ledger: TransparencyLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "CHECKED_IMAGES", 1)
    catalog = catalog_of(ledger)
    older, newer = image("1.0", root=100, layer=2), image("2.0", root=101, layer=3)
    records = [record_bytes(older), record_bytes(newer)]
    catalog.checked(records[0], older)
    catalog.checked(records[1], newer)
    ledger.append(records)
    catalog.committed(0, records)
    await catalog.refresh()
    assert (await catalog.tags(ALPINE)) == ["1.0", "2.0"]


async def test_a_restarted_catalog_indexes_only_the_entries_appended_since(
    ledger: TransparencyLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.append([record_bytes(image(f"1.{i}", root=100 + i, layer=2)) for i in range(3)])
    first = catalog_of(ledger)
    await first.refresh()
    await first.close()
    ledger.append([record_bytes(image("2.0", root=200, layer=3))])
    read: list[tuple[int, int]] = []
    entries = ledger.entries

    def counting(start: int, end: int) -> Iterator[bytes]:
        read.append((start, end))
        return entries(start, end)

    monkeypatch.setattr(ledger, "entries", counting)
    restarted = catalog_of(ledger)
    await restarted.refresh()
    assert read == [(3, 4)]
    assert restarted.size == 4
    assert await restarted.tags(ALPINE) == ["1.0", "1.1", "1.2", "2.0"]
    ref = await restarted.resolve(ALPINE, "1.1")
    assert ref is not None and ref.digest == digest(101)
    await restarted.close()


async def other_log(directory: Path, *seen: AcquiredImage) -> TransparencyLog:
    other = TransparencyLog(directory)
    other.append([record_bytes(s) for s in seen])
    return other


@pytest.mark.parametrize("other_size", [1, 3], ids=["shorter", "longer"])
async def test_an_index_of_another_log_is_rebuilt_from_this_one(
    tmp_path: Path, other_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored root at the stored size is not this log's: whether the index is past
    this log's end or not, it is dropped and rebuilt, and serves nothing of the other."""
    path = tmp_path / "catalog.sqlite3"
    with TransparencyLog(tmp_path / "a") as a:
        a.append([record_bytes(image(f"a{i}", root=100 + i, layer=2)) for i in range(2)])
        catalog = LedgerCatalog(a, path)
        await catalog.refresh()
        await catalog.close()
    with TransparencyLog(tmp_path / "b") as b:
        b.append([record_bytes(image(f"b{i}", root=200 + i, layer=3)) for i in range(other_size)])
        catalog = LedgerCatalog(b, path)
        await catalog.refresh()
        assert await catalog.tags(ALPINE) == [f"b{i}" for i in range(other_size)]
        assert await catalog.resolve(ALPINE, digest(100)) is None
        assert not await catalog.has_blob(ALPINE, digest(2))
        assert catalog.size == other_size
        await catalog.close()
    assert "indexes 2 entries of another log" in caplog.text


async def test_an_unreadable_index_is_rebuilt_from_the_log(
    ledger: TransparencyLog, caplog: pytest.LogCaptureFixture
) -> None:
    ledger.append([record_bytes(image("1.0", root=100, layer=2))])
    catalog = catalog_of(ledger)
    (ledger.directory.parent / "catalog.sqlite3").write_bytes(b"not a database" * 100)
    await catalog.refresh()
    assert await catalog.tags(ALPINE) == ["1.0"]
    assert "is unreadable" in caplog.text
    await catalog.close()


KILLED_INDEXER = """
import asyncio, sys, time
from pathlib import Path
from pyrsia_node import catalog
from pyrsia_node.ledger import TransparencyLog

catalog.INDEX_CHUNK = 25
write = catalog._Rows.write

def write_slowly(self, db, size, root):
    write(self, db, size, root)
    print(size, flush=True)
    time.sleep(0.02)

catalog._Rows.write = write_slowly

async def main():
    with TransparencyLog(Path(sys.argv[1])) as ledger:
        await catalog.LedgerCatalog(ledger, Path(sys.argv[2])).refresh()

asyncio.run(main())
"""


async def test_a_catalog_killed_while_indexing_goes_on_from_its_last_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL part way through a first indexing: the index holds whole transactions of
    ``INDEX_CHUNK`` entries with their position, and the next refresh starts there."""
    seen = [image(f"v{i}", root=300 + i, layer=2) for i in range(300)]
    with TransparencyLog(tmp_path / "ledger") as ledger:
        ledger.append([record_bytes(s) for s in seen])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_INDEXER,
        str(tmp_path / "ledger"),
        str(tmp_path / "idx"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    written = 0
    while written < 100:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line, "the indexer ended before it was killed"
        written = int(line)
    child.kill()
    await asyncio.wait_for(child.wait(), 10)
    with TransparencyLog(tmp_path / "ledger") as ledger:
        starts: list[int] = []
        entries = ledger.entries

        def counting(start: int, end: int) -> Iterator[bytes]:
            starts.append(start)
            return entries(start, end)

        monkeypatch.setattr(ledger, "entries", counting)
        catalog = LedgerCatalog(ledger, tmp_path / "idx")
        await catalog.refresh()
        assert len(starts) == 1 and starts[0] % 25 == 0 and written <= starts[0] < 300
        assert catalog.size == 300
        assert await catalog.tags(ALPINE) == sorted(s.tag for s in seen)
        ref = await catalog.resolve(ALPINE, "v7")
        assert ref is not None and ref.digest == digest(307)
        await catalog.close()


async def test_the_catalog_keeps_no_memory_per_image(ledger: TransparencyLog) -> None:
    """The index is on disk: indexing thousands of images leaves (next to nothing) in
    memory; the in-memory index before it held ~1.1 KB per image."""
    key = [Identity.generate()]
    ledger.append([record_bytes(image(f"v{i}", root=1000 + i, layer=2), key) for i in range(3000)])
    catalog = catalog_of(ledger)
    attestation_module._parse_statement.cache_clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await catalog.refresh()
        attestation_module._parse_statement.cache_clear()  # parsed statements, not the index
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert await catalog.resolve(ALPINE, "v2999") is not None
    assert held < 300_000, f"{held} bytes held after indexing 3,000 images"
    await catalog.close()
