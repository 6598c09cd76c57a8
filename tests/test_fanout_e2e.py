"""Issue 6 with real processes: 8 peers pull one image at once, the upstream serves it once.

A ``LocalNetwork`` of 1 authority and 8 peers (real node processes, mutual TLS on
loopback) mirrors Debian's ``docker-registry`` through a counting proxy that records every
request (method and path) the network makes to its upstream. Every authority acquires an
image from the upstream independently; with a single authority that is exactly one
upstream copy, so the proxy must see exactly one GET per blob digest and per manifest.
Peers never talk to the upstream: whatever they serve they download peer to peer over
gRPC (from the authority or from each other).

The image (4 gzip layers of about 2 MiB of random bytes each, plus its config) is built
first through the admin API and the test waits until every peer's log holds the
committed record; then 8 ``skopeo copy`` processes run at once, one per peer, each into
an OCI layout of its own. Every blob a client wrote is re-hashed and compared with what
was pushed upstream, and each peer's ``pyrsia_transfer_downloaded_bytes_total`` must have
grown by at least the image's blob bytes: the bytes came from peers, not from upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port_block, require_tool
from oci_fixtures import (
    TOOL_TIMEOUT,
    OciLayout,
    SeededImage,
    UpstreamRegistry,
    free_port,
    read_layout_digests,
    upstream_registry,
)
from prometheus_client.parser import text_string_to_metric_families
from pyrsia_node.genesis import Upstream
from pyrsia_node.localnet import LocalNetwork, Shape, fetch_json

__all__ = ["upstream_registry"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PEERS = 8
LAYERS = 4
LAYER_BYTES = 2 << 20
REPOSITORY = "test/fanout"
TAG = "1.0"
PACKAGE_ID = f"docker.io/{REPOSITORY}:{TAG}"
DOWNLOADED = "pyrsia_transfer_downloaded_bytes_total"
UPLOADED = "pyrsia_transfer_uploaded_bytes_total"


class CountingProxy:
    """A pass-through aiohttp proxy in front of the upstream registry, in a thread of its
    own so it keeps answering while the test blocks on node processes and skopeo. It
    forwards the request's method, counts ``(method, path)`` and streams bodies through."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.url = ""
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def counts(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self._counts)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._proxy)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        with self._lock:
            self._counts[(request.method, request.path)] += 1
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("accept", "range", "authorization")
        }
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read() if request.can_read_body else None,
            allow_redirects=True,
        ) as upstream:
            out_headers = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower()
                in ("content-type", "content-length", "docker-content-digest", "www-authenticate")
            }
            if request.method == "HEAD":
                return web.Response(status=upstream.status, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response


@dataclass(frozen=True, slots=True)
class FanOutImage:
    image: SeededImage
    sizes: dict[str, int]  # blob digest -> size (config and layers)


def seed_image(registry: UpstreamRegistry, root: Path) -> FanOutImage:
    layout = OciLayout(root)
    files = [
        {f"fanout/layer{i}/data.bin": os.urandom(LAYER_BYTES + i * 4096)} for i in range(LAYERS)
    ]
    manifest, manifest_bytes = layout.image(files)
    layout.tag("fanout", manifest)
    layout.push(registry, "fanout", f"{REPOSITORY}:{TAG}")
    doc = json.loads(manifest_bytes)
    descriptors = [doc["config"], *doc["layers"]]
    sizes = {d["digest"]: d["size"] for d in descriptors}
    image = SeededImage(REPOSITORY, TAG, manifest, (), tuple(sorted(sizes)))
    return FanOutImage(image, sizes)


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_build(node_url: str, build_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = fetch_json(f"{node_url}/api/v1/builds/{build_id}", timeout=5)
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.2)
    pytest.fail(f"build {build_id} did not finish within {timeout} s")


def has_record(node_url: str) -> bool:
    query = urllib.parse.urlencode({"package_id": PACKAGE_ID})
    records = fetch_json(f"{node_url}/api/v1/log/records?{query}", timeout=5)["records"]
    return bool(records)


def counter(metrics_url: str, name: str) -> float:
    """A counter's value from a node's ``/metrics`` (0 when it was never incremented)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def skopeo_copy(skopeo: str, host: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            skopeo,
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/{REPOSITORY}:{TAG}",
            f"oci:{out}:{TAG}",
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


@pytest.fixture
def proxy(upstream_registry: UpstreamRegistry) -> Iterator[CountingProxy]:
    counting = CountingProxy(upstream_registry.url)
    try:
        counting.start()
        yield counting
    finally:
        counting.close()


@pytest.mark.parametrize("built", [True, False], ids=["built-first", "cold"])
def test_eight_peers_pull_at_once_and_the_upstream_serves_each_blob_once(
    upstream_registry: UpstreamRegistry, proxy: CountingProxy, tmp_path: Path, built: bool
) -> None:
    """1 authority + 8 peers. Each authority fetches from upstream independently, and
    there is one authority, so the whole network makes exactly one upstream copy: one GET
    per blob digest and one per manifest, however many peers pull at once.

    ``built-first``: the image is built and committed (on every peer) before the pulls,
    and the upstream must see no request at all during them. ``cold``: the 8 concurrent
    pulls find nothing committed; each peer (strict mode) asks for a build and waits for
    the commit, and the authority must run one acquisition for all of them."""
    skopeo = require_tool("skopeo")
    require_tool("docker-registry")
    seeded = seed_image(upstream_registry, tmp_path / "seed")
    image = seeded.image
    shape = Shape(
        authorities=1,
        peers=PEERS,
        base_port=free_port_block(10 * (1 + PEERS)),
        host="127.0.0.1",
        upstreams=(Upstream("docker.io", proxy.url, insecure=True),),
    )
    network = LocalNetwork(tmp_path / "net", shape)
    peers = [f"peer-{i}" for i in range(PEERS)]
    try:
        started = time.monotonic()
        network.start()
        network.wait_connected(timeout=60)
        connected = time.monotonic() - started
        print(f"network of 1 authority + {PEERS} peers connected in {connected:.1f} s")

        if built:
            authority = network.node("authority-0").http_url
            started = time.monotonic()
            build = post_json(
                f"{authority}/api/v1/builds",
                {"package_type": "docker", "image": f"{REPOSITORY}:{TAG}"},
            )
            status = wait_build(authority, build["id"], timeout=60)
            assert status["state"] == "done", status
            assert status["manifest_digest"] == image.root.digest
            deadline = time.monotonic() + 30
            waiting = set(peers)
            while waiting:
                waiting = {p for p in waiting if not has_record(network.node(p).http_url)}
                assert time.monotonic() < deadline, f"no committed record on {sorted(waiting)}"
                if waiting:
                    time.sleep(0.2)
            print(f"built and committed on every peer in {time.monotonic() - started:.1f} s")
        after_build = proxy.counts()

        (tmp_path / "pulled").mkdir()
        before = {p: counter(network.node(p).metrics_url, DOWNLOADED) for p in peers}
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=PEERS) as pool:
            futures = {
                p: pool.submit(
                    skopeo_copy,
                    skopeo,
                    f"{network.node(p).host}:{network.node(p).http_port}",
                    tmp_path / "pulled" / p,
                )
                for p in peers
            }
            results = {p: f.result() for p, f in futures.items()}
        elapsed = time.monotonic() - started
        total = sum(seeded.sizes.values())
        print(f"{PEERS} concurrent skopeo pulls of {total / 2**20:.1f} MiB: {elapsed:.1f} s")

        failed = {p: r.stderr for p, r in results.items() if r.returncode != 0}
        assert not failed, failed
        for p in peers:
            out = tmp_path / "pulled" / p
            index = json.loads((out / "index.json").read_text())
            assert [m["digest"] for m in index["manifests"]] == [image.root.digest], p
            hashes = read_layout_digests(out)
            assert all(name == actual for name, actual in hashes.items()), p
            assert set(hashes) == set(image.digests), p

        # The upstream: one GET per blob and per manifest, all of them during the build.
        counts = proxy.counts()
        if built:
            assert counts == after_build, "the upstream was contacted during the peers' pulls"
        blob_gets = {d: counts[("GET", f"/v2/{REPOSITORY}/blobs/{d}")] for d in image.blobs}
        assert blob_gets == dict.fromkeys(image.blobs, 1), counts
        manifest_gets = {
            path: n
            for (method, path), n in counts.items()
            if method == "GET" and "/manifests/" in path
        }
        assert list(manifest_gets.values()) == [1], manifest_gets
        print(f"upstream requests: {dict(counts)}")

        # The bytes came peer to peer: every peer downloaded at least the image's blobs.
        after = {p: counter(network.node(p).metrics_url, DOWNLOADED) for p in peers}
        grown = {p: after[p] - before[p] for p in peers}
        assert all(grown[p] >= total for p in peers), (grown, total)
        served = {n.name: counter(n.metrics_url, UPLOADED) for n in network.nodes}
        print(f"bytes downloaded per peer: {grown}; uploaded per node: {served}")
    finally:
        network.stop()
