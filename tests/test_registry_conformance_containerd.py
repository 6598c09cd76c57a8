"""containerd, the client a cluster's nodes pull with, using the pull API as a mirror.

A real containerd daemon (Debian's package, started by the test in a temp dir with its CRI
plugin off) fetches images with ``ctr content fetch --hosts-dir``: a ``hosts.toml`` lists
the node as a ``pull``/``resolve`` mirror in front of the upstream, exactly as the chart's
containerd configuration does. containerd then sends what it sends in a cluster: HEAD to
resolve the tag, ``?ns=<upstream>`` on every request, its ``Accept`` list with ``*/*``,
and it falls back to the upstream on any 404 (or other error) from the mirror.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from image_catalog import ImageCatalog
from oci_fixtures import (
    TOOL_TIMEOUT,
    SeededImages,
    UpstreamRegistry,
    free_port,
    require_tool,
    seeded_images,
    upstream_registry,
)
from pyrsia_node.attestation import AcquiredImage
from pyrsia_node.registry import BuildRequest, RepositoryName, routes
from pyrsia_node.store import BlobStore
from test_registry_conformance import Content, build_images, serve

__all__ = ["seeded_images", "upstream_registry"]


@dataclass
class Containerd:
    socket: str
    hosts_dir: Path

    def mirror(self, registry: str, upstream: str, mirror_host: str) -> None:
        """containerd's hosts.toml for ``registry``: the mirror first, then ``upstream``."""
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            f'server = "{upstream}"\n'
            f'[host."http://{mirror_host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )

    async def ctr(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            require_tool("ctr"),
            "--address",
            self.socket,
            "--namespace",
            "pyrsia-test",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, err.decode()
        return out.decode()

    async def fetch(self, reference: str) -> None:
        await self.ctr(
            "content", "fetch", "--all-platforms", "--hosts-dir", str(self.hosts_dir), reference
        )

    async def digests(self) -> set[str]:
        lines = (await self.ctr("content", "ls", "--quiet")).split()
        return set(lines)


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    binary = require_tool("containerd")
    require_tool("ctr")
    # A unix socket path must stay under 108 bytes; pytest's tmp_path may not.
    run = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    socket = str(run / "containerd.sock")
    config = tmp_path / "containerd.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{tmp_path / "root"}"\n'
        f'state = "{run / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
    )
    log = tmp_path / "containerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"containerd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Containerd(socket, tmp_path / "hosts")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(run, ignore_errors=True)


@dataclass
class Node:
    host: str
    image: AcquiredImage


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """A node whose catalog commits an OCI index as ``docker.io/library/alpine:1.0``."""
    store = BlobStore(tmp_path / "blobs")
    images = await build_images(Content(store))
    index = images.index
    image = AcquiredImage(
        "docker.io", "library/alpine", "1.0", index.root, index.manifests, index.blobs
    )
    catalog = ImageCatalog()
    catalog.add(image)
    runner, host = await serve(routes(catalog, store, default_registry="docker.io"))
    try:
        yield Node(host, image)
    finally:
        await runner.cleanup()


async def test_containerd_pulls_every_platform_from_the_mirror_alone(
    containerd: Containerd, node: Node
) -> None:
    # The upstream is unreachable: every byte comes from the mirror (containerd verifies
    # each digest as it writes the content).
    containerd.mirror("docker.io", f"http://127.0.0.1:{free_port()}", node.host)
    await containerd.fetch("docker.io/library/alpine:1.0")
    assert node.image.digests <= await containerd.digests()


async def test_containerd_falls_back_to_the_upstream_while_the_build_is_requested(
    containerd: Containerd,
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    tmp_path: Path,
) -> None:
    requested: list[BuildRequest] = []

    async def request_build(build: BuildRequest) -> None:
        requested.append(build)

    runner, host = await serve(
        routes(
            ImageCatalog(),
            BlobStore(tmp_path / "blobs"),
            mode="fallback",
            request_build=request_build,
            default_registry="docker.io",
        )
    )
    try:
        containerd.mirror(upstream_registry.host, upstream_registry.url, host)
        await containerd.fetch(f"{upstream_registry.host}/test/multiarch:1.0")
    finally:
        await runner.cleanup()
    assert seeded_images.multiarch.digests <= await containerd.digests()
    # containerd named the upstream with ?ns=HOST:PORT; the build is for that registry.
    assert BuildRequest(RepositoryName(upstream_registry.host, "test/multiarch"), "1.0") in (
        requested
    )
