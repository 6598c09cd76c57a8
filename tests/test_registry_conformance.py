"""The pull API held to the OCI Distribution Spec v1.1, RFC 9110 and what real clients
expect of CNCF distribution (``registry:2``), one behaviour per test.

``tests/test_registry.py`` covers the basics (manifests and blobs by tag and digest, a
byte range, 416, tag pages, names, builds, skopeo and oras pulls of images acquired from a
real upstream). This module covers the rest of the checklist: content negotiation, digest
and tag syntax, every range form, conditional requests, read-only methods, unknown
endpoints, error bodies, tag order and links, the build bound. Its images are written by
hand into a store (no upstream needed), so each media type and platform layout can be
chosen; skopeo and oras then read them through their own ``Accept`` headers.

Where this registry differs from distribution on purpose (RFC 9110 ``Accept`` wildcards and
``q=0``, several ranges answered with the whole blob, 404 instead of 400 for an invalid
tag), the test says so.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import oras.client
import pytest
from aiohttp import web
from image_catalog import ImageCatalog
from multidict import CIMultiDict
from oci_fixtures import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    TOOL_TIMEOUT,
    free_port,
    require_tool,
    tar_bytes,
)
from pyrsia_node.attestation import AcquiredImage, Artifact
from pyrsia_node.registry import (
    BuildRequest,
    ManifestRef,
    RepositoryName,
    accepts,
    parse_name,
    routes,
)
from pyrsia_node.store import BlobStore

# What containerd's resolver sends (also to mirrors), and skopeo's list.
CONTAINERD_ACCEPT = f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"
SKOPEO_ACCEPT = (
    f"{OCI_MANIFEST}, {DOCKER_MANIFEST}, "
    "application/vnd.docker.distribution.manifest.v1+prettyjws, "
    f"application/vnd.docker.distribution.manifest.v1+json, {DOCKER_LIST}, {OCI_INDEX}"
)
SHA512 = "sha512:" + "ab" * 64


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Content:
    """Writes blobs and manifests into a store and describes them as artifacts."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.bytes: dict[str, bytes] = {}

    async def put(self, data: bytes, media_type: str) -> Artifact:
        digest = digest_of(data)
        await self.store.put_bytes(digest, data)
        self.bytes[digest] = data
        return Artifact(digest, len(data), media_type)

    async def image(
        self, arch: str, manifest_type: str, config_type: str, layer_type: str
    ) -> tuple[Artifact, list[Artifact]]:
        """A one-layer image (real gzip tar, real config); its manifest and blobs."""
        tar = tar_bytes({f"{arch}/file.bin": os.urandom(20_000)})
        layer = await self.put(gzip.compress(tar, mtime=0), layer_type)
        config = await self.put(
            json.dumps(
                {
                    "architecture": arch,
                    "os": "linux",
                    "config": {"Env": ["PATH=/bin"]},
                    "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]},
                }
            ).encode(),
            config_type,
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": layer_type, "digest": layer.digest, "size": layer.size}],
        }
        return await self.put(json.dumps(manifest).encode(), manifest_type), [config, layer]

    async def index(self, media_type: str, entries: list[tuple[Artifact, str]]) -> Artifact:
        manifests = [
            {
                "mediaType": m.media_type,
                "digest": m.digest,
                "size": m.size,
                "platform": {"architecture": arch, "os": "linux"},
            }
            for m, arch in entries
        ]
        return await self.put(
            json.dumps(
                {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
            ).encode(),
            media_type,
        )


@dataclass
class Images:
    oci: AcquiredImage  # test/oci:1.0, one OCI image manifest
    index: AcquiredImage  # test/index:1.0, an OCI index of amd64 and arm64
    docker: AcquiredImage  # test/docker:1.0, one Docker schema 2 manifest
    docker_list: AcquiredImage  # test/list:1.0, a Docker manifest list of amd64 and arm64
    arm_only: AcquiredImage  # test/list:arm-only, a Docker manifest list of arm64 only


@dataclass
class Registry:
    url: str
    host: str
    images: Images
    content: Content
    catalog: ImageCatalog
    session: aiohttp.ClientSession

    def request(
        self, method: str, path: str, **kwargs: object
    ) -> aiohttp.client._RequestContextManager:
        return self.session.request(method, self.url + path, **kwargs)  # type: ignore[arg-type]

    def get(self, path: str, **kwargs: object) -> aiohttp.client._RequestContextManager:
        return self.request("GET", path, **kwargs)

    def head(self, path: str, **kwargs: object) -> aiohttp.client._RequestContextManager:
        return self.request("HEAD", path, **kwargs)

    def blob(self, image: AcquiredImage) -> tuple[str, bytes]:
        """The URL path and bytes of the image's largest blob."""
        blob = max(image.blobs, key=lambda b: b.size)
        return f"/v2/{image.repository}/blobs/{blob.digest}", self.content.bytes[blob.digest]


async def build_images(content: Content) -> Images:
    def acquired(
        repository: str, tag: str, root: Artifact, children: list[Artifact], blobs: list[Artifact]
    ) -> AcquiredImage:
        unique = {b.digest: b for b in blobs}
        return AcquiredImage(
            "docker.io",
            repository,
            tag,
            root,
            tuple(children),
            tuple(unique[d] for d in sorted(unique)),
        )

    oci, oci_blobs = await content.image("amd64", OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
    amd, amd_blobs = await content.image("amd64", OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
    arm, arm_blobs = await content.image("arm64", OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
    index = await content.index(OCI_INDEX, [(amd, "amd64"), (arm, "arm64")])
    docker, docker_blobs = await content.image(
        "amd64", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER
    )
    d_amd, d_amd_blobs = await content.image("amd64", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    d_arm, d_arm_blobs = await content.image("arm64", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    docker_list = await content.index(DOCKER_LIST, [(d_amd, "amd64"), (d_arm, "arm64")])
    arm_only = await content.index(DOCKER_LIST, [(d_arm, "arm64")])
    return Images(
        oci=acquired("test/oci", "1.0", oci, [], oci_blobs),
        index=acquired("test/index", "1.0", index, [amd, arm], amd_blobs + arm_blobs),
        docker=acquired("test/docker", "1.0", docker, [], docker_blobs),
        docker_list=acquired(
            "test/list", "1.0", docker_list, [d_amd, d_arm], d_amd_blobs + d_arm_blobs
        ),
        arm_only=acquired("test/list", "arm-only", arm_only, [d_arm], d_arm_blobs),
    )


async def serve(app_routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(app_routes)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"127.0.0.1:{port}"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    store = BlobStore(tmp_path / "blobs")
    content = Content(store)
    images = await build_images(content)
    catalog = ImageCatalog()
    for image in vars(images).values():
        catalog.add(image)
    runner, host = await serve(routes(catalog, store, default_registry="docker.io"))
    # aiohttp sends "Accept: */*" unless told not to; each test sets its own.
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=["Accept"]
    ) as session:
        try:
            yield Registry(f"http://{host}", host, images, content, catalog, session)
        finally:
            await runner.cleanup()


async def error_of(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, object]:
    """The single spec error in the response, after checking status, type and code."""
    assert response.status == status, await response.text()
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.headers["Content-Type"].startswith("application/json")
    [error] = (await response.json())["errors"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def manifest_path(image: AcquiredImage, reference: str | None = None) -> str:
    return f"/v2/{image.repository}/manifests/{reference or image.tag}"


# --- base endpoint, methods, unknown endpoints ---------------------------------------------


async def test_the_version_check_answers_with_and_without_the_trailing_slash(
    registry: Registry,
) -> None:
    for method, path in (("GET", "/v2/"), ("GET", "/v2"), ("HEAD", "/v2/")):
        async with registry.request(method, path) as response:
            assert response.status == 200, (method, path)
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            assert await response.read() == (b"" if method == "HEAD" else b"{}")


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
async def test_push_and_delete_methods_are_405_unsupported(registry: Registry, method: str) -> None:
    image = registry.images.oci
    paths = [
        manifest_path(image),
        manifest_path(image, image.root.digest),
        f"/v2/{image.repository}/blobs/uploads/",
        f"/v2/{image.repository}/blobs/uploads/2f1d1c9e",
        registry.blob(image)[0],
        "/v2/",
    ]
    for path in paths:
        async with registry.request(method, path, data=b"{}") as response:
            error = await error_of(response, 405, "UNSUPPORTED")
            assert response.headers["Allow"] == "GET, HEAD"
            assert "read-only mirror" in str(error["message"])
            assert error["detail"] == {"method": method}


async def test_endpoints_this_registry_does_not_offer_are_404_unsupported(
    registry: Registry,
) -> None:
    image = registry.images.oci
    for path in (
        "/v2/_catalog",
        "/v2/_catalog?n=10",
        # OCI 1.1 referrers API: a 404 is how a registry says it does not support it, and
        # clients (oras, notation) then fall back to the referrers tag schema.
        f"/v2/{image.repository}/referrers/{image.root.digest}",
        f"/v2/{image.repository}/blobs/uploads/2f1d1c9e",
        "/v2/nothing-here",
    ):
        async with registry.get(path) as response:
            await error_of(response, 404, "UNSUPPORTED")


async def test_every_answer_carries_the_api_version_header(registry: Registry) -> None:
    image = registry.images.oci
    blob_path, _ = registry.blob(image)
    requests: list[tuple[str, str, dict[str, str], int]] = [
        ("GET", manifest_path(image), {"Accept": OCI_MANIFEST}, 200),
        ("HEAD", manifest_path(image), {"Accept": OCI_MANIFEST}, 200),
        ("GET", manifest_path(image), {"If-None-Match": f'"{image.root.digest}"'}, 304),
        ("GET", manifest_path(image), {"Accept": DOCKER_MANIFEST}, 404),
        ("GET", manifest_path(image, "sha256:0"), {}, 400),
        ("GET", blob_path, {}, 200),
        ("GET", blob_path, {"Range": "bytes=0-9"}, 206),
        ("GET", blob_path, {"Range": "bytes=0-1,4-5"}, 200),
        ("GET", blob_path, {"Range": "bytes=999999999-"}, 416),
        ("GET", blob_path, {"Range": "bytes=-0"}, 416),
        ("GET", f"/v2/{image.repository}/tags/list", {}, 200),
        ("GET", "/v2/nothing/tags/list", {}, 404),
        ("DELETE", manifest_path(image), {}, 405),
        ("GET", "/v2/_catalog", {}, 404),
    ]
    for method, path, headers, status in requests:
        async with registry.request(method, path, headers=headers) as response:
            assert response.status == status, (method, path, headers)
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0", (
                method,
                path,
                headers,
            )


async def test_an_internal_error_is_a_json_500_with_the_api_version(tmp_path: Path) -> None:
    class BrokenCatalog(ImageCatalog):
        async def resolve(self, name: RepositoryName, reference: str) -> ManifestRef | None:
            raise RuntimeError("index unreadable")

    runner, host = await serve(routes(BrokenCatalog(), BlobStore(tmp_path)))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}/v2/alpine/manifests/1.0") as response,
        ):
            error = await error_of(response, 500, "UNKNOWN")
            assert "RuntimeError" in str(error["message"])
    finally:
        await runner.cleanup()


# --- manifests: content negotiation --------------------------------------------------------


async def test_each_manifest_type_is_served_to_a_client_that_asks_for_exactly_it(
    registry: Registry,
) -> None:
    images = registry.images
    for image in (images.oci, images.index, images.docker, images.docker_list):
        media_type = image.root.media_type
        async with registry.get(manifest_path(image), headers={"Accept": media_type}) as r:
            body = await r.read()
            assert r.status == 200, media_type
            assert r.headers["Content-Type"] == media_type
            assert r.headers["Docker-Content-Digest"] == image.root.digest == digest_of(body)


@pytest.mark.parametrize("accept", [CONTAINERD_ACCEPT, SKOPEO_ACCEPT], ids=["containerd", "skopeo"])
async def test_real_clients_accept_headers_get_every_type_as_stored(
    registry: Registry, accept: str
) -> None:
    images = registry.images
    for image in (images.oci, images.index, images.docker, images.docker_list):
        for reference in (image.tag, image.root.digest):
            async with registry.get(
                manifest_path(image, reference), headers={"Accept": accept}
            ) as response:
                assert response.status == 200, (image.repository, reference)
                assert response.headers["Content-Type"] == image.root.media_type
                assert response.headers["Docker-Content-Digest"] == image.root.digest


async def test_an_oci_manifest_is_unknown_to_a_client_that_does_not_accept_it(
    registry: Registry,
) -> None:
    # As distribution: "OCI manifest found, but accept header does not support OCI
    # manifests", by tag and by digest, for GET and HEAD.
    image = registry.images.oci
    only_docker = {"Accept": f"{DOCKER_MANIFEST}, {DOCKER_LIST}"}
    for reference in (image.tag, image.root.digest):
        async with registry.get(manifest_path(image, reference), headers=only_docker) as r:
            error = await error_of(r, 404, "MANIFEST_UNKNOWN")
            assert OCI_MANIFEST in str(error["message"])
        async with registry.head(manifest_path(image, reference), headers=only_docker) as r:
            assert r.status == 404
            assert await r.read() == b""


async def test_an_oci_index_is_unknown_to_a_client_that_accepts_only_image_manifests(
    registry: Registry,
) -> None:
    image = registry.images.index
    headers = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
    async with registry.get(manifest_path(image), headers=headers) as response:
        error = await error_of(response, 404, "MANIFEST_UNKNOWN")
        assert "OCI image index" in str(error["message"])


async def test_wildcards_and_a_request_without_accept_get_any_type(registry: Registry) -> None:
    # RFC 9110 12.5.1; distribution instead refuses OCI types to these requests (curl's
    # default "Accept: */*" included).
    image = registry.images.index
    for headers in ({"Accept": "*/*"}, {"Accept": "application/*"}, {}):
        async with registry.get(manifest_path(image), headers=headers) as response:
            assert response.status == 200, headers
            assert response.headers["Content-Type"] == OCI_INDEX


async def test_q_zero_refuses_a_type_even_when_a_wildcard_allows_everything(
    registry: Registry,
) -> None:
    image = registry.images.index
    refused = {"Accept": f"{OCI_INDEX};q=0, */*"}
    async with registry.get(manifest_path(image), headers=refused) as response:
        await error_of(response, 404, "MANIFEST_UNKNOWN")
    allowed = {"Accept": f"{OCI_INDEX}; q=0.5, {OCI_MANIFEST}"}
    async with registry.get(manifest_path(image), headers=allowed) as response:
        assert response.status == 200


async def test_accept_values_spread_over_several_headers_are_combined(
    registry: Registry,
) -> None:
    headers = CIMultiDict([("Accept", OCI_MANIFEST), ("Accept", OCI_INDEX)])
    async with registry.get(manifest_path(registry.images.index), headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_INDEX


async def test_a_docker_schema2_manifest_is_served_whatever_the_accept(
    registry: Registry,
) -> None:
    # As distribution 3 (2.8 tried to convert it to schema 1): nothing else to offer.
    image = registry.images.docker
    async with registry.get(manifest_path(image), headers={"Accept": OCI_MANIFEST}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == DOCKER_MANIFEST


async def test_a_docker_list_by_tag_falls_back_to_linux_amd64_for_clients_without_lists(
    registry: Registry,
) -> None:
    image = registry.images.docker_list
    amd64 = image.manifests[0]
    for method in ("GET", "HEAD"):
        async with registry.request(
            method, manifest_path(image), headers={"Accept": DOCKER_MANIFEST}
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == DOCKER_MANIFEST
            assert response.headers["Docker-Content-Digest"] == amd64.digest
            assert int(response.headers["Content-Length"]) == amd64.size
            body = await response.read()
            assert digest_of(body) == amd64.digest if method == "GET" else body == b""


async def test_a_docker_list_by_digest_is_served_as_stored(registry: Registry) -> None:
    image = registry.images.docker_list
    path = manifest_path(image, image.root.digest)
    async with registry.get(path, headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.root.digest


async def test_a_docker_list_with_no_acceptable_linux_amd64_image_is_unknown(
    registry: Registry,
) -> None:
    arm_only = registry.images.arm_only
    async with registry.get(manifest_path(arm_only), headers={"Accept": DOCKER_MANIFEST}) as r:
        error = await error_of(r, 404, "MANIFEST_UNKNOWN")
        assert "linux/amd64" in str(error["message"])
    # linux/amd64 exists but is Docker schema 2, which this client does not accept either.
    image = registry.images.docker_list
    async with registry.get(manifest_path(image), headers={"Accept": OCI_MANIFEST}) as r:
        await error_of(r, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize(
    ("accept", "allowed"),
    [
        ([], True),
        ([OCI_INDEX], True),
        ([OCI_INDEX.upper()], True),
        ([f"{OCI_INDEX}; charset=utf-8"], True),
        ([f"{OCI_MANIFEST}, {OCI_INDEX};q=0.1"], True),
        ([f"{OCI_INDEX};q=0"], False),
        ([f"{OCI_INDEX};q=0.000"], False),
        ([f"*/*, {OCI_INDEX};q=0"], False),
        ([f"application/*;q=0, {OCI_INDEX}"], True),
        (["application/*"], True),
        (["*/*;q=0"], False),
        ([OCI_MANIFEST], False),
        ([f"{OCI_INDEX};q=2"], False),  # malformed q: the range is ignored
        ([f"{OCI_INDEX};q=x, */*"], True),
        (["", " , "], False),
        ([DOCKER_LIST, OCI_INDEX], True),
    ],
)
def test_accept_rules(accept: list[str], allowed: bool) -> None:
    assert accepts(accept, OCI_INDEX) is allowed


# --- manifests: references and conditional requests -----------------------------------------


@pytest.mark.parametrize(
    "tag",
    # The first is the OCI conformance suite's "nonexistent manifest", which must be 404.
    [".INVALID_MANIFEST_NAME", "-bad", "a" * 129, "t%C3%A9"],
)
async def test_an_invalid_tag_names_no_manifest(registry: Registry, tag: str) -> None:
    path = f"/v2/{registry.images.oci.repository}/manifests/{tag}"
    async with registry.get(path) as response:
        await error_of(response, 404, "MANIFEST_UNKNOWN")
    async with registry.head(path) as response:
        assert response.status == 404
        assert await response.read() == b""


async def test_the_longest_valid_tag_is_looked_up(registry: Registry) -> None:
    path = f"/v2/{registry.images.oci.repository}/manifests/_{'a' * 127}"
    async with registry.get(path) as response:
        error = await error_of(response, 404, "MANIFEST_UNKNOWN")
        assert "not attested" in str(error["message"])


async def test_a_well_formed_sha512_digest_is_unknown_not_invalid(registry: Registry) -> None:
    repository = registry.images.oci.repository
    async with registry.get(f"/v2/{repository}/manifests/{SHA512}") as response:
        await error_of(response, 404, "MANIFEST_UNKNOWN")
    async with registry.get(f"/v2/{repository}/blobs/{SHA512}") as response:
        await error_of(response, 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:totallywrong",  # the OCI conformance suite's
        "sha256:" + "A" * 64,  # the spec requires lowercase hex for sha256
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,  # well-formed, but no registered algorithm
        "sha256:",
    ],
)
async def test_malformed_digests_and_unregistered_algorithms_are_digest_invalid(
    registry: Registry, digest: str
) -> None:
    repository = registry.images.oci.repository
    for kind in ("manifests", "blobs"):
        async with registry.get(f"/v2/{repository}/{kind}/{digest}") as response:
            error = await error_of(response, 400, "DIGEST_INVALID")
            assert error["detail"] == {"digest": digest}


async def test_head_by_digest_has_length_digest_and_type_and_no_body(registry: Registry) -> None:
    child = registry.images.index.manifests[1]
    path = manifest_path(registry.images.index, child.digest)
    async with registry.head(path, headers={"Accept": CONTAINERD_ACCEPT}) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == child.size
        assert response.headers["Docker-Content-Digest"] == child.digest
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert await response.read() == b""


async def test_if_none_match_with_the_manifest_digest_is_304(registry: Registry) -> None:
    image = registry.images.oci
    digest = image.root.digest
    for tag in (f'"{digest}"', digest, f'W/"{digest}"', f'"sha256:{"0" * 64}", "{digest}"', "*"):
        async with registry.get(manifest_path(image), headers={"If-None-Match": tag}) as r:
            assert r.status == 304, tag
            assert r.headers["ETag"] == f'"{digest}"'
            assert r.headers["Docker-Content-Digest"] == digest
            assert await r.read() == b""
    other = {"If-None-Match": f'"sha256:{"0" * 64}"'}
    async with registry.get(manifest_path(image), headers=other) as response:
        assert response.status == 200
        assert response.headers["ETag"] == f'"{digest}"'


# --- blobs ---------------------------------------------------------------------------------


async def test_blob_answers_carry_ranges_type_digest_and_caching_headers(
    registry: Registry,
) -> None:
    path, data = registry.blob(registry.images.oci)
    for method in ("GET", "HEAD"):
        async with registry.request(method, path) as response:
            assert response.status == 200
            assert response.headers["Accept-Ranges"] == "bytes"
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert response.headers["Docker-Content-Digest"] == digest_of(data)
            assert response.headers["Cache-Control"] == "max-age=31536000"
            assert int(response.headers["Content-Length"]) == len(data)
            assert response.headers["ETag"]


async def test_an_open_ended_range_is_the_rest_of_the_blob(registry: Registry) -> None:
    path, data = registry.blob(registry.images.oci)
    async with registry.get(path, headers={"Range": "bytes=1000-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert await response.read() == data[1000:]


async def test_a_range_past_the_end_is_cut_at_the_end(registry: Registry) -> None:
    path, data = registry.blob(registry.images.oci)
    async with registry.get(path, headers={"Range": "bytes=10-999999999"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
        assert await response.read() == data[10:]
    async with registry.get(path, headers={"Range": f"bytes=-{len(data) + 50}"}) as response:
        assert response.status == 206
        assert await response.read() == data


async def test_several_ranges_are_answered_with_the_whole_blob(registry: Registry) -> None:
    # RFC 9110 14.2 lets a server ignore Range; distribution would send multipart/byteranges.
    path, data = registry.blob(registry.images.oci)
    async with registry.get(path, headers={"Range": "bytes=0-1,100-199"}) as response:
        assert response.status == 200
        assert "Content-Range" not in response.headers
        assert await response.read() == data


async def test_a_range_unit_other_than_bytes_is_ignored(registry: Registry) -> None:
    # RFC 9110 14.2: a server MUST ignore a range unit it does not understand.
    path, data = registry.blob(registry.images.oci)
    async with registry.get(path, headers={"Range": "items=0-1"}) as response:
        assert response.status == 200
        assert await response.read() == data


@pytest.mark.parametrize("value", ["bytes=-0", "bytes=5-3", "bytes=abc", "bytes=999999999-"])
async def test_an_unsatisfiable_or_malformed_range_is_416_with_the_size(
    registry: Registry, value: str
) -> None:
    path, data = registry.blob(registry.images.oci)
    async with registry.get(path, headers={"Range": value}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_if_none_match_with_the_blob_etag_is_304(registry: Registry) -> None:
    path, _ = registry.blob(registry.images.oci)
    async with registry.get(path) as response:
        etag = response.headers["ETag"]
    async with registry.get(path, headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert await response.read() == b""


# --- tags ----------------------------------------------------------------------------------


async def add_tags(registry: Registry, tags: list[str]) -> str:
    """Tag the OCI image with ``tags`` as well; the repository's tags/list path."""
    for tag in tags:
        image = registry.images.oci
        registry.catalog.add(
            AcquiredImage(
                image.registry, image.repository, tag, image.root, image.manifests, image.blobs
            )
        )
    return f"/v2/{registry.images.oci.repository}/tags/list"


async def test_tag_pages_follow_links_in_case_insensitive_lexical_order(
    registry: Registry,
) -> None:
    path = await add_tags(registry, ["b", "A", "a", "C", "10", "9", "latest"])
    expected = ["1.0", "10", "9", "A", "a", "b", "C", "latest"]
    async with registry.get(path) as response:
        assert (await response.json())["tags"] == expected
    pages: list[list[str]] = []
    url = f"{path}?n=3"
    while url:
        async with registry.get(url) as response:
            assert response.status == 200
            body = await response.json()
            assert body["name"] == registry.images.oci.repository
            pages.append(body["tags"])
            link = response.headers.get("Link", "")
        assert link == "" or link.endswith('>; rel="next"')
        url = link[1 : link.index(">")] if link else ""
    assert pages == [expected[0:3], expected[3:6], expected[6:]]


async def test_n_zero_is_an_empty_list_without_a_link(registry: Registry) -> None:
    path = await add_tags(registry, ["2.0"])
    async with registry.get(f"{path}?n=0") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == []
        assert "Link" not in response.headers


async def test_last_without_n_lists_every_later_tag(registry: Registry) -> None:
    path = await add_tags(registry, ["2.0", "3.0", "B"])
    async with registry.get(f"{path}?last=2.0") as response:
        assert (await response.json())["tags"] == ["3.0", "B"]
    async with registry.get(f"{path}?last=a") as response:  # not a tag: still a position
        assert (await response.json())["tags"] == ["B"]


async def test_a_negative_n_is_pagination_number_invalid(registry: Registry) -> None:
    async with registry.get(f"/v2/{registry.images.oci.repository}/tags/list?n=-1") as r:
        await error_of(r, 400, "PAGINATION_NUMBER_INVALID")


async def test_the_next_link_keeps_the_ns_parameter(registry: Registry) -> None:
    image = registry.images.oci
    registry.catalog.add(
        AcquiredImage("docker.io", "library/alpine", "1", image.root, (), image.blobs)
    )
    registry.catalog.add(
        AcquiredImage("docker.io", "library/alpine", "2", image.root, (), image.blobs)
    )
    async with registry.get("/v2/alpine/tags/list?n=1&ns=docker.io") as response:
        assert await response.json() == {"name": "alpine", "tags": ["1"]}
        link = response.headers["Link"]
    assert link == '</v2/alpine/tags/list?n=1&last=1&ns=docker.io>; rel="next"'
    async with registry.get(link[1 : link.index(">")]) as response:
        assert (await response.json())["tags"] == ["2"]


async def test_head_of_a_tag_list_has_its_headers_and_no_body(registry: Registry) -> None:
    async with registry.head(f"/v2/{registry.images.oci.repository}/tags/list") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        assert await response.read() == b""


async def test_an_unknown_repository_is_name_unknown_with_its_name_as_detail(
    registry: Registry,
) -> None:
    async with registry.get("/v2/no/such/repo/tags/list") as response:
        error = await error_of(response, 404, "NAME_UNKNOWN")
        assert error["detail"] == {"name": "no/such/repo"}


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a__b", "a-----b", "a.b/c_d/e-f", "0/1/2/3/4/5", "x" * 255, "library/a.b-c"]
)
def test_names_the_spec_allows_are_accepted(name: str) -> None:
    assert parse_name(name, "quay.io", "docker.io") == RepositoryName("quay.io", name)


@pytest.mark.parametrize(
    "name", ["a___b", "a..b", "a._b", "_a", "a-", "/a", "a//b", "A/b", "a b", "x" * 256]
)
async def test_names_the_spec_forbids_are_name_invalid(registry: Registry, name: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_name(name, None, "docker.io")
    async with registry.get(f"/v2/{name}/manifests/1.0") as response:
        error = await error_of(response, 400, "NAME_INVALID")
        assert error["detail"] == {"name": name}


async def test_a_name_of_many_segments_is_served(registry: Registry) -> None:
    image = registry.images.oci
    registry.catalog.add(AcquiredImage("quay.io", "a/b/c/d/e", "1.0", image.root, (), image.blobs))
    path = "/v2/a/b/c/d/e/manifests/1.0?ns=quay.io"
    async with registry.get(path, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.root.digest


# --- builds --------------------------------------------------------------------------------


async def test_a_build_beyond_max_builds_is_toomanyrequests(tmp_path: Path) -> None:
    requested: list[BuildRequest] = []
    ended: list[BuildRequest] = []
    release = asyncio.Event()
    finished = asyncio.Event()

    async def request_build(build: BuildRequest) -> None:
        requested.append(build)
        await release.wait()
        ended.append(build)
        if len(ended) == 2:
            finished.set()

    runner, host = await serve(
        routes(
            ImageCatalog(),
            BlobStore(tmp_path),
            mode="fallback",
            request_build=request_build,
            max_builds=2,
        )
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def status(tag: str) -> tuple[int, str]:
                async with session.get(f"http://{host}/v2/alpine/manifests/{tag}") as response:
                    return response.status, (await response.json())["errors"][0]["code"]

            assert await status("1") == (404, "MANIFEST_UNKNOWN")
            assert await status("2") == (404, "MANIFEST_UNKNOWN")
            assert await status("3") == (429, "TOOMANYREQUESTS")
            assert await status("1") == (404, "MANIFEST_UNKNOWN")  # joins its running build
            await asyncio.sleep(0)
            assert [b.reference for b in requested] == ["1", "2"]
            release.set()
            async with asyncio.timeout(5):
                await finished.wait()
            assert await status("3") == (404, "MANIFEST_UNKNOWN")  # room again
    finally:
        release.set()
        await runner.cleanup()


# --- real clients --------------------------------------------------------------------------


def skopeo(*args: str) -> str:
    result = subprocess.run(
        [require_tool("skopeo"), *args],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_skopeo_inspects_every_manifest_type_byte_identically(registry: Registry) -> None:
    images = registry.images
    for image in (images.oci, images.index, images.docker, images.docker_list):
        for reference in (f":{image.tag}", f"@{image.root.digest}"):
            raw = await asyncio.to_thread(
                skopeo,
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{registry.host}/{image.repository}{reference}",
            )
            assert digest_of(raw.encode()) == image.root.digest


async def test_skopeo_inspect_reads_the_config_through_the_platform_image(
    registry: Registry,
) -> None:
    image = registry.images.index
    out = await asyncio.to_thread(
        skopeo,
        "inspect",
        "--tls-verify=false",
        "--override-arch=arm64",
        f"docker://{registry.host}/{image.repository}:{image.tag}",
    )
    inspected = json.loads(out)
    assert inspected["Digest"] == image.root.digest  # skopeo names what the tag points to
    assert inspected["Architecture"] == "arm64"  # read from the arm64 image's config blob


async def test_skopeo_copies_one_platform_of_a_docker_list(
    registry: Registry, tmp_path: Path
) -> None:
    image = registry.images.docker_list
    await asyncio.to_thread(
        skopeo,
        "copy",
        "--src-tls-verify=false",
        "--override-arch=arm64",
        f"docker://{registry.host}/{image.repository}:{image.tag}",
        f"dir:{tmp_path / 'out'}",
    )
    arm64 = image.manifests[1]
    assert digest_of((tmp_path / "out" / "manifest.json").read_bytes()) == arm64.digest
    for blob in json.loads(registry.content.bytes[arm64.digest])["layers"]:
        written = tmp_path / "out" / blob["digest"].removeprefix("sha256:")
        assert digest_of(written.read_bytes()) == blob["digest"]


async def test_oras_reads_every_manifest_type_with_its_own_accept_header(
    registry: Registry,
) -> None:
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    images = registry.images
    for image in (images.oci, images.index, images.docker, images.docker_list):
        target = f"{registry.host}/{image.repository}:{image.tag}"
        manifest = await asyncio.to_thread(client.get_manifest, target)
        assert manifest["mediaType"] == image.root.media_type
