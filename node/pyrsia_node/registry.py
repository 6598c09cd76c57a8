"""OCI Distribution pull API: what containerd, skopeo, docker and oras talk to.

``routes(catalog, store, ...)`` returns aiohttp route definitions for ``/v2/``:
manifests (GET/HEAD by tag or digest), blobs (GET/HEAD with ``Range``: 206/416, streamed
with sendfile) and ``tags/list`` (paginated with ``n``/``last``). Errors are the spec's
JSON bodies and codes, and every answer carries ``Docker-Distribution-API-Version``.

Behaviour real clients depend on, matched to CNCF distribution (``registry:2``) unless
noted:

- The mirror is read-only: any method but GET and HEAD is 405 ``UNSUPPORTED`` with
  ``Allow: GET, HEAD``. Paths that are no endpoint here (``/v2/_catalog``, the referrers
  API, upload sessions) are 404 ``UNSUPPORTED``; a 404 on the referrers API is how the
  spec says "not supported", so clients fall back to the referrers tag schema.
- ``Accept`` on manifests: an OCI manifest or index is served only to a client whose
  ``Accept`` allows it, else 404 ``MANIFEST_UNKNOWN`` (as distribution). By tag, a Docker
  manifest list a client does not accept is answered with its linux/amd64 image when the
  client accepts that (as distribution). Docker schema 2 manifests are served whatever the
  ``Accept`` (as distribution 3; nothing is converted to schema 1). Unlike distribution,
  ``Accept`` follows RFC 9110: ``*/*`` and ``type/*`` match, ``q=0`` refuses, and a
  request without ``Accept`` accepts anything.
- References: an invalid tag names no manifest (404 ``MANIFEST_UNKNOWN``, as the OCI
  conformance suite expects); a malformed digest or one of an algorithm other than
  sha256/sha512 is 400 ``DIGEST_INVALID``; a well-formed sha512 digest is simply unknown
  (content here is addressed by sha256). ``If-None-Match`` with the digest is 304.
- ``Range`` on blobs: one byte range is 206, an unsatisfiable one 416 with
  ``Content-Range: bytes */SIZE``; several ranges, or a unit other than ``bytes``, are
  ignored and the whole blob is served with 200 (RFC 9110 14.2 allows ignoring a Range;
  distribution answers several ranges with multipart/byteranges, which no puller sends).
- ``tags/list`` is in the spec's lexical order (case-insensitive, ties by code point);
  ``n=0`` is an empty list; the ``Link`` of the next page keeps ``?ns=``.
- A tag this node must ask the authorities to build while ``max_builds`` other builds are
  in flight is 429 ``TOOMANYREQUESTS`` (containerd then pulls from its next host).

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
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import CollectorRegistry, Counter

from pyrsia_node.acquire.manifest import DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from pyrsia_node.follow import BlobFeed, FeedDetached, Follow, read_from
from pyrsia_node.store import BlobNotFound, BlobStore

log = logging.getLogger(__name__)

Mode = Literal["strict", "fallback"]

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The digests the OCI image spec registers; content on this network is addressed by sha256.
_REGISTERED_DIGEST = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_REGISTRY_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$")
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_PATH = re.compile(r"^(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_TAGS = re.compile(r"^(?P<name>.+)/tags/list$")
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_MAX_NAME = 255
_METHODS = ("GET", "HEAD")
# Served only to clients whose Accept allows them (a Docker list by tag falls back to its
# linux/amd64 image); any other manifest type is served whatever the Accept says.
_NEGOTIATED = {OCI_MANIFEST: "an OCI image manifest", OCI_INDEX: "an OCI image index"}
# A blob at a digest never changes and committed records are never withdrawn.
_IMMUTABLE = "max-age=31536000"


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


class RegistryError(web.HTTPException):
    """An OCI Distribution error response: status plus
    ``{"errors": [{code, message, detail}]}`` (``detail`` only when given)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        head: bool,
        detail: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = status
        error: dict[str, object] = {"code": code, "message": message}
        if detail is not None:
            error["detail"] = detail
        super().__init__(
            headers={**_API_VERSION, **(headers or {})},
            text=None if head else json.dumps({"errors": [error]}),
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
        max_builds: int,
    ) -> None:
        self.max_builds = max_builds
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
        if request.method not in _METHODS:
            raise RegistryError(
                405,
                "UNSUPPORTED",
                f"{request.method} is not supported: this node is a read-only mirror of "
                "attested content; push to the upstream registry instead",
                head=False,
                detail={"method": request.method},
                headers={"Allow": ", ".join(_METHODS)},
            )
        path = request.match_info.get("path", "")
        if path == "":
            return web.json_response({}, headers=_API_VERSION)
        if match := _PATH.match(path):
            name = self._name(request, match["name"], head)
            if match["kind"] == "manifests":
                return await self.manifest(request, name, match["reference"], head)
            return await self.blob(request, name, match["reference"], head)
        if match := _TAGS.match(path):
            return await self.tag_list(request, match["name"], head)
        if path == "_catalog":
            raise RegistryError(
                404,
                "UNSUPPORTED",
                "this mirror does not list its repositories; list a repository's tags with "
                "/v2/<name>/tags/list",
                head=head,
            )
        raise RegistryError(404, "UNSUPPORTED", f"no such endpoint: /v2/{path}", head=head)

    def _name(self, request: web.Request, path_name: str, head: bool) -> RepositoryName:
        try:
            return parse_name(path_name, request.query.get("ns"), self.default_registry)
        except ValueError as exc:
            raise RegistryError(
                400, "NAME_INVALID", str(exc), head=head, detail={"name": path_name}
            ) from exc

    async def manifest(
        self, request: web.Request, name: RepositoryName, reference: str, head: bool
    ) -> web.StreamResponse:
        by_digest = ":" in reference  # a tag never contains ':'
        if by_digest:
            _check_digest(reference, head)
        elif not _TAG.match(reference):
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{reference!r} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}), so "
                f"no manifest of {name} has it",
                head=head,
            )
        ref = await self.catalog.resolve(name, reference)
        if ref is None and by_digest and not _DIGEST.match(reference):
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{name}@{reference} is not committed: content on this network is addressed "
                "by sha256",
                head=head,
            )
        if ref is None:
            ref = await self._build(name, reference, head)
        accept = request.headers.getall("Accept", [])
        if not accepts(accept, ref.media_type):
            if ref.media_type == DOCKER_MANIFEST_LIST and not by_digest:
                ref = await self._default_platform(name, reference, ref, accept, head)
            elif ref.media_type in _NEGOTIATED:
                raise RegistryError(
                    404,
                    "MANIFEST_UNKNOWN",
                    f"{name}:{reference} is {_NEGOTIATED[ref.media_type]} and the request's "
                    f"Accept header does not allow {ref.media_type}",
                    head=head,
                )
        headers = {
            **_API_VERSION,
            "Docker-Content-Digest": ref.digest,
            "ETag": f'"{ref.digest}"',
        }
        if _none_match(request, ref.digest):
            return web.Response(status=304, headers=headers)
        data = await self._manifest_bytes(name, ref, head)
        headers["Content-Type"] = ref.media_type
        headers["Content-Length"] = str(len(data))
        if head:
            return web.Response(headers=headers)
        return web.Response(body=data, headers=headers)

    async def _manifest_bytes(self, name: RepositoryName, ref: ManifestRef, head: bool) -> bytes:
        await self._make_present(name, ref.digest, "MANIFEST_UNKNOWN", head)
        try:
            return await self.store.read(ref.digest)
        except BlobNotFound as exc:
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{name}@{ref.digest} is committed but not on this node yet; retry shortly",
                head=head,
            ) from exc

    async def _default_platform(
        self,
        name: RepositoryName,
        reference: str,
        listing: ManifestRef,
        accept: Sequence[str],
        head: bool,
    ) -> ManifestRef:
        """The linux/amd64 image of a Docker manifest list, for a client that does not
        accept manifest lists (what distribution answers such clients by tag)."""
        digest = _linux_amd64(await self._manifest_bytes(name, listing, head))
        image = None if digest is None else await self.catalog.resolve(name, digest)
        if image is None or not accepts(accept, image.media_type):
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{name}:{reference} is a Docker manifest list, the request's Accept header "
                f"does not allow {DOCKER_MANIFEST_LIST}, and the list has no linux/amd64 "
                "image of a type the request allows",
                head=head,
            )
        return image

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
        if task is None and len(self.builds) >= self.max_builds:
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"{unknown}, and this node already waits for {len(self.builds)} builds; "
                "retry later",
                head=head,
            )
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
        _check_digest(digest, head)
        if not await self.catalog.has_blob(name, digest):
            raise RegistryError(
                404, "BLOB_UNKNOWN", f"blob {digest} is not committed for {name}", head=head
            )
        ranges = _range_request(request.headers.get("Range"))
        if self.follow is not None and not head and ranges in ("none", "ignored"):
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
        headers = {
            **_API_VERSION,
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Cache-Control": _IMMUTABLE,
        }
        if ranges == "unsatisfiable":
            size = self.store.size(digest)
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        # FileResponse answers Range (206/416), HEAD and conditional requests and streams
        # with sendfile, so serving a blob costs no memory proportional to its size.
        serve = _WholeFile if ranges == "ignored" else web.FileResponse
        return serve(self.store.path(digest), chunk_size=1 << 20, headers=headers)

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
                "Cache-Control": _IMMUTABLE,
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

    async def tag_list(
        self, request: web.Request, path_name: str, head: bool
    ) -> web.StreamResponse:
        name = self._name(request, path_name, head)
        tags = await self.catalog.tags(name)
        if tags is None:
            raise RegistryError(
                404,
                "NAME_UNKNOWN",
                f"{name} has no committed tags",
                head=head,
                detail={"name": path_name},
            )
        last = request.query.get("last")
        selected = sorted(tags, key=_lexical)
        if last is not None:
            selected = [t for t in selected if _lexical(t) > _lexical(last)]
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
                    head=head,
                ) from None
            if len(selected) > n > 0:
                query = {"n": str(n), "last": selected[n - 1]}
                if "ns" in request.query:
                    query["ns"] = request.query["ns"]
                headers["Link"] = f'</v2/{path_name}/tags/list?{urlencode(query)}>; rel="next"'
            selected = selected[:n]
        return web.json_response({"name": path_name, "tags": selected}, headers=headers)


