"""Authority attestations: DSSE envelopes around in-toto statements, and the threshold rule.

An authority that fetched an image from its upstream says so in an in-toto Statement v1
whose subjects are every digest it verified (the manifest or index, each platform manifest,
each config and layer blob) and whose predicate (``PREDICATE_TYPE``) names the source URL,
the time and the authority. The statement is wrapped in a DSSE envelope signed with the
authority's Ed25519 key; the signature's ``keyid`` is the authority's node id.

``decide`` is the pure rule that turns the envelopes of several authorities into a
committed image description, or a report of who saw what when they disagree. It never
drops a dissenting attestation: every mismatch is part of the result.

This module does no I/O and reads no clock; callers pass the time in. Parsed statements
are memoised (``parse_statement``, a bounded cache keyed by the payload bytes): parsing is
pure and its results are immutable, and every committed record's statement is parsed twice
on each node, when consensus checks the record and when the catalog indexes it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from pyrsia_node.identity import Identity, verify_signature

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://pyrsia.io/attestation/acquire/v1"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NODE_ID = re.compile(r"^[0-9a-f]{64}$")
# Statements parsed recently: enough for the records between their check at admission and
# their commit (seconds at thousands of records per second), ~1.5 KiB each.
STATEMENT_CACHE_SIZE = 8192


class AttestationError(Exception):
    """Base class: an attestation could not be built, parsed or verified."""


class MalformedEnvelope(AttestationError):
    """The bytes are not a DSSE envelope with exactly one signature."""


class UnsupportedPayloadType(AttestationError):
    """The envelope carries something other than an in-toto statement."""


class MalformedStatement(AttestationError):
    """The payload is not an in-toto Statement v1 with a Pyrsia acquire predicate."""


class UnknownAuthority(AttestationError):
    """The envelope is signed by a key id that is not in the validator set."""


class InvalidSignature(AttestationError):
    """The signature does not verify against the authority's public key."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: what the signature actually covers.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, lengths as ASCII decimal byte
    counts, exactly as in the DSSE protocol specification.
    """
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def canonical_json(value: object) -> bytes:
    """Sorted keys, no insignificant whitespace, ASCII only: identical bytes on every node."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_digest(where: str, digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise MalformedStatement(f"{where}: expected 'sha256:<64 lowercase hex>', got {digest!r}")
    return digest


