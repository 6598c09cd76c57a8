"""OCI Distribution pull API: what containerd, skopeo, docker and oras talk to.

``routes(catalog, store, ...)`` returns aiohttp route definitions for ``/v2/``:
manifests (GET/HEAD by tag or digest), blobs (GET/HEAD with ``Range``: 206/416, streamed
with sendfile) and ``tags/list`` (paginated with ``n``/``last``). Errors are the spec's
JSON bodies and codes.

Names: ``?ns=<registry>`` (sent by containerd to mirrors) names the upstream registry;
without it a first path segment that looks like a host (``ghcr.io/...``) does, else the
default registry. On Docker Hub a one-segment name means ``library/<name>``.

Invariant: this module serves only what ``Catalog`` says a committed record covers. It
never reads upstreams and never serves a blob or manifest the catalog does not vouch for.
When content is unknown it may ask for a build through the injected ``request_build``:
mode ``fallback`` answers 404 at once (containerd then pulls from its upstream while the
authorities acquire), mode ``strict`` waits up to ``build_timeout`` for the commit.
Committed content that is not in the local store yet is made present through the injected
``fetch`` (the node passes peer-to-peer distribution), which verifies digests before the
bytes become visible; without ``fetch`` such content answers 404. With ``follow`` as well,
a plain GET of a missing blob streams the bytes to the client while the node downloads
them (``pyrsia_node.follow``): the last chunk is held back until the whole blob verified,
and on a digest failure the connection is dropped, so a client never receives a complete
body of unverified bytes (its own digest check stays the backstop). The record covering
the blob committed before any of it is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from pyrsia_node.attestation import AcquiredImage
from pyrsia_node.follow import BlobFeed, FeedDetached, Follow, read_from
from pyrsia_node.store import BlobNotFound, BlobStore

log = logging.getLogger(__name__)

Mode = Literal["strict", "fallback"]

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REGISTRY_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$")
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_PATH = re.compile(r"^(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_TAGS = re.compile(r"^(?P<name>.+)/tags/list$")
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class RepositoryName:
    """A repository on a named upstream registry, e.g. ``docker.io`` + ``library/alpine``."""

    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass(frozen=True, slots=True)
class ManifestRef:
    """A committed manifest or index: what a tag or digest resolves to."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """A client asked for content the catalog does not know: acquire it."""

    name: RepositoryName
    reference: str


class BuildRejected(Exception):
    """Raised by a ``request_build`` callback when the build ended without a commit.

    The message is shown to the pulling client, so say what failed (e.g. the authorities'
    mismatch report).
    """


RequestBuild = Callable[[BuildRequest], Coroutine[Any, Any, None]]


class ContentUnavailable(Exception):
    """Raised by a ``fetch`` callback when committed content could not be fetched; the
    message is shown to the pulling client."""


Fetch = Callable[[str], Coroutine[Any, Any, None]]


class Catalog(Protocol):
    """Read access to committed content; the ledger-backed implementation provides it."""

    async def resolve(self, name: RepositoryName, reference: str) -> ManifestRef | None:
        """The manifest a tag or digest names in ``name``, if a committed record covers it."""

    async def tags(self, name: RepositoryName) -> Sequence[str] | None:
        """Committed tags of ``name``; None when the repository is unknown."""

    async def has_blob(self, name: RepositoryName, digest: str) -> bool:
        """True when a committed record of ``name`` covers blob ``digest``."""


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
        if _DIGEST.match(reference):
            return self._manifests.get(name, {}).get(reference)
        return self._tags.get(name, {}).get(reference)

    async def tags(self, name: RepositoryName) -> Sequence[str] | None:
        tags = self._tags.get(name)
        return None if tags is None else sorted(tags)

    async def has_blob(self, name: RepositoryName, digest: str) -> bool:
        return digest in self._blobs.get(name, ()) or digest in self._manifests.get(name, {})


class RegistryError(web.HTTPException):
    """An OCI Distribution error response: status plus ``{"errors": [{code, message}]}``."""

    def __init__(self, status: int, code: str, message: str, *, head: bool) -> None:
        self.status_code = status
        body = None if head else json.dumps({"errors": [{"code": code, "message": message}]})
        super().__init__(
            headers=_API_VERSION,
            text=body,
            content_type=None if head else "application/json",
        )


def parse_name(path_name: str, ns: str | None, default_registry: str) -> RepositoryName:
    """The repository a client means by ``path_name`` (and ``?ns=``); ValueError if invalid."""
    if len(path_name) > _MAX_NAME or not _NAME.match(path_name):
        raise ValueError(
            f"repository name {path_name!r} is invalid: use lowercase components of letters, "
            "digits and separators ('.', '_', '__', '-') joined by '/'"
        )
    registry = default_registry
    repository = path_name
    if ns:
        if not _REGISTRY_HOST.match(ns):
            raise ValueError(f"ns={ns!r} is not a registry host name")
        registry = ns
    else:
        first, _, rest = path_name.partition("/")
        if rest and ("." in first or first == "localhost"):
            registry, repository = first, rest
    if registry in _DOCKER_HUB:
        registry = "docker.io"
        if "/" not in repository:
            repository = f"library/{repository}"
    return RepositoryName(registry, repository)


class _Mirror:
    def __init__(
        self,
        catalog: Catalog,
        store: BlobStore,
        mode: Mode,
        request_build: RequestBuild | None,
        build_timeout: float,
        default_registry: str,
        fetch: Fetch | None,
        follow: Follow | None,
        metrics: RegistryMetrics,
    ) -> None:
        self.fetch = fetch
        self.follow = follow
        self.catalog = catalog
        self.store = store
        self.mode = mode
        self.request_build = request_build
        self.build_timeout = build_timeout
        self.default_registry = default_registry
        self.builds: dict[BuildRequest, asyncio.Task[None]] = {}
        self.metrics = metrics

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        head = request.method == "HEAD"
        path = request.match_info["path"]
        if path == "":
            return web.json_response({}, headers=_API_VERSION)
        if match := _PATH.match(path):
            name = self._name(request, match["name"], head)
            if match["kind"] == "manifests":
                return await self.manifest(name, match["reference"], head)
            return await self.blob(request, name, match["reference"], head)
        if (match := _TAGS.match(path)) and not head:
            return await self.tag_list(request, match["name"])
        raise RegistryError(404, "NOT_FOUND", f"no such endpoint: /v2/{path}", head=head)

    def _name(self, request: web.Request, path_name: str, head: bool) -> RepositoryName:
        try:
            return parse_name(path_name, request.query.get("ns"), self.default_registry)
        except ValueError as exc:
            raise RegistryError(400, "NAME_INVALID", str(exc), head=head) from exc

    async def manifest(
        self, name: RepositoryName, reference: str, head: bool
    ) -> web.StreamResponse:
        if ":" in reference:
            if not _DIGEST.match(reference):
                raise RegistryError(
                    400, "DIGEST_INVALID", f"{reference!r}: only sha256 digests", head=head
                )
        elif not _TAG.match(reference):
            raise RegistryError(400, "TAG_INVALID", f"{reference!r} is not a valid tag", head=head)
        ref = await self.catalog.resolve(name, reference)
        if ref is None:
            ref = await self._build(name, reference, head)
        await self._make_present(name, ref.digest, "MANIFEST_UNKNOWN", head)
        try:
            data = await self.store.read(ref.digest)
        except BlobNotFound as exc:
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{name}@{ref.digest} is committed but not on this node yet; retry shortly",
                head=head,
            ) from exc
        headers = {
            **_API_VERSION,
            "Docker-Content-Digest": ref.digest,
            "Content-Type": ref.media_type,
            "Content-Length": str(len(data)),
            "ETag": f'"{ref.digest}"',
        }
        if head:
            return web.Response(headers=headers)
        return web.Response(body=data, headers=headers)

    async def _make_present(self, name: RepositoryName, digest: str, code: str, head: bool) -> None:
        """Fetch committed content missing from the store, if a ``fetch`` was given."""
        if self.store.has(digest):
            self.metrics.cache_hits.inc()
            return
        self.metrics.cache_misses.inc()
        if self.fetch is None:
            return
        try:
            await self.fetch(digest)
        except ContentUnavailable as exc:
            raise RegistryError(
                404,
                code,
                f"{name}@{digest} is committed but could not be fetched from the network: "
                f"{exc}; retry shortly",
                head=head,
            ) from exc

    async def _build(self, name: RepositoryName, reference: str, head: bool) -> ManifestRef:
        """Ask for a build of unknown content; in strict mode wait for its commit."""
        unknown = f"{name}:{reference} is not attested by the authorities"
        if self.request_build is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", unknown, head=head)
        build = BuildRequest(name, reference)
        task = self.builds.get(build)
        if task is None:
            task = asyncio.create_task(self.request_build(build), name=f"build {build}")
            self.builds[build] = task
            task.add_done_callback(lambda done: self._build_done(build, done))
        if self.mode == "fallback":
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{unknown}; a build was requested, pull from upstream meanwhile",
                head=head,
            )
        try:
            await asyncio.wait_for(asyncio.shield(task), self.build_timeout)
        except TimeoutError:
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{unknown} yet: the build did not commit within {self.build_timeout:g}s; "
                "retry later",
                head=head,
            ) from None
        except BuildRejected as exc:
            raise RegistryError(
                404, "MANIFEST_UNKNOWN", f"{unknown}: the build failed: {exc}", head=head
            ) from exc
        ref = await self.catalog.resolve(name, reference)
        if ref is None:
            raise RegistryError(
                404, "MANIFEST_UNKNOWN", f"{unknown}: the build ended without a commit", head=head
            )
        return ref

    def _build_done(self, build: BuildRequest, task: asyncio.Task[None]) -> None:
        self.builds.pop(build, None)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, BuildRejected):
            log.warning("build of %s:%s rejected: %s", build.name, build.reference, exc)
        elif exc is not None:
            log.error("build of %s:%s failed", build.name, build.reference, exc_info=exc)

    async def blob(
        self, request: web.Request, name: RepositoryName, digest: str, head: bool
    ) -> web.StreamResponse:
        if not _DIGEST.match(digest):
            raise RegistryError(
                400, "DIGEST_INVALID", f"{digest!r}: expected sha256:<64 hex>", head=head
            )
        if not await self.catalog.has_blob(name, digest):
            raise RegistryError(
                404, "BLOB_UNKNOWN", f"blob {digest} is not committed for {name}", head=head
            )
        if self.follow is not None and not head and "Range" not in request.headers:
            feed = await self._follow(name, digest)
            if feed is not None:
                return await self._stream(request, digest, feed)
        else:
            await self._make_present(name, digest, "BLOB_UNKNOWN", head)
        if not self.store.has(digest):
            raise RegistryError(
                404,
                "BLOB_UNKNOWN",
                f"blob {digest} of {name} is committed but not on this node yet; retry shortly",
                head=head,
            )
        # FileResponse answers Range (206/416), HEAD and conditional requests and streams
        # with sendfile, so serving a blob costs no memory proportional to its size.
        return web.FileResponse(
            self.store.path(digest),
            chunk_size=1 << 20,
            headers={
                **_API_VERSION,
                "Docker-Content-Digest": digest,
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            },
        )

    async def _follow(self, name: RepositoryName, digest: str) -> BlobFeed | None:
        """A feed of ``digest`` while it downloads, or None once it is in the store."""
        assert self.follow is not None
        if self.store.has(digest):
            self.metrics.cache_hits.inc()
            return None
        self.metrics.cache_misses.inc()
        try:
            return await self.follow(digest)
        except ContentUnavailable as exc:
            raise RegistryError(
                404,
                "BLOB_UNKNOWN",
                f"{name}@{digest} is committed but could not be fetched from the network: "
                f"{exc}; retry shortly",
                head=False,
            ) from exc

    async def _stream(
        self, request: web.Request, digest: str, feed: BlobFeed
    ) -> web.StreamResponse:
        """Send the blob as it downloads; the last chunk waits for the digest check."""
        size = feed.size.result()
        response = web.StreamResponse(
            headers={
                **_API_VERSION,
                "Docker-Content-Digest": digest,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            }
        )
        await response.prepare(request)
        sent = 0
        held: bytes | memoryview = b""
        try:
            try:
                async for chunk in feed.chunks():
                    if held:
                        await response.write(held)
                        sent += len(held)
                    held = chunk
            except FeedDetached:
                pass  # this client is slower than the download: the rest comes from the store
            await feed.verified()
            if held:
                await response.write(held)
                sent += len(held)
            if sent < size:
                async for chunk in read_from(self.store.path(digest), sent):
                    await response.write(chunk)
            await response.write_eof()
        except Exception as exc:
            # The body is incomplete: drop the connection so the client sees a failed
            # download, never a short or unverified blob.
            log.warning("streaming %s stopped after %d bytes: %r", digest[:19], sent, exc)
            if request.transport is not None:
                request.transport.abort()
        return response

    async def tag_list(self, request: web.Request, path_name: str) -> web.StreamResponse:
        name = self._name(request, path_name, head=False)
        tags = await self.catalog.tags(name)
        if tags is None:
            raise RegistryError(404, "NAME_UNKNOWN", f"{name} has no committed tags", head=False)
        last = request.query.get("last")
        selected = [t for t in sorted(tags) if last is None or t > last]
        headers = dict(_API_VERSION)
        if "n" in request.query:
            try:
                n = int(request.query["n"])
                if n < 0:
                    raise ValueError(n)
            except ValueError:
                raise RegistryError(
                    400,
                    "PAGINATION_NUMBER_INVALID",
                    f"n={request.query['n']!r}: expected a non-negative integer",
                    head=False,
                ) from None
            if len(selected) > n > 0:
                headers["Link"] = (
                    f'</v2/{path_name}/tags/list?n={n}&last={selected[n - 1]}>; rel="next"'
                )
            selected = selected[:n]
        return web.json_response({"name": path_name, "tags": selected}, headers=headers)


def routes(
    catalog: Catalog,
    store: BlobStore,
    *,
    mode: Mode = "strict",
    request_build: RequestBuild | None = None,
    build_timeout: float = 60.0,
    default_registry: str = "docker.io",
    fetch: Fetch | None = None,
    follow: Follow | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> list[web.RouteDef]:
    """Route definitions for the pull API; add them to the node's HTTP application."""
    metrics = RegistryMetrics(metrics_registry)
    mirror = _Mirror(
        catalog,
        store,
        mode,
        request_build,
        build_timeout,
        default_registry,
        fetch,
        follow,
        metrics,
    )

    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            response = await mirror.dispatch(request)
        except web.HTTPException as exc:
            metrics.requests.labels(str(exc.status)).inc()
            raise
        except Exception:
            metrics.requests.labels("500").inc()
            raise
        metrics.requests.labels(str(response.status)).inc()
        return response

    return [web.get("/v2/{path:.*}", counted, allow_head=True)]


class RegistryMetrics:
    """Pull API counters; labels carry only the HTTP status code, never names or digests."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "pyrsia_registry_requests",
            "OCI pull API requests by HTTP status code",
            ["code"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "pyrsia_registry_cache_hits",
            "Committed manifests and blobs served from this node's store as they were",
            registry=registry,
        )
        self.cache_misses = Counter(
            "pyrsia_registry_cache_misses",
            "Committed manifests and blobs this node had to fetch from the network first",
            registry=registry,
        )