def accepts(accept: Sequence[str], media_type: str) -> bool:
    """Whether ``Accept`` header values allow ``media_type`` (RFC 9110 12.5.1).

    The most specific matching range decides (the type itself, then ``type/*``, then
    ``*/*``), and ``q=0`` means "not acceptable"; without any Accept header anything is."""
    if not accept:
        return True
    wanted = media_type.lower()
    wildcard = wanted.split("/", 1)[0] + "/*"
    best: tuple[int, float] | None = None  # (specificity, q) of the best matching range
    for value in accept:
        for item in value.split(","):
            media_range, *params = (part.strip() for part in item.split(";"))
            specificity = {wanted: 2, wildcard: 1, "*/*": 0}.get(media_range.lower())
            quality = _quality(params)
            if specificity is None or quality is None:
                continue
            if best is None or (specificity, quality) > best:
                best = (specificity, quality)
    return best is not None and best[1] > 0


def _quality(params: list[str]) -> float | None:
    """The ``q`` of a media range's parameters (1 when absent); None when malformed."""
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return None
            return q if 0 <= q <= 1 else None
    return 1.0


def _check_digest(reference: str, head: bool) -> None:
    if not _REGISTERED_DIGEST.match(reference):
        raise RegistryError(
            400,
            "DIGEST_INVALID",
            f"{reference!r} is not a digest this registry supports: expected sha256:<64 hex> "
            "or sha512:<128 hex> (lowercase)",
            head=head,
            detail={"digest": reference},
        )


