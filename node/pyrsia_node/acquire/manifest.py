"""What a manifest or index refers to: pure parsing of OCI and Docker v2 manifest JSON.

Accepts OCI image manifests and indexes and Docker schema 2 manifests and manifest lists;
rejects everything else (schema 1 is signed per registry and cannot be mirrored
byte-identically). Never performs I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pyrsia_node.acquire.errors import UnsupportedManifest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = IMAGE_MANIFESTS | INDEXES

ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    """A manifest's kind and the content it refers to: child manifests (for an index) or
    the config and layer blobs (for an image manifest)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    blobs: tuple[Descriptor, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEXES


def _descriptor(where: str, data: object) -> Descriptor:
    if not isinstance(data, dict):
        raise UnsupportedManifest(f"{where}: expected a descriptor object")
    digest, size, media_type = data.get("digest"), data.get("size"), data.get("mediaType")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise UnsupportedManifest(f"{where}.digest {digest!r}: only sha256 digests are supported")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UnsupportedManifest(f"{where}.size {size!r}: expected a non-negative integer")
    if not isinstance(media_type, str):
        raise UnsupportedManifest(f"{where}.mediaType {media_type!r}: expected text")
    return Descriptor(digest, size, media_type)


def parse_manifest(data: bytes, content_type: str | None) -> ParsedManifest:
    """Parse manifest bytes; the media type comes from the JSON or else the Content-Type."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedManifest(f"manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UnsupportedManifest("manifest: expected a JSON object")
    declared = doc.get("mediaType")
    header = (content_type or "").split(";")[0].strip() or None
    media_type = declared if isinstance(declared, str) else header
    if media_type is None:
        # An OCI manifest may omit mediaType; its shape tells what it is.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise UnsupportedManifest(
            f"manifest media type {media_type!r} is not supported; the mirror serves OCI "
            "manifests and indexes and Docker schema 2 manifests and manifest lists"
        )
    if media_type in INDEXES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise UnsupportedManifest("index: 'manifests' must be a list")
        return ParsedManifest(
            media_type,
            tuple(_descriptor(f"manifests[{i}]", c) for i, c in enumerate(children)),
            (),
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise UnsupportedManifest("manifest: 'layers' must be a list")
    config = _descriptor("config", doc.get("config"))
    return ParsedManifest(
        media_type,
        (),
        (config, *(_descriptor(f"layers[{i}]", layer) for i, layer in enumerate(layers))),
    )
