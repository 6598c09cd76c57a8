"""Acquire one image: fetch everything a tag refers to, verify it, store it, attest it.

The walk is: the tag's manifest or index; for an index every platform manifest (nested
indexes too); every config and layer blob. Each manifest is checked against the digest
and size its parent names, each blob is hashed while it streams into the blob store and
becomes visible only if its digest matches. Size limits are checked against the
descriptors before anything is downloaded and enforced again while streaming.

If anything fails, the blobs this acquisition added are removed again, so a rejected
upstream leaves nothing in the store. Manifests are stored last, after all their blobs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from pyrsia_node.acquire.client import FetchedManifest, UpstreamClient
from pyrsia_node.acquire.errors import (
    SizeLimitExceeded,
    UnsupportedManifest,
    UpstreamDigestMismatch,
    UpstreamUnavailable,
)
from pyrsia_node.acquire.manifest import Descriptor, ParsedManifest, parse_manifest
from pyrsia_node.attestation import AcquiredImage, Artifact, Attestation, Envelope, attest
from pyrsia_node.identity import Identity
from pyrsia_node.store import BlobStore, BlobTooLarge, DigestMismatch

log = logging.getLogger(__name__)

_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_MAX_INDEX_DEPTH = 2


@dataclass(frozen=True, slots=True)
class Acquisition:
    """An image this authority fetched and verified, and its signed attestation."""

    image: AcquiredImage
    attestation: Attestation
    envelope: Envelope


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def acquire_image(
    client: UpstreamClient,
    store: BlobStore,
    repository: str,
    tag: str,
    identity: Identity,
    *,
    now: Callable[[], dt.datetime] = _utc_now,
    concurrency: int = 4,
) -> Acquisition:
    """Fetch ``repository:tag`` from ``client``'s upstream into ``store`` and attest it.

    ``repository`` is the upstream's name for it (``library/alpine`` on Docker Hub).
    Raises an ``AcquireError`` subclass; on failure no blob of this acquisition remains.
    """
    if not _TAG.match(tag):
        raise ValueError(f"tag {tag!r} is not a valid OCI tag; pull by a tag like '3.19'")
    walk = _Walk(client, repository)
    root = await client.manifest(repository, tag)
    root_parsed = _parse(root)
    await walk.visit(root_parsed, depth=0)
    blobs = walk.blobs()
    policy = client.policy
    for blob in blobs:
        if blob.size > policy.max_blob_bytes:
            raise SizeLimitExceeded(
                f"blob {blob.digest} of {repository}:{tag} has {blob.size} bytes, the limit "
                f"is {policy.max_blob_bytes}; raise max_blob_bytes to mirror this image"
            )
    image = AcquiredImage(
        registry=client.upstream.name,
        repository=repository,
        tag=tag,
        root=Artifact(root.digest, len(root.data), root_parsed.media_type),
        manifests=tuple(
            Artifact(m.digest, len(m.data), parsed.media_type)
            for m, parsed in walk.manifests.values()
        ),
        blobs=blobs,
    )
    if image.size > policy.max_image_bytes:
        raise SizeLimitExceeded(
            f"{repository}:{tag} has {image.size} bytes, the limit is "
            f"{policy.max_image_bytes}; raise max_image_bytes to mirror this image"
        )
    added: list[str] = []
    try:
        await _fetch_blobs(client, store, repository, blobs, added, concurrency)
        # A concurrent failed acquisition may have removed a blob we found present.
        await _fetch_blobs(
            client, store, repository, [b for b in blobs if not store.has(b.digest)], added, 1
        )
        for fetched, _ in walk.manifests.values():
            await _store_manifest(store, fetched, added)
        await _store_manifest(store, root, added)
    except BaseException:
        for digest in added:
            store.delete(digest)
        raise
    attestation, envelope = attest(image, root.url, now(), identity)
    log.info(
        "acquired %s as %s: %d manifests, %d blobs, %d bytes",
        image.reference,
        image.root.digest,
        1 + len(image.manifests),
        len(image.blobs),
        image.size,
    )
    return Acquisition(image, attestation, envelope)


def _parse(fetched: FetchedManifest) -> ParsedManifest:
    try:
        return parse_manifest(fetched.data, fetched.media_type)
    except UnsupportedManifest as exc:
        raise UnsupportedManifest(f"{fetched.url}: {exc}") from exc


class _Walk:
    """Collects the manifests below an index and the blobs of every manifest."""

    def __init__(self, client: UpstreamClient, repository: str) -> None:
        self.client = client
        self.repository = repository
        self.manifests: dict[str, tuple[FetchedManifest, ParsedManifest]] = {}
        self._blobs: dict[str, Descriptor] = {}

    async def visit(self, parsed: ParsedManifest, depth: int) -> None:
        for descriptor in parsed.blobs:
            known = self._blobs.setdefault(descriptor.digest, descriptor)
            if known.size != descriptor.size:
                raise UnsupportedManifest(
                    f"blob {descriptor.digest} is listed with sizes {known.size} and "
                    f"{descriptor.size}; the upstream manifests are inconsistent"
                )
        if not parsed.manifests:
            return
        if depth >= _MAX_INDEX_DEPTH:
            raise UnsupportedManifest(
                f"indexes nested deeper than {_MAX_INDEX_DEPTH} levels are not mirrored"
            )
        for child in parsed.manifests:
            if child.digest in self.manifests:
                continue
            fetched = await self.client.manifest(self.repository, child.digest)
            if len(fetched.data) != child.size:
                raise UpstreamDigestMismatch(
                    fetched.url,
                    f"{child.digest} ({child.size} bytes)",
                    f"{len(fetched.data)} bytes",
                )
            child_parsed = _parse(fetched)
            self.manifests[child.digest] = (fetched, child_parsed)
            await self.visit(child_parsed, depth + 1)

    def blobs(self) -> tuple[Artifact, ...]:
        return tuple(
            Artifact(d.digest, d.size, d.media_type)
            for d in sorted(self._blobs.values(), key=lambda d: d.digest)
        )


async def _fetch_blobs(
    client: UpstreamClient,
    store: BlobStore,
    repository: str,
    blobs: Iterable[Artifact],
    added: list[str],
    concurrency: int,
) -> None:
    semaphore = asyncio.Semaphore(concurrency)
    failed = False

    async def one(blob: Artifact) -> None:
        nonlocal failed
        async with semaphore:
            if failed or store.has(blob.digest):
                return
            added.append(blob.digest)
            try:
                await _fetch_blob(client, store, repository, blob)
            except BaseException:
                failed = True
                raise

    # Downloads in flight run to completion instead of being cancelled: a cancelled store
    # write could still land after the cleanup; no new download starts after a failure.
    results = await asyncio.gather(*(one(blob) for blob in blobs), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _fetch_blob(
    client: UpstreamClient, store: BlobStore, repository: str, blob: Artifact
) -> None:
    """Stream one blob into the store; a connection that breaks mid-body is retried."""
    url = client.blob_url(repository, blob.digest)
    policy = client.policy
    attempt = 0
    while True:
        try:
            async with client.blob(repository, blob.digest) as chunks:
                size = await store.put_stream(blob.digest, chunks, max_size=blob.size)
        except DigestMismatch as exc:
            raise UpstreamDigestMismatch(url, exc.expected, exc.actual) from exc
        except BlobTooLarge as exc:
            raise UpstreamDigestMismatch(
                url, f"{blob.digest} ({blob.size} bytes)", "more bytes than the manifest says"
            ) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            attempt += 1
            if attempt >= policy.attempts:
                raise UpstreamUnavailable(
                    f"download of {url} broke off {attempt} times, last with {exc!r}; the "
                    "upstream is unreachable or unstable, try again later"
                ) from exc
            log.warning("download of %s broke off (%r), retrying", url, exc)
            await client.backoff(attempt - 1)
            continue
        if size != blob.size:
            # The digest matched, so the manifest's size is wrong: the store holds correct
            # bytes, but the descriptor lies; refuse the image.
            store.delete(blob.digest)
            raise UpstreamDigestMismatch(
                url, f"{blob.digest} ({blob.size} bytes)", f"{size} bytes with that digest"
            )
        return


async def _store_manifest(store: BlobStore, fetched: FetchedManifest, added: list[str]) -> None:
    if store.has(fetched.digest):
        return
    await store.put_bytes(fetched.digest, fetched.data)
    added.append(fetched.digest)