def _none_match(request: web.Request, digest: str) -> bool:
    """Whether ``If-None-Match`` names the manifest's ETag (quoted or not, weak or not)."""
    for value in request.headers.getall("If-None-Match", []):
        for tag in value.split(","):
            if tag.strip().removeprefix("W/").strip('"') in ("*", digest):
                return True
    return False


def _linux_amd64(listing: bytes) -> str | None:
    """The digest of a manifest list's linux/amd64 entry, if it has one."""
    try:
        entries = json.loads(listing).get("manifests", [])
    except (ValueError, AttributeError):
        return None
    for entry in entries if isinstance(entries, list) else []:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(platform, dict) and (
            platform.get("os"),
            platform.get("architecture"),
        ) == ("linux", "amd64"):
            digest = entry.get("digest")
            return digest if isinstance(digest, str) and _DIGEST.match(digest) else None
    return None


def _lexical(tag: str) -> tuple[str, str]:
    """The spec's lexical order of tags: case-insensitive, ties broken by code point."""
    return tag.lower(), tag


RangeRequest = Literal["none", "single", "ignored", "unsatisfiable"]


def _range_request(value: str | None) -> RangeRequest:
    """How to answer a blob request's ``Range``: ``single`` goes to FileResponse (206, or
    416 when it is out of bounds or malformed, as distribution); a unit other than bytes
    (which RFC 9110 says MUST be ignored) and several ranges are ``ignored`` (200, whole
    blob); ``bytes=-0`` asks for no byte at all."""
    if value is None:
        return "none"
    unit, _, ranges = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return "ignored"
    if re.fullmatch(r"\s*-0+\s*", ranges):
        return "unsatisfiable"
    return "single"


class _WholeFile(web.FileResponse):
    """A FileResponse that serves the whole file whatever ``Range`` the request carries."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = request.headers.copy()
        headers.popall("Range", None)
        return await super().prepare(request.clone(headers=headers))


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
    max_builds: int = 64,
) -> list[web.RouteDef]:
    """Route definitions for the pull API; add them to the node's HTTP application.

    ``max_builds`` bounds the builds this node waits for at once (each distinct unknown
    tag a client asks for starts one)."""
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
        max_builds,
    )

    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            response = await mirror.dispatch(request)
        except web.HTTPException as exc:
            metrics.requests.labels(str(exc.status)).inc()
            raise
        except Exception as exc:
            # No response has started yet (streams handle their own failures), so the
            # client still gets the spec's error body and API version header.
            log.exception("pull API request %s %s failed", request.method, request.path)
            metrics.requests.labels("500").inc()
            raise RegistryError(
                500,
                "UNKNOWN",
                f"internal error ({type(exc).__name__}); the node's log has the cause",
                head=request.method == "HEAD",
            ) from exc
        metrics.requests.labels(str(response.status)).inc()
        return response

    # Every method reaches `counted`, so push methods get the spec's 405 body too.
    return [web.route("*", "/v2", counted), web.route("*", "/v2/{path:.*}", counted)]


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
