"""Acquisition against a real upstream: Debian's docker-registry seeded with our images."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from oci_fixtures import (
    BIG_LAYER_BYTES,
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    SeededImage,
    SeededImages,
    UpstreamProxy,
    UpstreamRegistry,
    big_image,
    free_port,
    proxy_factory,
    seeded_images,
    start_proxy,
    upstream_registry,
)
from pyrsia_node.acquire import (
    FetchPolicy,
    ImageNotFound,
    SizeLimitExceeded,
    UpstreamClient,
    UpstreamDigestMismatch,
    UpstreamUnavailable,
    acquire_image,
)
from pyrsia_node.attestation import decide, verify
from pyrsia_node.genesis import Upstream
from pyrsia_node.identity import Identity
from pyrsia_node.store import BlobStore

__all__ = ["big_image", "proxy_factory", "seeded_images", "upstream_registry"]

NOW = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


class RecordedSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def client_for(
    url: str, session: aiohttp.ClientSession, policy: FetchPolicy | None = None
) -> tuple[UpstreamClient, RecordedSleep]:
    sleep = RecordedSleep()
    upstream = Upstream("upstream.test", url, insecure=True)
    return UpstreamClient(
        upstream, session, policy=policy, sleep=sleep, rng=random.Random(7)
    ), sleep


def assert_acquired_exactly(
    store: BlobStore, image: SeededImage, acquired_digests: frozenset[str]
) -> None:
    assert acquired_digests == image.digests
    assert set(store.digests()) == set(image.digests)


async def test_multilayer_image_is_fetched_verified_and_attested(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    seeded = seeded_images.multilayer
    client, _ = client_for(upstream_registry.url, session)
    identity = Identity.generate()
    acquisition = await acquire_image(
        client, store, seeded.repository, "1.0", identity, now=lambda: NOW
    )
    image = acquisition.image
    assert image.root.digest == seeded.root.digest
    assert image.root.media_type == OCI_MANIFEST
    assert image.manifests == ()
    assert len(image.blobs) == 5  # config + 4 layers
    assert_acquired_exactly(store, seeded, image.digests)
    for blob in image.blobs:
        assert store.size(blob.digest) == blob.size
    attestation = verify(acquisition.envelope, {identity.node_id: identity.public_key})
    assert attestation.image == image
    assert attestation.source == f"{upstream_registry.url}/v2/test/multilayer/manifests/1.0"
    assert attestation.time == "2024-05-01T00:00:00Z"


async def test_multiarch_index_is_followed_to_every_platform(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    seeded = seeded_images.multiarch
    client, _ = client_for(upstream_registry.url, session)
    acquisition = await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    image = acquisition.image
    assert image.root.media_type == OCI_INDEX
    assert {m.digest for m in image.manifests} == set(seeded.manifests)
    assert len(image.manifests) == 2
    # two configs, a shared layer (once) and one own layer per platform
    assert len(image.blobs) == 5
    assert_acquired_exactly(store, seeded, image.digests)


async def test_docker_manifest_list_keeps_docker_media_types(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    seeded = seeded_images.docker_list
    client, _ = client_for(upstream_registry.url, session)
    acquisition = await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    assert acquisition.image.root.media_type == DOCKER_LIST
    assert acquisition.image.root.digest == seeded.root.digest
    assert {m.media_type for m in acquisition.image.manifests} == {
        "application/vnd.docker.distribution.manifest.v2+json"
    }
    assert_acquired_exactly(store, seeded, acquisition.image.digests)


async def test_bearer_token_is_fetched_from_the_realm_with_service_and_scope(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    proxy = await start_proxy(proxy_factory, upstream_registry, require_token=True)
    client, _ = client_for(proxy.url, session)
    seeded = seeded_images.multilayer
    acquisition = await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    assert acquisition.image.root.digest == seeded.root.digest
    assert proxy.token_requests == ["service=test-registry&scope=repository:test/multilayer:pull"]


async def test_transient_upstream_errors_are_retried_with_capped_jittered_backoff(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    proxy = await start_proxy(proxy_factory, upstream_registry, fail_first=3)
    policy = FetchPolicy(attempts=5, base_delay=1.0, max_delay=3.0)
    client, sleep = client_for(proxy.url, session, policy)
    seeded = seeded_images.multilayer
    acquisition = await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    assert acquisition.image.root.digest == seeded.root.digest
    assert len(sleep.delays) == 3
    for attempt, delay in enumerate(sleep.delays):
        assert 0 <= delay <= min(3.0, 1.0 * 2**attempt)


async def test_upstream_that_keeps_failing_gives_up_with_unavailable(
    upstream_registry: UpstreamRegistry,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    proxy = await start_proxy(proxy_factory, upstream_registry, fail_first=100)
    client, sleep = client_for(proxy.url, session, FetchPolicy(attempts=3))
    with pytest.raises(UpstreamUnavailable, match="failed 3 times, last with status 503"):
        await acquire_image(client, store, "test/multilayer", "1.0", Identity.generate())
    assert len(sleep.delays) == 2


async def test_tampered_blob_is_rejected_and_nothing_stays_in_the_store(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    seeded = seeded_images.multilayer
    victim = seeded.blobs[2]
    proxy = await start_proxy(proxy_factory, upstream_registry, tamper_digest=victim)
    client, _ = client_for(proxy.url, session)
    with pytest.raises(UpstreamDigestMismatch, match=victim) as caught:
        await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    assert caught.value.expected == victim
    assert store.digests() == []
    assert list((store.root / "tmp").iterdir()) == []


async def test_tampered_platform_manifest_is_rejected(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    seeded = seeded_images.multiarch
    proxy = await start_proxy(proxy_factory, upstream_registry, tamper_digest=seeded.manifests[0])
    client, _ = client_for(proxy.url, session)
    with pytest.raises(UpstreamDigestMismatch, match=seeded.manifests[0]):
        await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    assert store.digests() == []


async def test_blob_over_the_size_limit_is_refused_before_download(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    proxy = await start_proxy(proxy_factory, upstream_registry)
    client, _ = client_for(proxy.url, session, FetchPolicy(max_blob_bytes=1000))
    with pytest.raises(SizeLimitExceeded, match="raise max_blob_bytes"):
        await acquire_image(client, store, "test/multilayer", "1.0", Identity.generate())
    assert not any("/blobs/" in path for path in proxy.requests)
    assert store.digests() == []


async def test_image_over_the_size_limit_is_refused(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    client, _ = client_for(upstream_registry.url, session, FetchPolicy(max_image_bytes=100_000))
    with pytest.raises(SizeLimitExceeded, match="raise max_image_bytes"):
        await acquire_image(client, store, "test/multilayer", "1.0", Identity.generate())


async def test_unknown_tag_is_image_not_found(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    client, _ = client_for(upstream_registry.url, session)
    with pytest.raises(ImageNotFound, match="does not exist upstream"):
        await acquire_image(client, store, "test/multilayer", "9.9", Identity.generate())


async def test_authority_with_lying_upstream_cannot_get_its_digest_committed(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    proxy_factory: list[UpstreamProxy],
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    authorities = [Identity.generate() for _ in range(4)]
    liar = await start_proxy(
        proxy_factory, upstream_registry, rename=("test/multilayer", "test/multiarch")
    )
    envelopes = []
    for i, identity in enumerate(authorities):
        url = liar.url if i == 3 else upstream_registry.url
        client, _ = client_for(url, session)
        acquisition = await acquire_image(
            client, BlobStore(tmp_path / f"a{i}"), "test/multilayer", "1.0", identity
        )
        envelopes.append(acquisition.envelope)
    validators = {a.node_id: a.public_key for a in authorities}
    decision = decide(envelopes, validators, threshold=3)
    assert decision.committed is not None
    assert decision.committed.root.digest == seeded_images.multilayer.root.digest
    [mismatch] = decision.mismatches
    assert mismatch.authority == authorities[3].node_id
    assert mismatch.saw.root.digest == seeded_images.multiarch.root.digest
    # With only two honest authorities the liar blocks the commit but cannot win it.
    stalled = decide(envelopes[2:], validators, threshold=2)
    assert stalled.committed is None
    assert len(stalled.mismatches) == 1


@pytest.mark.slow
async def test_200_mib_layer_is_streamed_and_verified(
    upstream_registry: UpstreamRegistry,
    big_image: SeededImage,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    client, _ = client_for(upstream_registry.url, session)
    acquisition = await acquire_image(
        client, store, big_image.repository, "1.0", Identity.generate()
    )
    assert_acquired_exactly(store, big_image, acquisition.image.digests)
    assert max(b.size for b in acquisition.image.blobs) > BIG_LAYER_BYTES


async def test_upstream_egress_is_counted_byte_for_byte(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    """Every body byte read from the upstream reaches ``on_bytes`` exactly once."""
    counted: list[int] = []
    upstream = Upstream("upstream.test", upstream_registry.url, insecure=True)
    client = UpstreamClient(upstream, session, on_bytes=counted.append)
    acquisition = await acquire_image(
        client, store, seeded_images.multilayer.repository, "1.0", Identity.generate()
    )
    assert sum(counted) == sum(a.size for a in acquisition.image.artifacts)


@pytest.fixture
async def chunked_upstream(upstream_registry: UpstreamRegistry) -> AsyncIterator[str]:
    """The upstream re-served with chunked transfer encoding, every body in 1,000-byte HTTP
    chunks (as registries behind some CDNs answer)."""

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() == "accept"}
        url = upstream_registry.url + request.path_qs
        async with relay_session.get(url, headers=headers) as got:
            body = await got.read()
            response = web.StreamResponse(
                status=got.status,
                headers={
                    k: v
                    for k, v in got.headers.items()
                    if k.lower() in ("content-type", "docker-content-digest")
                },
            )
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 1000):
            await response.write(body[start : start + 1000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{path:.*}", relay)
    runner = web.AppRunner(app)
    async with aiohttp.ClientSession() as relay_session:
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def test_bodies_in_chunked_transfer_encoding_are_acquired_whole(
    chunked_upstream: str,
    seeded_images: SeededImages,
    session: aiohttp.ClientSession,
    store: BlobStore,
) -> None:
    client, _ = client_for(chunked_upstream, session)
    seeded = seeded_images.multilayer
    acquisition = await acquire_image(client, store, seeded.repository, "1.0", Identity.generate())
    assert_acquired_exactly(store, seeded, acquisition.image.digests)