@dataclass(frozen=True, slots=True)
class Artifact:
    """One piece of content an image consists of, as an OCI descriptor names it."""

    digest: str
    size: int
    media_type: str

    def __post_init__(self) -> None:
        _check_digest("artifact digest", self.digest)
        if self.size < 0:
            raise MalformedStatement(f"artifact {self.digest}: negative size {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "mediaType": self.media_type, "size": self.size}

    @classmethod
    def from_dict(cls, where: str, data: object) -> Artifact:
        return _artifact_from(data, where)


def _artifact_from(data: object, where: str, index: int | None = None) -> Artifact:
    """``Artifact.from_dict`` at ``where`` (``where[index]`` in a list). The success path,
    every statement's, formats no location text."""
    if type(data) is dict:
        digest, size, media_type = data.get("digest"), data.get("size"), data.get("mediaType")
        if (
            type(digest) is str
            and _DIGEST.match(digest)
            and type(size) is int
            and type(media_type) is str
        ):
            return Artifact(digest, size, media_type)  # raises for a negative size
    if index is not None:
        where = f"{where}[{index}]"
    if not isinstance(data, dict):
        raise MalformedStatement(f"{where}: expected an object, got {data!r}")
    size, media_type = data.get("size"), data.get("mediaType")
    if not isinstance(size, int) or isinstance(size, bool):
        raise MalformedStatement(f"{where}.size: expected an integer, got {size!r}")
    if not isinstance(media_type, str):
        raise MalformedStatement(f"{where}.mediaType: expected text, got {media_type!r}")
    return Artifact(_check_digest(f"{where}.digest", data.get("digest")), size, media_type)


_SixTexts = tuple[str, str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class AcquiredImage:
    """What an authority found at its upstream for ``registry/repository:tag``.

    ``root`` is the manifest or index the tag points to; ``manifests`` are the platform
    manifests an index refers to (empty for a single manifest); ``blobs`` are every config
    and layer blob, each once, sorted by digest. Two authorities agree on an image exactly
    when their ``AcquiredImage`` values are equal.
    """

    registry: str
    repository: str
    tag: str
    root: Artifact
    manifests: tuple[Artifact, ...]
    blobs: tuple[Artifact, ...]

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return (self.root, *self.manifests, *self.blobs)

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(a.digest for a in self.artifacts)

    @property
    def size(self) -> int:
        """Bytes of every distinct artifact together: what a full pull transfers."""
        return sum(a.size for a in {a.digest: a for a in self.artifacts}.values())


@dataclass(frozen=True, slots=True)
class Attestation:
    """An authority's signed statement that it fetched ``image`` from ``source`` at ``time``."""

    image: AcquiredImage
    source: str
    time: str
    authority: str

    def statement(self) -> dict[str, Any]:
        image = self.image
        return {
            "_type": STATEMENT_TYPE,
            "subject": [
                {"name": f"{image.name}@{digest}", "digest": {"sha256": digest[len("sha256:") :]}}
                for digest in sorted(image.digests)
            ],
            "predicateType": PREDICATE_TYPE,
            "predicate": {
                "source": self.source,
                "time": self.time,
                "authority": self.authority,
                "registry": image.registry,
                "repository": image.repository,
                "tag": image.tag,
                "root": image.root.to_dict(),
                "manifests": [m.to_dict() for m in image.manifests],
                "blobs": [b.to_dict() for b in image.blobs],
            },
        }

    def payload(self) -> bytes:
        return canonical_json(self.statement())


def rfc3339(moment: dt.datetime) -> str:
    """UTC time with second precision and a ``Z`` suffix, as the statement records it."""
    if moment.tzinfo is None:
        raise ValueError("attestation time must be timezone-aware; pass datetime.now(UTC)")
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A DSSE envelope with one signature, as serialized on the wire and in the ledger."""

    payload_type: str
    payload: bytes
    keyid: str
    signature: bytes

    def to_json(self) -> bytes:
        return canonical_json(
            {
                "payload": base64.b64encode(self.payload).decode(),
                "payloadType": self.payload_type,
                "signatures": [
                    {"keyid": self.keyid, "sig": base64.b64encode(self.signature).decode()}
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedEnvelope(f"envelope is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise MalformedEnvelope("envelope: expected a JSON object")
        payload_type, payload, signatures = (
            doc.get("payloadType"),
            doc.get("payload"),
            doc.get("signatures"),
        )
        if not isinstance(payload_type, str) or not isinstance(payload, str):
            raise MalformedEnvelope("envelope: 'payloadType' and 'payload' must be strings")
        if not isinstance(signatures, list) or len(signatures) != 1:
            raise MalformedEnvelope(
                "envelope: expected exactly one signature (one envelope per authority)"
            )
        sig = signatures[0]
        if not isinstance(sig, dict) or not isinstance(sig.get("keyid"), str):
            raise MalformedEnvelope("envelope: the signature needs a 'keyid' string")
        if not isinstance(sig.get("sig"), str):
            raise MalformedEnvelope("envelope: the signature needs a base64 'sig' string")
        try:
            raw_payload = base64.b64decode(payload, validate=True)
            raw_sig = base64.b64decode(sig["sig"], validate=True)
        except binascii.Error as exc:
            raise MalformedEnvelope(f"envelope: invalid base64: {exc}") from exc
        return cls(payload_type, raw_payload, sig["keyid"], raw_sig)


def sign(attestation: Attestation, identity: Identity) -> Envelope:
    """Wrap ``attestation`` in a DSSE envelope signed by ``identity`` (its node id is keyid)."""
    if attestation.authority != identity.node_id:
        raise AttestationError(
            f"attestation names authority {attestation.authority}, but the signing key is "
            f"{identity.node_id}; sign with the authority's own identity"
        )
    payload = attestation.payload()
    return Envelope(
        PAYLOAD_TYPE, payload, identity.node_id, identity.sign(pae(PAYLOAD_TYPE, payload))
    )


def attest(
    image: AcquiredImage, source: str, now: dt.datetime, identity: Identity
) -> tuple[Attestation, Envelope]:
    """The attestation of ``image`` by ``identity`` at ``now``, and its signed envelope."""
    attestation = Attestation(image, source, rfc3339(now), identity.node_id)
    return attestation, sign(attestation, identity)


def _field(where: str, data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedStatement(f"{where}.{key}: expected non-empty text, got {value!r}")
    return value


def parse_statement(payload: bytes) -> Attestation:
    """The attestation in a statement payload; checks that subjects and predicate agree.

    Raises ``MalformedStatement``. Memoised by the payload bytes (errors are not cached)."""
    return _parse_statement(bytes(payload))


@functools.lru_cache(maxsize=STATEMENT_CACHE_SIZE)
def _parse_statement(payload: bytes) -> Attestation:
    # Every record check on every authority parses one statement: the success path builds
    # no error text and no generator it can do without.
    try:
        if payload[:1] == b"{" and payload[1:2] != b"\0":
            # What json.loads does with bytes that start so (json.detect_encoding finds no
            # BOM and no NUL byte: UTF-8), without that Python-level detection per call.
            doc = json.loads(payload.decode("utf-8", "surrogatepass"))
        else:
            doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedStatement(f"statement is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedStatement("statement: expected a JSON object")
    if doc.get("_type") != STATEMENT_TYPE:
        raise MalformedStatement(f"_type: expected {STATEMENT_TYPE!r}, got {doc.get('_type')!r}")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise MalformedStatement(
            f"predicateType: expected {PREDICATE_TYPE!r}, got {doc.get('predicateType')!r}"
        )
    predicate = doc.get("predicate")
    if not isinstance(predicate, dict):
        raise MalformedStatement("predicate: expected an object")
    manifests, blobs = predicate.get("manifests"), predicate.get("blobs")
    if not isinstance(manifests, list) or not isinstance(blobs, list):
        raise MalformedStatement("predicate: 'manifests' and 'blobs' must be lists")
    get = predicate.get
    texts = (
        get("authority"),
        get("registry"),
        get("repository"),
        get("tag"),
        get("source"),
        get("time"),
    )
    if not all(type(text) is str and text for text in texts):
        for key in ("authority", "registry", "repository", "tag", "source", "time"):
            _field("predicate", predicate, key)  # raises for the first one missing
    authority, registry, repository, tag, source, moment = cast(_SixTexts, texts)
    if not _NODE_ID.match(authority):
        raise MalformedStatement(f"predicate.authority: expected a node id, got {authority!r}")
    image = AcquiredImage(
        registry,
        repository,
        tag,
        _artifact_from(get("root"), "predicate.root"),
        _artifacts("predicate.manifests", manifests),
        _artifacts("predicate.blobs", blobs),
    )
    subjects = doc.get("subject")
    if not isinstance(subjects, list):
        raise MalformedStatement("subject: expected a list")
    digests = image.digests
    try:
        subject_digests = {"sha256:" + subject["digest"]["sha256"] for subject in subjects}
    except (TypeError, KeyError):
        subject_digests = set()  # not this shape: the checks below say what is wrong
    if subject_digests != digests:
        # Equal sets need no more checks (the artifacts' digests are checked); else the
        # subjects are checked one by one, then compared, for the first error's message.
        subject_digests = set()
        for i, subject in enumerate(subjects):
            digest = subject.get("digest") if isinstance(subject, dict) else None
            sha256 = digest.get("sha256") if isinstance(digest, dict) else None
            if not isinstance(sha256, str):
                raise MalformedStatement(f"subject[{i}]: expected a sha256 digest")
            full = "sha256:" + sha256
            if not _DIGEST.match(full):
                _check_digest(f"subject[{i}]", full)  # raises, with the message
            subject_digests.add(full)
        if subject_digests != digests:
            raise MalformedStatement(
                "subject digests differ from the predicate's manifests and blobs: "
                f"only in subjects {sorted(subject_digests - digests)}, "
                f"only in predicate {sorted(digests - subject_digests)}"
            )
    return Attestation(image, source, moment, authority)


def _artifacts(where: str, items: list[Any]) -> tuple[Artifact, ...]:
    if not items:
        return ()
    return tuple(_artifact_from(item, where, i) for i, item in enumerate(items))


def verify(envelope: Envelope, validators: Mapping[str, bytes]) -> Attestation:
    """The attestation in ``envelope`` once its signature and contents check out.

    ``validators`` maps node id to raw Ed25519 public key (the authorities in force).
    """
    if envelope.payload_type != PAYLOAD_TYPE:
        raise UnsupportedPayloadType(
            f"payloadType {envelope.payload_type!r}: only {PAYLOAD_TYPE!r} is accepted"
        )
    public_key = validators.get(envelope.keyid)
    if public_key is None:
        raise UnknownAuthority(
            f"keyid {envelope.keyid!r} is not an authority of this network; "
            "only authorities in force may attest"
        )
    if not verify_signature(
        public_key, envelope.signature, pae(envelope.payload_type, envelope.payload)
    ):
        raise InvalidSignature(
            f"signature by {envelope.keyid} does not verify; the envelope was altered or "
            "signed with another key"
        )
    attestation = parse_statement(envelope.payload)
    if attestation.authority != envelope.keyid:
        raise MalformedStatement(
            f"predicate.authority {attestation.authority} differs from the signer "
            f"{envelope.keyid}; an authority can only attest for itself"
        )
    return attestation


@dataclass(frozen=True, slots=True)
class Mismatch:
    """An authority whose attested image differs from the one the majority saw."""

    authority: str
    saw: AcquiredImage
    expected: AcquiredImage

    def describe(self) -> str:
        if self.saw.root.digest != self.expected.root.digest:
            return (
                f"authority {self.authority} saw {self.saw.reference} as {self.saw.root.digest}, "
                f"the others {self.expected.root.digest}"
            )
        differing = sorted(self.saw.digests ^ self.expected.digests)
        return (
            f"authority {self.authority} saw {self.saw.reference} with the same root "
            f"{self.saw.root.digest} but different content: {differing or 'sizes/media types'}"
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of counting attestations for one image.

    ``committed`` is the image at least ``threshold`` authorities attested identically, or
    None. ``leading`` is the image with the most attestations (the committed one if any).
    ``mismatches`` lists every authority that attested something else than ``leading``;
    ``rejected`` maps a key id to why its envelope did not count; ``equivocations`` are
    authorities that attested two different images (none of their attestations count).
    """

    threshold: int
    committed: AcquiredImage | None
    leading: AcquiredImage | None
    supporters: tuple[str, ...]
    attestations: tuple[Attestation, ...]
    mismatches: tuple[Mismatch, ...]
    rejected: Mapping[str, str]
    equivocations: tuple[str, ...]

    def report(self) -> str:
        """One human-readable paragraph: what committed or why not, and every dissent."""
        if self.committed is not None:
            head = (
                f"{self.committed.reference} committed as {self.committed.root.digest} by "
                f"{len(self.supporters)} of {self.threshold} required authorities"
            )
        elif self.leading is not None:
            head = (
                f"{self.leading.reference} not committed: {len(self.supporters)} matching "
                f"attestation(s), {self.threshold} required"
            )
        else:
            head = f"nothing committed: no valid attestation, {self.threshold} required"
        lines = [head]
        lines += [m.describe() for m in self.mismatches]
        lines += [f"attestation by {k} rejected: {why}" for k, why in sorted(self.rejected.items())]
        lines += [f"authority {a} attested different images" for a in self.equivocations]
        return "; ".join(lines)


def unanimous(
    envelopes: Iterable[Envelope], validators: Mapping[str, bytes], threshold: int
) -> AcquiredImage | None:
    """The image when every envelope verifies, all attest that one image and at least
    ``threshold`` authorities signed them: exactly when ``decide`` commits an image with no
    mismatch, rejection or equivocation. None otherwise (``decide`` then says why).

    The record check's common case, without building a ``Decision`` and its report."""
    if threshold < 1:
        raise ValueError(f"threshold {threshold}: at least one attestation is required")
    image: AcquiredImage | None = None
    authorities: set[str] = set()
    for envelope in envelopes:
        try:
            attestation = verify(envelope, validators)
        except AttestationError:
            return None
        if image is None:
            image = attestation.image
        elif attestation.image != image:
            return None
        authorities.add(attestation.authority)
    return image if len(authorities) >= threshold else None


def decide(
    envelopes: Iterable[Envelope], validators: Mapping[str, bytes], threshold: int
) -> Decision:
    """Count the attestations for one image; commit what ``threshold`` authorities agree on.

    Each authority counts once. Envelopes that fail verification are listed in ``rejected``;
    an authority that signed two different images counts for neither. Ties between images
    with equal support are broken by root digest so every node decides the same.
    """
    if threshold < 1:
        raise ValueError(f"threshold {threshold}: at least one attestation is required")
    rejected: dict[str, str] = {}
    by_authority: dict[str, list[Attestation]] = {}
    for envelope in envelopes:
        try:
            attestation = verify(envelope, validators)
        except AttestationError as exc:
            rejected[envelope.keyid] = str(exc)
            continue
        by_authority.setdefault(attestation.authority, []).append(attestation)
    votes: dict[str, Attestation] = {}
    equivocations: list[str] = []
    for authority, seen in sorted(by_authority.items()):
        if len({a.image for a in seen}) > 1:
            equivocations.append(authority)
        else:
            votes[authority] = seen[0]
    support: dict[AcquiredImage, list[str]] = {}
    for authority, attestation in votes.items():
        support.setdefault(attestation.image, []).append(authority)
    leading: AcquiredImage | None = None
    supporters: tuple[str, ...] = ()
    if support:
        leading, backers = max(
            support.items(), key=lambda item: (len(item[1]), item[0].root.digest)
        )
        supporters = tuple(sorted(backers))
    mismatches = tuple(
        Mismatch(authority, attestation.image, leading)
        for authority, attestation in votes.items()
        if leading is not None and attestation.image != leading
    )
    return Decision(
        threshold=threshold,
        committed=leading if len(supporters) >= threshold else None,
        leading=leading,
        supporters=supporters,
        attestations=tuple(votes[a] for a in sorted(votes)),
        mismatches=mismatches,
        rejected=rejected,
        equivocations=tuple(equivocations),
    )
