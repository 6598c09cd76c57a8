"""The OCI pull API, pulled from by real clients (skopeo, oras) and checked byte by byte."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import oras.client
import psutil
import pytest
from aiohttp import web
from image_catalog import ImageCatalog
from oci_fixtures import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    TOOL_TIMEOUT,
    SeededImage,
    SeededImages,
    UpstreamRegistry,
    big_image,
    free_port,
    read_layout_digests,
    require_tool,
    seeded_images,
    upstream_registry,
)
from pyrsia_node.acquire import UpstreamClient, acquire_image
from pyrsia_node.attestation import AcquiredImage, Artifact
from pyrsia_node.follow import FollowedStore, follower
from pyrsia_node.genesis import Upstream
from pyrsia_node.identity import Identity
from pyrsia_node.registry import (
    BuildRejected,
    BuildRequest,
    ContentUnavailable,
    Mode,
    RepositoryName,
    RequestBuild,
    parse_name,
    routes,
)
from pyrsia_node.store import BlobStore

__all__ = ["big_image", "seeded_images", "upstream_registry"]


@dataclass
class Node:
    url: str
    host: str
    catalog: ImageCatalog
    store: BlobStore
    images: dict[str, AcquiredImage]
    session: aiohttp.ClientSession
    upstream: str

    async def get(self, path: str, **kwargs: object) -> aiohttp.ClientResponse:
        return await self.session.get(self.url + path, **kwargs)  # type: ignore[arg-type]


async def acquire_all(
    registry: UpstreamRegistry, store: BlobStore, seeded: list[SeededImage]
) -> dict[str, AcquiredImage]:
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(Upstream(registry.host, registry.url, insecure=True), session)
        identity = Identity.generate()
        images = {}
        for image in seeded:
            acquisition = await acquire_image(client, store, image.repository, image.tag, identity)
            images[image.repository] = acquisition.image
        return images


async def start_node(
    catalog: ImageCatalog,
    store: BlobStore,
    default_registry: str,
    *,
    mode: Mode = "strict",
    request_build: RequestBuild | None = None,
    build_timeout: float = 60.0,
) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(
        routes(
            catalog,
            store,
            mode=mode,
            request_build=request_build,
            build_timeout=build_timeout,
            default_registry=default_registry,
        )
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"127.0.0.1:{port}"


@pytest.fixture
async def node(
    upstream_registry: UpstreamRegistry, seeded_images: SeededImages, tmp_path: Path
) -> AsyncIterator[Node]:
    store = BlobStore(tmp_path / "node-blobs")
    seeded = [seeded_images.multilayer, seeded_images.multiarch, seeded_images.docker_list]
    images = await acquire_all(upstream_registry, store, seeded)
    catalog = ImageCatalog()
    for image in images.values():
        catalog.add(image)
    hub = dataclasses.replace(
        images["test/multilayer"], registry="docker.io", repository="library/alpine"
    )
    catalog.add(hub)
    images["library/alpine"] = hub
    runner, host = await start_node(catalog, store, upstream_registry.host)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        try:
            yield Node(
                f"http://{host}", host, catalog, store, images, session, upstream_registry.host
            )
        finally:
            await runner.cleanup()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def assert_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    [error] = (await response.json())["errors"]
    assert error["code"] == code
    message: str = error["message"]
    return message


async def test_api_version_check_answers_200(node: Node) -> None:
    async with await node.get("/v2/") as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_tag_has_digest_type_and_length(node: Node) -> None:
    image = node.images["test/multilayer"]
    async with await node.get("/v2/test/multilayer/manifests/1.0") as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.root.digest
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert int(response.headers["Content-Length"]) == len(body) == image.root.size
        assert digest_of(body) == image.root.digest


async def test_manifest_head_has_headers_and_no_body(node: Node) -> None:
    image = node.images["test/multiarch"]
    async with node.session.head(node.url + "/v2/test/multiarch/manifests/1.0") as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.root.digest
        assert response.headers["Content-Type"] == OCI_INDEX
        assert int(response.headers["Content-Length"]) == image.root.size
        assert await response.read() == b""


async def test_platform_manifest_by_digest(node: Node) -> None:
    child = node.images["test/multiarch"].manifests[0]
    async with await node.get(f"/v2/test/multiarch/manifests/{child.digest}") as response:
        assert response.status == 200
        assert digest_of(await response.read()) == child.digest
        assert response.headers["Content-Type"] == child.media_type


async def test_docker_manifest_list_keeps_its_media_type(node: Node) -> None:
    async with await node.get("/v2/test/dockerlist/manifests/1.0") as response:
        assert response.headers["Content-Type"] == DOCKER_LIST


async def test_unknown_tag_is_manifest_unknown(node: Node) -> None:
    async with await node.get("/v2/test/multilayer/manifests/2.0") as response:
        await assert_error(response, 404, "MANIFEST_UNKNOWN")
    async with node.session.head(node.url + "/v2/test/multilayer/manifests/2.0") as response:
        assert response.status == 404
        assert await response.read() == b""


async def test_invalid_name_and_digest_are_400(node: Node) -> None:
    async with await node.get("/v2/Test/UPPER/manifests/1.0") as response:
        await assert_error(response, 400, "NAME_INVALID")
    async with await node.get("/v2/test/multilayer/manifests/md5:abc") as response:
        await assert_error(response, 400, "DIGEST_INVALID")
    async with await node.get("/v2/test/multilayer/blobs/sha256:xyz") as response:
        await assert_error(response, 400, "DIGEST_INVALID")


async def test_blob_get_and_head(node: Node) -> None:
    blob = node.images["test/multilayer"].blobs[1]
    path = f"/v2/test/multilayer/blobs/{blob.digest}"
    async with await node.get(path) as response:
        body = await response.read()
        assert response.status == 200
        assert digest_of(body) == blob.digest
        assert response.headers["Docker-Content-Digest"] == blob.digest
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert int(response.headers["Content-Length"]) == blob.size
    async with node.session.head(node.url + path) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == blob.size
        assert await response.read() == b""


async def test_blob_range_is_206_with_content_range(node: Node) -> None:
    blob = node.images["test/multilayer"].blobs[1]
    data = await node.store.read(blob.digest)
    path = f"/v2/test/multilayer/blobs/{blob.digest}"
    async with await node.get(path, headers={"Range": "bytes=100-199"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{blob.size}"
        assert await response.read() == data[100:200]
    async with await node.get(path, headers={"Range": "bytes=-10"}) as response:
        assert response.status == 206
        assert await response.read() == data[-10:]


async def test_blob_range_beyond_the_end_is_416(node: Node) -> None:
    blob = node.images["test/multilayer"].blobs[1]
    path = f"/v2/test/multilayer/blobs/{blob.digest}"
    async with await node.get(path, headers={"Range": f"bytes={blob.size + 10}-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{blob.size}"


async def test_blob_in_store_but_not_committed_is_not_served(node: Node) -> None:
    data = b"present on disk, never attested"
    await node.store.put_bytes(digest_of(data), data)
    async with await node.get(f"/v2/test/multilayer/blobs/{digest_of(data)}") as response:
        await assert_error(response, 404, "BLOB_UNKNOWN")


async def test_blob_of_another_repository_is_not_served(node: Node) -> None:
    blob = node.images["test/dockerlist"].blobs[0]
    async with await node.get(f"/v2/test/multilayer/blobs/{blob.digest}") as response:
        await assert_error(response, 404, "BLOB_UNKNOWN")


async def test_tags_list_with_pagination(node: Node) -> None:
    node.catalog.add(dataclasses.replace(node.images["test/multilayer"], tag="2.0"))
    async with await node.get("/v2/test/multilayer/tags/list") as response:
        assert await response.json() == {"name": "test/multilayer", "tags": ["1.0", "2.0"]}
    async with await node.get("/v2/test/multilayer/tags/list?n=1") as response:
        assert (await response.json())["tags"] == ["1.0"]
        assert response.headers["Link"] == (
            '</v2/test/multilayer/tags/list?n=1&last=1.0>; rel="next"'
        )
    async with await node.get("/v2/test/multilayer/tags/list?n=1&last=1.0") as response:
        assert (await response.json())["tags"] == ["2.0"]
        assert "Link" not in response.headers
    async with await node.get("/v2/test/nothing/tags/list") as response:
        await assert_error(response, 404, "NAME_UNKNOWN")
    async with await node.get("/v2/test/multilayer/tags/list?n=x") as response:
        await assert_error(response, 400, "PAGINATION_NUMBER_INVALID")


async def test_docker_hub_names_default_to_library(node: Node) -> None:
    digest = node.images["library/alpine"].root.digest
    for path in (
        "/v2/alpine/manifests/1.0?ns=docker.io",
        "/v2/library/alpine/manifests/1.0?ns=docker.io",
        "/v2/docker.io/library/alpine/manifests/1.0",
        "/v2/alpine/manifests/1.0?ns=registry-1.docker.io",
    ):
        async with await node.get(path) as response:
            assert response.status == 200, path
            assert response.headers["Docker-Content-Digest"] == digest


async def test_ns_parameter_selects_the_upstream_registry(node: Node) -> None:
    async with await node.get(f"/v2/test/multilayer/manifests/1.0?ns={node.upstream}") as r:
        assert r.status == 200
    async with await node.get("/v2/test/multilayer/manifests/1.0?ns=ghcr.io") as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")


def test_name_parsing_rules() -> None:
    assert parse_name("alpine", None, "docker.io") == RepositoryName("docker.io", "library/alpine")
    assert parse_name("a/b/c", None, "docker.io") == RepositoryName("docker.io", "a/b/c")
    assert parse_name("ghcr.io/a/b", None, "docker.io") == RepositoryName("ghcr.io", "a/b")
    assert parse_name("a/b", "quay.io", "docker.io") == RepositoryName("quay.io", "a/b")
    assert parse_name("alpine", None, "quay.io") == RepositoryName("quay.io", "alpine")
    for bad in ("UPPER", "a//b", "-a", "a/", "a" * 256):
        with pytest.raises(ValueError, match="invalid"):
            parse_name(bad, None, "docker.io")
    with pytest.raises(ValueError, match="registry host"):
        parse_name("a", "bad host/x", "docker.io")


async def test_fallback_mode_answers_404_at_once_and_requests_a_build(
    tmp_path: Path,
) -> None:
    requested: list[BuildRequest] = []
    release = asyncio.Event()

    async def request_build(build: BuildRequest) -> None:
        requested.append(build)
        await release.wait()

    store = BlobStore(tmp_path / "blobs")
    runner, host = await start_node(
        ImageCatalog(), store, "docker.io", mode="fallback", request_build=request_build
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                url = f"http://{host}/v2/alpine/manifests/3.19?ns=docker.io"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    message = await assert_error(response, 404, "MANIFEST_UNKNOWN")
                    assert "build was requested" in message
        await asyncio.sleep(0)
        # Two pulls of the same tag while its build runs start one build.
        assert requested == [BuildRequest(RepositoryName("docker.io", "library/alpine"), "3.19")]
    finally:
        release.set()
        await runner.cleanup()


async def test_strict_mode_waits_for_the_build_and_serves_the_commit(node: Node) -> None:
    image = node.images["test/multilayer"]
    catalog = ImageCatalog()

    async def request_build(build: BuildRequest) -> None:
        await asyncio.sleep(0.05)
        catalog.add(image)

    runner, host = await start_node(catalog, node.store, node.upstream, request_build=request_build)
    try:
        async with await node.session.get(f"http://{host}/v2/test/multilayer/manifests/1.0") as r:
            assert r.status == 200
            assert r.headers["Docker-Content-Digest"] == image.root.digest
    finally:
        await runner.cleanup()


async def test_strict_mode_gives_a_clear_error_after_the_timeout(tmp_path: Path) -> None:
    async def request_build(build: BuildRequest) -> None:
        await asyncio.sleep(30)

    runner, host = await start_node(
        ImageCatalog(),
        BlobStore(tmp_path),
        "docker.io",
        request_build=request_build,
        build_timeout=0.2,
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}/v2/alpine/manifests/1") as response,
        ):
            message = await assert_error(response, 404, "MANIFEST_UNKNOWN")
            assert "did not commit within 0.2s" in message
    finally:
        await runner.cleanup()


async def test_strict_mode_reports_a_rejected_build(tmp_path: Path) -> None:
    async def request_build(build: BuildRequest) -> None:
        raise BuildRejected("authority X saw sha256:aa, the others sha256:bb")

    runner, host = await start_node(
        ImageCatalog(), BlobStore(tmp_path), "docker.io", request_build=request_build
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}/v2/alpine/manifests/1") as response,
        ):
            message = await assert_error(response, 404, "MANIFEST_UNKNOWN")
            assert "authority X saw sha256:aa" in message
    finally:
        await runner.cleanup()


async def run_tool_async(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, stderr.decode()


async def test_skopeo_pulls_a_multiarch_index_with_every_digest_intact(
    node: Node, tmp_path: Path
) -> None:
    skopeo = require_tool("skopeo")
    image = node.images["test/multiarch"]
    out = tmp_path / "pulled"
    await run_tool_async(
        skopeo,
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{node.host}/test/multiarch:1.0",
        f"oci:{out}:pulled",
    )
    index = json.loads((out / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.root.digest]
    hashes = read_layout_digests(out)
    assert all(name == actual for name, actual in hashes.items())
    assert set(hashes) == set(image.digests)


async def test_skopeo_pulls_a_docker_manifest_list_byte_identically(
    node: Node, tmp_path: Path
) -> None:
    skopeo = require_tool("skopeo")
    image = node.images["test/dockerlist"]
    out = tmp_path / "pulled"
    await run_tool_async(
        skopeo,
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{node.host}/test/dockerlist:1.0",
        f"dir:{out}",
    )
    assert digest_of((out / "manifest.json").read_bytes()) == image.root.digest
    for artifact in (*image.manifests, *image.blobs):
        name = artifact.digest[len("sha256:") :]
        candidates = [out / name, out / f"{name}.manifest.json"]
        [found] = [p for p in candidates if p.exists()]
        assert digest_of(found.read_bytes()) == artifact.digest


def oras_pull(host: str, target: str, outdir: Path) -> tuple[list[str], dict[str, str]]:
    """oras' own pull (gzip layers are extracted), then every blob via oras' blob download."""
    client = oras.client.OrasClient(hostname=host, insecure=True)
    files = client.pull(target=target, outdir=str(outdir / "pulled"))
    container = client.get_container(target)
    manifest = client.get_manifest(container)
    hashes = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        out = outdir / "blobs" / descriptor["digest"]
        out.parent.mkdir(parents=True, exist_ok=True)
        client.download_blob(container, descriptor["digest"], str(out))
        hashes[descriptor["digest"]] = digest_of(out.read_bytes())
    return files, hashes


async def test_oras_pulls_every_layer_with_matching_digests(node: Node, tmp_path: Path) -> None:
    image = node.images["test/multilayer"]
    files, hashes = await asyncio.to_thread(
        oras_pull, node.host, f"{node.host}/test/multilayer:1.0", tmp_path
    )
    assert len(files) == 4
    for i in range(4):
        assert (tmp_path / "pulled" / "multi" / f"layer{i}" / "file.bin").is_file()
    assert all(name == actual for name, actual in hashes.items())
    assert set(hashes) == {b.digest for b in image.blobs}


@pytest.mark.slow
async def test_serving_a_200_mib_blob_streams_without_buffering(
    upstream_registry: UpstreamRegistry, big_image: SeededImage, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "blobs")
    images = await acquire_all(upstream_registry, store, [big_image])
    catalog = ImageCatalog()
    catalog.add(images[big_image.repository])
    layer = max(images[big_image.repository].blobs, key=lambda b: b.size)
    runner, host = await start_node(catalog, store, upstream_registry.host)
    process = psutil.Process(os.getpid())
    try:
        before = process.memory_info().rss
        peak = before
        hasher = hashlib.sha256()
        async with aiohttp.ClientSession() as session:
            url = f"http://{host}/v2/test/big/blobs/{layer.digest}"
            async with session.get(url) as response:
                assert response.status == 200
                async for chunk in response.content.iter_chunked(1 << 20):
                    await asyncio.to_thread(hasher.update, chunk)
                    peak = max(peak, process.memory_info().rss)
        assert "sha256:" + hasher.hexdigest() == layer.digest
        assert peak - before < 32 << 20, f"RSS grew by {(peak - before) >> 20} MiB"
    finally:
        await runner.cleanup()


async def test_committed_content_missing_here_is_fetched_before_it_is_served(
    node: Node, tmp_path: Path
) -> None:
    image = node.images["test/multilayer"]
    fetched: list[str] = []
    empty = BlobStore(tmp_path / "empty")

    async def fetch(digest: str) -> None:
        fetched.append(digest)
        await empty.put_bytes(digest, await node.store.read(digest))

    app = web.Application()
    app.add_routes(routes(node.catalog, empty, default_registry=node.upstream, fetch=fetch))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}/v2/test/multilayer"
    try:
        async with await node.session.get(f"{base}/manifests/1.0") as response:
            assert response.status == 200
            assert digest_of(await response.read()) == image.root.digest
        layer = image.blobs[-1].digest
        async with await node.session.get(f"{base}/blobs/{layer}") as response:
            assert response.status == 200
            assert digest_of(await response.read()) == layer
        assert fetched == [image.root.digest, layer]
    finally:
        await runner.cleanup()


async def test_a_failed_fetch_of_committed_content_is_reported(node: Node, tmp_path: Path) -> None:
    async def fetch(digest: str) -> None:
        raise ContentUnavailable("no provider answered")

    store = BlobStore(tmp_path / "empty")
    app = web.Application()
    app.add_routes(routes(node.catalog, store, default_registry=node.upstream, fetch=fetch))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}/v2/test/multilayer/manifests/1.0"
        async with await node.session.get(url) as response:
            message = await assert_error(response, 404, "MANIFEST_UNKNOWN")
            assert "could not be fetched from the network: no provider answered" in message
    finally:
        await runner.cleanup()


class Download:
    """A download into a ``FollowedStore`` that the test releases chunk by chunk."""

    def __init__(self, store: FollowedStore, digest: str, chunks: list[bytes]) -> None:
        self.store = store
        self.digest = digest
        self.chunks = chunks
        self.released = asyncio.Semaphore(0)
        self.stored = asyncio.Event()  # set once the store holds the blob

    async def fetch(self, digest: str) -> None:
        assert digest == self.digest

        async def gated() -> AsyncIterator[bytes]:
            for chunk in self.chunks:
                await self.released.acquire()
                yield chunk

        size = sum(len(c) for c in self.chunks)
        await self.store.put_stream(digest, gated(), max_size=size)
        self.stored.set()

    def release_all(self) -> None:
        for _ in self.chunks:
            self.released.release()


@dataclass
class Streaming:
    url: str
    store: FollowedStore
    digest: str
    data: bytes

    def chunks(self, data: bytes | None = None) -> list[bytes]:
        body = self.data if data is None else data
        return [body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]


@pytest.fixture
def streaming(tmp_path: Path) -> Streaming:
    data = os.urandom(3 << 20)
    digest = digest_of(data)
    return Streaming(
        f"/v2/library/big/blobs/{digest}", FollowedStore(BlobStore(tmp_path)), digest, data
    )


async def serve_following(
    streaming: Streaming, download: Download, limit: int = 32 << 20
) -> tuple[web.AppRunner, str]:
    """A registry whose catalog commits one image holding the (absent) blob."""
    catalog = ImageCatalog()
    catalog.add(
        AcquiredImage(
            "docker.io",
            "library/big",
            "1.0",
            Artifact(digest_of(b"{}"), 2, OCI_MANIFEST),
            (),
            (Artifact(streaming.digest, len(streaming.data), "application/octet-stream"),),
        )
    )
    app = web.Application()
    app.add_routes(
        routes(
            catalog,
            streaming.store,
            fetch=download.fetch,
            follow=follower(streaming.store, download.fetch, limit),
        )
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_a_cold_blob_streams_to_the_client_while_it_downloads(
    streaming: Streaming,
) -> None:
    chunks = streaming.chunks()
    download = Download(streaming.store, streaming.digest, chunks)
    runner, base = await serve_following(streaming, download)
    try:
        async with aiohttp.ClientSession() as session:
            get = asyncio.create_task(session.get(base + streaming.url))
            download.released.release()
            download.released.release()  # two of three chunks: the first can be sent
            async with asyncio.timeout(10):
                response = await get
                assert response.status == 200
                assert response.headers["Content-Length"] == str(len(streaming.data))
                assert response.headers["Docker-Content-Digest"] == streaming.digest
                first = await response.content.readexactly(1 << 20)
            assert first == chunks[0]
            assert not streaming.store.has(streaming.digest)  # still downloading
            download.released.release()
            async with asyncio.timeout(10):
                rest = await response.content.read()
            response.release()
        assert first + rest == streaming.data
        # The body ends once the digest matched; the store's fsync and rename may follow.
        async with asyncio.timeout(10):
            await download.stored.wait()
        assert streaming.store.has(streaming.digest)
    finally:
        await runner.cleanup()


async def read_body(url: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(10),
        session.get(url) as response,
    ):
        assert response.status == 200
        return await response.read()


async def test_a_streamed_blob_that_fails_its_digest_is_cut_off(streaming: Streaming) -> None:
    bad = bytearray(streaming.data)
    bad[-1] ^= 1
    download = Download(streaming.store, streaming.digest, streaming.chunks(bytes(bad)))
    runner, base = await serve_following(streaming, download)
    download.release_all()
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            body = await read_body(base + streaming.url)
            pytest.fail(f"a complete body of {len(body)} unverified bytes arrived")
        assert not streaming.store.has(streaming.digest)
    finally:
        await runner.cleanup()


async def test_a_client_slower_than_the_download_gets_the_rest_from_the_store(
    streaming: Streaming,
) -> None:
    download = Download(streaming.store, streaming.digest, streaming.chunks())
    runner, base = await serve_following(streaming, download, limit=1)
    download.release_all()
    try:
        assert await read_body(base + streaming.url) == streaming.data
    finally:
        await runner.cleanup()
