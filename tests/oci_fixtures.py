"""Real OCI parts for tests: Debian's ``docker-registry`` as upstream, images we build.

- ``UpstreamRegistry``/``start_registry``: ``docker-registry serve`` on a free loopback
  port with filesystem storage in a temp dir; stopped by pid.
- ``OciLayout``: writes an OCI image layout by hand (gzip and plain tar layers, image
  manifests, multi-arch indexes), pushed with ``skopeo copy oci:DIR:tag docker://...``.
- ``push_raw``: pushes exact manifest bytes through the registry API (Docker v2 schema 2
  manifests and manifest lists, which skopeo would convert).
- ``UpstreamProxy``: an aiohttp proxy in front of the registry that can require Docker
  Hub style bearer tokens, fail the first requests with 503, or flip a byte of one blob.
- ``read_layout_digests``: what a client actually wrote, re-hashed.

Test modules import the fixtures they need from here (``tests/conftest.py`` is the lead's).
In CI (``CI=true``) a missing tool fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

TOOL_TIMEOUT = 240


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; install Debian's {name} package (apt-get install)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run_tool(*args: str) -> None:
    """Run a CLI tool to completion (bounded); fail with its stderr."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")


@dataclass(frozen=True, slots=True)
class UpstreamRegistry:
    host: str
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            out["platform"] = self.platform
        return out


