"""The registry's view of the transparency log: which images are committed.

``LedgerCatalog`` implements ``registry.Catalog`` over committed docker artifact records.
Each record carries the authorities' attestations; the image it describes (tag, root
manifest or index, platform manifests, blobs) is rebuilt from its first attestation's
in-toto statement. A tag resolves to the image of the latest committed record of its
package id; a digest resolves when any committed record of that repository covers it.

The index is held in memory and brought up to date by ``refresh`` (once at start, then from
consensus' commit hook), which indexes only the entries appended since the last refresh; a
pull never scans the log. The commit hook hands over each block's records with
``committed``, so entries are taken from the committed block instead of read back from the
log; the log is read only for entries nobody handed over (at start, or after a restart).
Consensus' record check hands over the image each valid record commits with ``checked``,
so a record checked here is not decoded again when it commits.

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
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from pyrsia_node.attestation import AcquiredImage, AttestationError, parse_statement
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import ArtifactRecord, PackageType, RecordError, decode_record
from pyrsia_node.registry import ImageCatalog, ManifestRef, RepositoryName

log = logging.getLogger(__name__)

# Images of checked, not yet committed records kept for ``committed``: more than the
# records waiting in a saturated network's mempool (~20,000 in the consensus bench).
CHECKED_IMAGES = 1 << 15
ADD_SLICE = 256


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
    """A ``registry.Catalog`` over the records of ``ledger``; call ``refresh`` after every
    commit (and once at start). ``size`` is how many log entries are indexed."""

    def __init__(self, ledger: TransparencyLog) -> None:
        self._ledger = ledger
        self._images = ImageCatalog()
        self._lock = asyncio.Lock()
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
        """Index the log entries appended since the last refresh, in log order.

        Reading and decoding runs in a worker thread; the index changes only on the event
        loop, an image at a time, so lookups never see one half-added. The event loop runs
        other work every ``ADD_SLICE`` images (a block of a thousand records took ~13 ms
        to add, which held up consensus on the same loop)."""
        async with self._lock:
            start = self.size
            images, end = await asyncio.to_thread(self._read_from, start)
            for done, image in enumerate(images, 1):
                self._images.add(image)
                if done % ADD_SLICE == 0:
                    await asyncio.sleep(0)
            self.size = end
            for first in [i for i in self._handed_over if i < end]:
                del self._handed_over[first]
        async with self._indexed:
            self._indexed.notify_all()

    async def wait_indexed(self, index: int) -> None:
        """Return once log entry ``index`` is indexed (bound it with a timeout)."""
        async with self._indexed:
            await self._indexed.wait_for(lambda: self.size > index)

    def _read_from(self, start: int) -> tuple[list[AcquiredImage], int]:
        end = self._ledger.size
        images = []
        for data, checked in self._entries(start, end):
            image = checked or image_of(data)
            if image is not None:
                images.append(image)
        return images, end

    def _entries(self, start: int, end: int) -> Iterator[tuple[bytes, AcquiredImage | None]]:
        index = start
        while index < end:
            records = self._handed_over.get(index)
            if records is not None and index + len(records) <= end:
                yield from records
                index += len(records)
            else:
                yield self._ledger.entry(index), None
                index += 1

    async def resolve(self, name: RepositoryName, reference: str) -> ManifestRef | None:
        return await self._images.resolve(name, reference)

    async def tags(self, name: RepositoryName) -> Sequence[str] | None:
        return await self._images.tags(name)

    async def has_blob(self, name: RepositoryName, digest: str) -> bool:
        return await self._images.has_blob(name, digest)


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
