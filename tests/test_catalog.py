"""The ledger-backed catalog over a real transparency log on disk."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import replace
from pathlib import Path

import pytest
from pyrsia_node import catalog as catalog_module
from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.catalog import CatalogError, LedgerCatalog, record_image
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.records import ArtifactRecord, GovernanceAction, GovernanceRecord
from pyrsia_node.registry import ImageCatalog, RepositoryName

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


def record_bytes(seen: AcquiredImage) -> bytes:
    keys = [Identity.generate() for _ in range(3)]
    envelopes = [attest(seen, "http://upstream.test/", NOW, k)[1] for k in keys]
    return artifact_record(seen, envelopes).encode()


@pytest.fixture
def ledger(tmp_path: Path) -> TransparencyLog:
    return TransparencyLog(tmp_path / "ledger")


async def test_a_committed_tag_resolves_with_its_blobs(ledger: TransparencyLog) -> None:
    ledger.append([record_bytes(image("1.0", root=100, layer=2))])
    catalog = LedgerCatalog(ledger)
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
    catalog = LedgerCatalog(ledger)
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
    catalog = LedgerCatalog(ledger)
    await catalog.refresh()
    assert catalog.size == 3
    assert await catalog.tags(ALPINE) == ["1.0"]
    with pytest.raises(CatalogError, match=re.escape("describes docker.io/library/alpine:1.0")):
        record_image(lying)


async def test_wait_indexed_returns_once_the_entry_is_indexed(ledger: TransparencyLog) -> None:
    catalog = LedgerCatalog(ledger)
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
    catalog = LedgerCatalog(ledger)
    await catalog.refresh()
    later = [record_bytes(image("2.0", root=101, layer=3))]
    ledger.append(later)
    catalog.committed(1, later)

    def no_reads(index: int) -> bytes:
        raise AssertionError(f"log entry {index} read back")

    monkeypatch.setattr(ledger, "entry", no_reads)
    await catalog.refresh()
    ref = await catalog.resolve(ALPINE, "2.0")
    assert ref is not None and ref.digest == digest(101)
    assert catalog.size == 2


async def test_entries_not_handed_over_are_read_from_the_log(ledger: TransparencyLog) -> None:
    catalog = LedgerCatalog(ledger)
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
    catalog = LedgerCatalog(ledger)
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
    catalog = LedgerCatalog(ledger)
    older, newer = image("1.0", root=100, layer=2), image("2.0", root=101, layer=3)
    records = [record_bytes(older), record_bytes(newer)]
    catalog.checked(records[0], older)
    catalog.checked(records[1], newer)
    ledger.append(records)
    catalog.committed(0, records)
    await catalog.refresh()
    assert (await catalog.tags(ALPINE)) == ["1.0", "2.0"]


async def test_a_large_refresh_lets_the_event_loop_run_between_slices(
    ledger: TransparencyLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Indexing a block of many images yields every ADD_SLICE images (consensus runs on the
    same loop); every image is indexed in the end, and the size moves only at the end."""
    monkeypatch.setattr(catalog_module, "ADD_SLICE", 4)
    catalog = LedgerCatalog(ledger)
    seen = [image(f"v{i}", root=200 + i, layer=2) for i in range(10)]
    records = [record_bytes(s) for s in seen]
    for data, s in zip(records, seen, strict=True):
        catalog.checked(data, s)
    ledger.append(records)
    catalog.committed(0, records)
    ticks = 0
    at_add: list[tuple[int, int]] = []  # (ticks of the other task, catalog size) per image
    add = ImageCatalog.add

    def counting_add(self: ImageCatalog, image: AcquiredImage) -> None:
        at_add.append((ticks, catalog.size))
        add(self, image)

    monkeypatch.setattr(ImageCatalog, "add", counting_add)

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    await catalog.refresh()
    other.cancel()
    # Three slices (4 + 4 + 2 images): the other task ran between them, not within one.
    assert [t for t, _ in at_add] == [at_add[0][0]] * 4 + [at_add[4][0]] * 4 + [at_add[8][0]] * 2
    assert at_add[0][0] < at_add[4][0] < at_add[8][0]
    assert {size for _, size in at_add} == {0} and catalog.size == 10
    assert (await catalog.tags(ALPINE)) == sorted(f"v{i}" for i in range(10))
