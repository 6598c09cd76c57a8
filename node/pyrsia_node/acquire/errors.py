"""Why an acquisition failed: one exception type per cause, each saying what to do."""

from __future__ import annotations


class AcquireError(Exception):
    """Base class: an image could not be fetched from its upstream and attested."""


class UpstreamUnavailable(AcquireError):
    """The upstream did not answer usefully (network error, 429 or 5xx) after every retry."""


class UpstreamAuthError(AcquireError):
    """The upstream asked for authentication this node cannot provide."""


class ImageNotFound(AcquireError):
    """The upstream does not have the repository, tag or a blob the manifest refers to."""


class UpstreamRejected(AcquireError):
    """The upstream answered a request with an unexpected status."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(
            f"upstream answered {status} for {url}: {body[:300]!r}; check the upstream "
            "configuration and the image name"
        )
        self.url = url
        self.status = status


class UpstreamDigestMismatch(AcquireError):
    """The upstream served bytes whose digest differs from the one the manifest names."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"upstream served {url} with digest {actual}, expected {expected}: the upstream "
            "content is corrupt or tampered with; nothing was stored or attested"
        )
        self.url = url
        self.expected = expected
        self.actual = actual


class SizeLimitExceeded(AcquireError):
    """A manifest, blob or the whole image is larger than the configured limit."""


class UnsupportedManifest(AcquireError):
    """The manifest is malformed or of a kind the mirror does not serve (e.g. schema 1)."""
