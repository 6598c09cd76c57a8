"""Acquisition: an authority fetches an image from its upstream, verifies it, attests it.

Public names:
  UpstreamClient, FetchPolicy   pull API client for one upstream (auth, retries, limits)
  acquire_image, Acquisition    fetch a tag into the blob store and sign the attestation
  AcquireError and subclasses   why an acquisition failed
  parse_manifest and media type constants (from ``manifest``)

Everything else is internal. This package never decides whether an image is committed:
that is ``pyrsia_node.attestation.decide`` fed by consensus.
"""

from pyrsia_node.acquire.client import FetchedManifest, FetchPolicy, UpstreamClient
from pyrsia_node.acquire.errors import (
    AcquireError,
    ImageNotFound,
    SizeLimitExceeded,
    UnsupportedManifest,
    UpstreamAuthError,
    UpstreamDigestMismatch,
    UpstreamRejected,
    UpstreamUnavailable,
)
from pyrsia_node.acquire.image import Acquisition, acquire_image

__all__ = [
    "AcquireError",
    "Acquisition",
    "FetchPolicy",
    "FetchedManifest",
    "ImageNotFound",
    "SizeLimitExceeded",
    "UnsupportedManifest",
    "UpstreamAuthError",
    "UpstreamClient",
    "UpstreamDigestMismatch",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "acquire_image",
]
