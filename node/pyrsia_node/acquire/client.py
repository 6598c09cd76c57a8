"""Async client for one upstream OCI registry: ping, manifests, blob streams.

It speaks the pull half of the OCI Distribution API over an aiohttp session the caller
owns, answers ``WWW-Authenticate: Bearer`` challenges the way Docker Hub issues them (an
anonymous token from the realm for ``repository:<name>:pull``), and retries network
errors, 429 and 5xx with exponential backoff and full jitter. Sleep and randomness are
injected so tests and simulations control time.

It never trusts what it downloads: verification is the caller's job (``image``), this
module only moves bytes and reports what went wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp

from pyrsia_node.acquire.errors import (
    ImageNotFound,
    SizeLimitExceeded,
    UpstreamAuthError,
    UpstreamDigestMismatch,
    UpstreamRejected,
    UpstreamUnavailable,
)
from pyrsia_node.acquire.manifest import ACCEPT
from pyrsia_node.genesis import Upstream

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Retry, timeout and size rules for talking to an upstream."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_manifest_bytes: int = 4 << 20
    max_blob_bytes: int = 16 << 30
    max_image_bytes: int = 32 << 30

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff: uniform in [0, min(max, base * 2^attempt)]."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (2**attempt)))


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    digest: str
    media_type: str | None
    data: bytes
    url: str


class UpstreamClient:
    """Pulls from one upstream registry; one instance may serve many concurrent fetches."""

    def __init__(
        self,
        upstream: Upstream,
        session: aiohttp.ClientSession,
        *,
        policy: FetchPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.upstream = upstream
        # Told the size of every body chunk read from the upstream (egress accounting).
        self._on_bytes = on_bytes
        self.policy = policy or FetchPolicy()
        self._session = session
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._base = upstream.url.rstrip("/")
        self._tokens: dict[str, str] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.policy.connect_timeout,
            sock_read=self.policy.read_timeout,
        )

    def manifest_url(self, repository: str, reference: str) -> str:
        return f"{self._base}/v2/{repository}/manifests/{reference}"

    def blob_url(self, repository: str, digest: str) -> str:
        return f"{self._base}/v2/{repository}/blobs/{digest}"

    async def backoff(self, attempt: int) -> None:
        """Wait before retry number ``attempt`` (0-based) using the injected sleep and RNG."""
        await self._sleep(self.policy.backoff(attempt, self._rng))

    async def ping(self) -> None:
        """Check that the upstream speaks the v2 API (401 counts: auth is per repository)."""
        async with self._request("GET", f"{self._base}/v2/", None, {}) as response:
            if response.status not in (200, 401):
                raise UpstreamRejected(response.url.human_repr(), response.status, "")

    async def manifest(self, repository: str, reference: str) -> FetchedManifest:
        """The manifest bytes for a tag or digest, with their sha256 digest.

        For a digest reference the bytes must hash to it; for a tag the upstream's
        ``Docker-Content-Digest``, when present, must match the bytes.
        """
        url = self.manifest_url(repository, reference)
        limit = self.policy.max_manifest_bytes
        async with self._request("GET", url, repository, {"Accept": ACCEPT}) as response:
            if response.status == 404:
                raise ImageNotFound(
                    f"{self.upstream.name}/{repository}:{reference} does not exist upstream "
                    f"({url}); check the name and tag"
                )
            _expect_ok(response, url, await _snippet(response))
            if response.content_length is not None and response.content_length > limit:
                raise SizeLimitExceeded(
                    f"manifest {url} declares {response.content_length} bytes, the limit is "
                    f"{limit}; raise max_manifest_bytes if this image is legitimate"
                )
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 << 10):
                self._count(chunk)
                data += chunk
                if len(data) > limit:
                    raise SizeLimitExceeded(
                        f"manifest {url} exceeds {limit} bytes; raise max_manifest_bytes if "
                        "this image is legitimate"
                    )
            media_type = response.headers.get("Content-Type")
            header_digest = response.headers.get("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        expected = reference if reference.startswith("sha256:") else header_digest
        if expected is not None and expected != digest:
            raise UpstreamDigestMismatch(url, expected, digest)
        return FetchedManifest(digest, media_type, bytes(data), url)

    @asynccontextmanager
    async def blob(self, repository: str, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """An open stream of a blob's bytes (redirects to a CDN are followed)."""
        url = self.blob_url(repository, digest)
        async with self._request("GET", url, repository, {}) as response:
            if response.status == 404:
                raise ImageNotFound(
                    f"blob {digest} of {self.upstream.name}/{repository} is missing upstream "
                    f"({url}); the upstream image is incomplete"
                )
            _expect_ok(response, url, await _snippet(response))
            yield self._counted(_pieces(response.content))

    def _count(self, chunk: bytes) -> None:
        if self._on_bytes is not None:
            self._on_bytes(len(chunk))

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self._count(chunk)
            yield chunk

    @asynccontextmanager
    async def _request(
        self, method: str, url: str, repository: str | None, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request with auth and retries; yields the final (non-retryable) response."""
        refreshed_token = False
        attempt = 0
        while True:
            request_headers = dict(headers)
            token = self._tokens.get(repository or "")
            if token is not None:
                request_headers["Authorization"] = f"Bearer {token}"
            failure: str
            try:
                response = await self._session.request(
                    method, url, headers=request_headers, timeout=self._timeout
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
                retry_after = None
            else:
                if response.status == 401 and not refreshed_token:
                    challenge = response.headers.get("WWW-Authenticate", "")
                    response.release()
                    await self._authenticate(challenge, repository, url)
                    refreshed_token = True
                    continue
                if response.status not in _RETRY_STATUS:
                    try:
                        yield response
                    finally:
                        response.release()
                    return
                failure = f"status {response.status}"
                retry_after = _retry_after(response.headers.get("Retry-After"))
                response.release()
            attempt += 1
            if attempt >= self.policy.attempts:
                raise UpstreamUnavailable(
                    f"{method} {url} failed {attempt} times, last with {failure}; the upstream "
                    f"{self.upstream.name} is unreachable or overloaded, try again later"
                )
            delay = self.policy.backoff(attempt - 1, self._rng)
            if retry_after is not None:
                delay = min(self.policy.max_delay, max(delay, retry_after))
            await self._sleep(delay)

    async def _authenticate(self, challenge: str, repository: str | None, url: str) -> None:
        """Fetch an anonymous bearer token as Docker Hub's token service hands them out."""
        scheme, _, params_text = challenge.partition(" ")
        if scheme.lower() != "bearer":
            raise UpstreamAuthError(
                f"{url} requires {scheme or 'unspecified'} authentication; only anonymous "
                "bearer tokens are supported, use an upstream that allows anonymous pulls"
            )
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        realm = params.get("realm")
        if not realm:
            raise UpstreamAuthError(f"{url}: bearer challenge without realm: {challenge!r}")
        query = {}
        if "service" in params:
            query["service"] = params["service"]
        scope = params.get("scope") or (f"repository:{repository}:pull" if repository else None)
        if scope:
            query["scope"] = scope
        token_url = f"{realm}?{urlencode(query)}" if query else realm
        async with self._session.get(token_url, timeout=self._timeout) as response:
            if response.status != 200:
                raise UpstreamAuthError(
                    f"token service {realm} answered {response.status} for scope {scope!r}; "
                    "the repository may be private or the name wrong"
                )
            try:
                body = await response.json(content_type=None)
            except ValueError as exc:
                raise UpstreamAuthError(f"token service {realm} sent no JSON: {exc}") from exc
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamAuthError(f"token service {realm} sent no token for scope {scope!r}")
        self._tokens[repository or ""] = token


async def _pieces(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body as the connection delivered it, without joining reads into larger chunks
    (a join copies every byte once more; the store batches small pieces itself)."""
    while True:
        piece, end_of_http_chunk = await content.readchunk()
        if piece:
            yield piece
        elif not end_of_http_chunk:
            return  # an empty piece ends the body, except at a chunked encoding's boundary


def _expect_ok(response: aiohttp.ClientResponse, url: str, body: str) -> None:
    if response.status == 401:
        raise UpstreamAuthError(
            f"{url} still refuses access with a fresh token; the repository may be private"
        )
    if response.status != 200:
        raise UpstreamRejected(url, response.status, body)


async def _snippet(response: aiohttp.ClientResponse) -> str:
    if response.status == 200:
        return ""
    return (await response.content.read(1024)).decode(errors="replace")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
