"""The pull API's Prometheus counters: requests by status code, cache hits and misses."""

import hashlib
import json
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from image_catalog import ImageCatalog
from prometheus_client import CollectorRegistry
from pyrsia_node.attestation import AcquiredImage, Artifact
from pyrsia_node.registry import routes
from pyrsia_node.store import BlobStore

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_requests_hits_and_misses_are_counted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    layer = b"layer bytes"
    manifest = json.dumps({"schemaVersion": 2, "layers": [{"digest": digest(layer)}]}).encode()
    await store.put_bytes(digest(manifest), manifest)
    fetched: list[str] = []

    async def fetch(wanted: str) -> None:
        fetched.append(wanted)
        await store.put_bytes(wanted, layer)

    catalog = ImageCatalog()
    catalog.add(
        AcquiredImage(
            "docker.io",
            "library/app",
            "1.0",
            Artifact(digest(manifest), len(manifest), OCI_MANIFEST),
            (),
            (Artifact(digest(layer), len(layer), "application/octet-stream"),),
        )
    )
    metrics = CollectorRegistry()
    app = web.Application()
    app.add_routes(routes(catalog, store, fetch=fetch, metrics_registry=metrics))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/v2/app/manifests/1.0")).status == 200
        assert (await client.get(f"/v2/app/blobs/{digest(layer)}")).status == 200
        assert (await client.get(f"/v2/app/blobs/{digest(layer)}")).status == 200
        assert (await client.get("/v2/app/manifests/2.0")).status == 404
        assert (await client.get("/v2/app/manifests/sha256:bad")).status == 400
    assert fetched == [digest(layer)]
    assert value(metrics, "pyrsia_registry_requests_total", code="200") == 3
    assert value(metrics, "pyrsia_registry_requests_total", code="404") == 1
    assert value(metrics, "pyrsia_registry_requests_total", code="400") == 1
    assert value(metrics, "pyrsia_registry_cache_hits_total") == 2  # manifest, second blob
    assert value(metrics, "pyrsia_registry_cache_misses_total") == 1  # first blob
