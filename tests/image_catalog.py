"""An in-memory ``registry.Catalog`` for the registry's tests: the images a test commits
are given to it directly (``add``), with the semantics of the node's ``LedgerCatalog``
(tests/test_catalog.py checks the ledger-backed one against it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyrsia_node.attestation import AcquiredImage
from pyrsia_node.registry import ManifestRef, RepositoryName


@dataclass(slots=True)
class ImageCatalog:
    """A ``Catalog`` over committed ``AcquiredImage`` values, held in memory.

    The owner feeds it every image whose record committed (``add``); a later commit for
    the same tag moves the tag. Content stays reachable by digest.
    """

    _tags: dict[RepositoryName, dict[str, ManifestRef]] = field(default_factory=dict)
    _manifests: dict[RepositoryName, dict[str, ManifestRef]] = field(default_factory=dict)
    _blobs: dict[RepositoryName, set[str]] = field(default_factory=dict)

    def add(self, image: AcquiredImage) -> None:
        name = RepositoryName(image.registry, image.repository)
        root = ManifestRef(image.root.digest, image.root.media_type, image.root.size)
        self._tags.setdefault(name, {})[image.tag] = root
        manifests = self._manifests.setdefault(name, {})
        manifests[root.digest] = root
        for m in image.manifests:
            manifests[m.digest] = ManifestRef(m.digest, m.media_type, m.size)
        self._blobs.setdefault(name, set()).update(b.digest for b in image.blobs)

    async def resolve(self, name: RepositoryName, reference: str) -> ManifestRef | None:
        if ":" in reference:  # a digest: no tag has a colon
            return self._manifests.get(name, {}).get(reference)
        return self._tags.get(name, {}).get(reference)

    async def tags(self, name: RepositoryName) -> Sequence[str] | None:
        tags = self._tags.get(name)
        return None if tags is None else sorted(tags)

    async def has_blob(self, name: RepositoryName, digest: str) -> bool:
        return digest in self._blobs.get(name, ()) or digest in self._manifests.get(name, {})