def _wait_for_registry(host: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    pytest.fail(f"docker-registry on {host} did not answer within 20s: {log.read_text()[-2000:]}")


@dataclass
class _Process:
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_registry(root: Path) -> tuple[UpstreamRegistry, _Process]:
    """Start ``docker-registry serve`` with storage under ``root``; stop it with ``.stop()``."""
    binary = require_tool("docker-registry")
    port = free_port()
    host = f"127.0.0.1:{port}"
    (root / "storage").mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        "http:\n"
        f"  addr: {host}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    handle = _Process(process)
    try:
        _wait_for_registry(host, process, log)
    except BaseException:
        handle.stop()
        raise
    return UpstreamRegistry(host, root), handle


@pytest.fixture(scope="session")
def upstream_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    registry, handle = start_registry(tmp_path_factory.mktemp("upstream-registry"))
    try:
        yield registry
    finally:
        handle.stop()


@dataclass
class OciLayout:
    """An OCI image layout directory written by hand, blob by blob."""

    root: Path
    refs: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def image(
        self,
        files: list[dict[str, bytes]],
        *,
        arch: str = "amd64",
        compress: bool = True,
        config_type: str = OCI_CONFIG,
        layer_type: str | None = None,
        manifest_type: str = OCI_MANIFEST,
    ) -> tuple[Descriptor, bytes]:
        """An image with one layer per dict of path → content; returns its manifest."""
        layers, diff_ids = [], []
        for layer_files in files:
            tar = tar_bytes(layer_files)
            diff_ids.append(sha256(tar))
            data = gzip.compress(tar, mtime=0) if compress else tar
            media_type = layer_type or (OCI_LAYER_GZIP if compress else OCI_LAYER_TAR)
            layers.append(self.blob(data, media_type))
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_desc = self.blob(json.dumps(config).encode(), config_type)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": config_desc.to_dict(),
                "layers": [layer.to_dict() for layer in layers],
            },
            indent=2,
        ).encode()
        desc = self.blob(manifest, manifest_type)
        return Descriptor(
            desc.media_type, desc.digest, desc.size, {"architecture": arch, "os": "linux"}
        ), manifest

    def index(
        self, manifests: list[Descriptor], media_type: str = OCI_INDEX
    ) -> tuple[Descriptor, bytes]:
        data = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "manifests": [m.to_dict() for m in manifests],
            },
            indent=2,
        ).encode()
        return self.blob(data, media_type), data

    def tag(self, name: str, descriptor: Descriptor) -> None:
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size).to_dict()
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.refs.append(entry)
        self._write_index()

    def _write_index(self) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs})
        )

    def read(self, digest: str) -> bytes:
        return (self.root / "blobs" / "sha256" / digest[7:]).read_bytes()

    def push(self, registry: UpstreamRegistry, tag: str, target: str) -> None:
        """``skopeo copy --all oci:<layout>:<tag> docker://<registry>/<target>``."""
        skopeo = require_tool("skopeo")
        run_tool(
            skopeo,
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{self.root}:{tag}",
            f"docker://{registry.host}/{target}",
        )


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def push_raw(
    registry: UpstreamRegistry,
    name: str,
    blobs: list[bytes],
    manifests: list[tuple[str, bytes, str]],
) -> None:
    """Upload blobs, then manifests ``(reference, bytes, media type)`` byte for byte."""
    base = registry.url
    for data in blobs:
        start = urllib.request.Request(f"{base}/v2/{name}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=30) as response:
            location = response.headers["Location"]
        if location.startswith("/"):
            location = base + location
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{sep}digest={sha256(data)}",
            data=data,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(put, timeout=60) as response:
            assert response.status == 201, response.status
    for reference, data, media_type in manifests:
        put = urllib.request.Request(
            f"{base}/v2/{name}/manifests/{reference}",
            data=data,
            method="PUT",
            headers={"Content-Type": media_type},
        )
        with urllib.request.urlopen(put, timeout=30) as response:
            assert response.status == 201, response.status


def read_layout_digests(layout: Path) -> dict[str, str]:
    """Every blob file in an OCI layout mapped to the sha256 of its content (re-hashed)."""
    out = {}
    for path in sorted((layout / "blobs" / "sha256").iterdir()):
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
        out["sha256:" + path.name] = "sha256:" + hasher.hexdigest()
    return out


@dataclass
class UpstreamProxy:
    """A fault-injecting aiohttp proxy in front of an upstream registry (in the test loop).

    ``rename=(a, b)`` serves repository ``b`` whenever ``a`` is asked for: an upstream that
    consistently lies about what a tag contains.
    """

    target: str
    require_token: bool = False
    tamper_digest: str | None = None
    fail_first: int = 0
    rename: tuple[str, str] | None = None
    requests: list[str] = field(default_factory=list)
    token_requests: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    TOKEN = "test-token-123"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/{path:.*}", self._proxy)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append(request.query_string)
        return web.json_response({"token": self.TOKEN, "expires_in": 300})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        self.requests.append(request.path)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="try later")
        if self.require_token and request.headers.get("Authorization") != f"Bearer {self.TOKEN}":
            repo = request.path.removeprefix("/v2/").rsplit("/", 2)[0]
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "auth required"}]},
                status=401,
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="{self.url}/token",service="test-registry",'
                        f'scope="repository:{repo}:pull"'
                    )
                },
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "range")}
        path = request.path_qs
        if self.rename is not None:
            path = path.replace(f"/v2/{self.rename[0]}/", f"/v2/{self.rename[1]}/", 1)
        async with self._session.get(self.target + path, headers=headers) as upstream:
            body = await upstream.read()
            out_headers = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() in ("content-type", "docker-content-digest")
            }
            if self.tamper_digest is not None and request.path.endswith(self.tamper_digest):
                flipped = bytearray(body)
                flipped[len(flipped) // 2] ^= 0xFF
                body = bytes(flipped)
            return web.Response(status=upstream.status, body=body, headers=out_headers)


@pytest.fixture
async def proxy_factory(
    upstream_registry: UpstreamRegistry,
) -> AsyncIterator[list[UpstreamProxy]]:
    """Start proxies with ``await start_proxy(proxies, upstream_registry, ...)``; all stopped."""
    proxies: list[UpstreamProxy] = []
    try:
        yield proxies
    finally:
        for proxy in proxies:
            await proxy.stop()


async def start_proxy(
    proxies: list[UpstreamProxy], registry: UpstreamRegistry, **options: object
) -> UpstreamProxy:
    proxy = UpstreamProxy(registry.url, **options)  # type: ignore[arg-type]
    await proxy.start()
    proxies.append(proxy)
    return proxy


@dataclass(frozen=True, slots=True)
class SeededImage:
    """An image pushed to the upstream: its repository, tag and every digest it consists of."""

    repository: str
    tag: str
    root: Descriptor
    manifests: tuple[str, ...]
    blobs: tuple[str, ...]

    @property
    def digests(self) -> frozenset[str]:
        return frozenset({self.root.digest, *self.manifests, *self.blobs})


@dataclass(frozen=True, slots=True)
class SeededImages:
    multilayer: SeededImage
    multiarch: SeededImage
    docker_list: SeededImage


def _layer_files(seed: str, count: int) -> list[dict[str, bytes]]:
    return [
        {f"{seed}/layer{i}/file.bin": os.urandom(50_000 + i * 1000), f"{seed}/layer{i}/n": b"x"}
        for i in range(count)
    ]


@pytest.fixture(scope="session")
def seeded_images(
    upstream_registry: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory
) -> SeededImages:
    """Several images in the upstream: 4 layers; a 2-platform OCI index; a Docker list."""
    layout = OciLayout(tmp_path_factory.mktemp("seed-layout"))
    multi, _ = layout.image(_layer_files("multi", 4))
    layout.tag("multilayer", multi)
    shared = _layer_files("shared", 1)
    amd, _ = layout.image([*shared, *_layer_files("amd", 1)], arch="amd64")
    arm, _ = layout.image([*shared, *_layer_files("arm", 1)], arch="arm64")
    index, _ = layout.index([amd, arm])
    layout.tag("multiarch", index)
    layout.push(upstream_registry, "multilayer", "test/multilayer:1.0")
    layout.push(upstream_registry, "multiarch", "test/multiarch:1.0")

    docker = OciLayout(tmp_path_factory.mktemp("docker-layout"))
    docker_manifests = [
        docker.image(
            _layer_files(arch, 2),
            arch=arch,
            config_type=DOCKER_CONFIG,
            layer_type=DOCKER_LAYER,
            manifest_type=DOCKER_MANIFEST,
        )
        for arch in ("amd64", "arm64")
    ]
    docker_list, docker_list_bytes = docker.index([d for d, _ in docker_manifests], DOCKER_LIST)
    docker_blobs = []
    for _, manifest in docker_manifests:
        doc = json.loads(manifest)
        for desc in [doc["config"], *doc["layers"]]:
            docker_blobs.append(docker.read(desc["digest"]))
    push_raw(
        upstream_registry,
        "test/dockerlist",
        docker_blobs,
        [
            *((d.digest, m, DOCKER_MANIFEST) for d, m in docker_manifests),
            ("1.0", docker_list_bytes, DOCKER_LIST),
        ],
    )

    def seeded(
        repo: str, root: Descriptor, manifests: list[Descriptor], lay: OciLayout
    ) -> SeededImage:
        blobs: set[str] = set()
        for m in manifests:
            doc = json.loads(lay.read(m.digest))
            blobs.update(d["digest"] for d in [doc["config"], *doc["layers"]])
        children = tuple(m.digest for m in manifests if m.digest != root.digest)
        return SeededImage(repo, "1.0", root, children, tuple(sorted(blobs)))

    return SeededImages(
        multilayer=seeded("test/multilayer", multi, [multi], layout),
        multiarch=seeded("test/multiarch", index, [amd, arm], layout),
        docker_list=seeded(
            "test/dockerlist", docker_list, [d for d, _ in docker_manifests], docker
        ),
    )


BIG_LAYER_BYTES = 200 << 20


@pytest.fixture(scope="session")
def big_image(
    upstream_registry: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory
) -> SeededImage:
    """An image with one 200 MiB layer of random bytes (uncompressed tar)."""
    layout = OciLayout(tmp_path_factory.mktemp("big-layout"))
    manifest, _ = layout.image([{"big.bin": os.urandom(BIG_LAYER_BYTES)}], compress=False)
    layout.tag("big", manifest)
    layout.push(upstream_registry, "big", "test/big:1.0")
    doc = json.loads(layout.read(manifest.digest))
    blobs = tuple(sorted(d["digest"] for d in [doc["config"], *doc["layers"]]))
    return SeededImage("test/big", "1.0", manifest, (), blobs)
