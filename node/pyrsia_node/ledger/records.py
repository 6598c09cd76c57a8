"""Ledger records and their canonical byte encoding (format version 1).

A record's canonical bytes are its Merkle leaf: ``leaf_hash(record.encode())`` is the
*record hash* every proof and lookup uses. This module never verifies attestation
contents (that is ``attestation``'s job) and never does IO.

Encoding, version 1. Integers are unsigned big-endian. ``str16`` is a u16 byte length
followed by that many bytes of UTF-8 text without control characters; ``bytes16`` and
``bytes32`` are a u16 or u32 length followed by raw bytes. Nothing may follow a record::

    record      = version:u8 (=0x01) kind:u8 body
    kind 0x01   artifact record
      package_type:u8        0x01 docker, 0x02 maven
      package_id:str16       docker "registry/repository:tag" (see docker_package_id),
                             maven "group:artifact:version"
      artifact_count:u16     >= 1, then per artifact (digests unique):
        digest:str16         "sha256:" + 64 lowercase hex digits
        size:u64
        media_type:str16
      attestation_count:u16  >= 1, then per DSSE envelope (envelopes unique):
        payload_type:str16   "application/vnd.in-toto+json"
        payload:bytes32
        signature_count:u16  >= 1, then per signature (keyids unique):
          keyid:str16
          sig:bytes16
    kind 0x02   governance record
      chain_id:str16
      sequence:u64           the governance action's number on this chain
      action:u8              0x01 add, 0x02 remove
      name:str16             the authority's name (non-empty)
      public_key:32 bytes    the authority's Ed25519 key
      grpc_address:str16     empty for remove
      http_address:str16     empty for remove
      metrics_address:str16  empty for remove
      signature:64 bytes     Ed25519 by the governance key over
                             GOVERNANCE_DOMAIN || every preceding byte of the record

Because every field has one fixed-width or length-prefixed form, a value has exactly one
encoding; ``decode`` additionally rejects unknown versions, kinds and enum values,
duplicates, empty lists, invalid UTF-8 and trailing bytes, so ``decode(b).encode() == b``
holds for every accepted ``b``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from pyrsia_node.identity import Identity, verify_signature
from pyrsia_node.merkle import leaf_hash

FORMAT_VERSION = 1
KIND_ARTIFACT = 0x01
KIND_GOVERNANCE = 0x02
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
GOVERNANCE_DOMAIN = b"pyrsia.io/governance-record/v1\n"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOCKER_ID = re.compile(
    r"^(?P<registry>[a-z0-9.-]+(:[0-9]+)?)/(?P<repository>[a-z0-9]+([._/-][a-z0-9]+)*)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))$"
)
_MAVEN_PART = re.compile(r"^[A-Za-z0-9_.+-]+$")


_E = TypeVar("_E", bound=enum.IntEnum)


class RecordError(ValueError):
    """Bytes or values that are not a valid, canonical ledger record."""


class GovernanceSignatureError(RecordError):
    """A governance record is not signed by the network's governance key."""


class PackageType(enum.IntEnum):
    DOCKER = 1
    MAVEN = 2


class GovernanceAction(enum.IntEnum):
    ADD = 1
    REMOVE = 2


def record_hash(record: bytes) -> bytes:
    """The hash a record is known by in the log: its RFC 9162 leaf hash."""
    return leaf_hash(record)


def docker_package_id(image: str) -> str:
    """Normalize an image reference the way Docker does: ``alpine`` ->
    ``docker.io/library/alpine:latest``, ``foo/bar:1`` -> ``docker.io/foo/bar:1``."""
    name, tag_sep, tag = image, "", ""
    if "@" in image:
        name, _, digest = image.partition("@")
        suffix = f"@{digest}"
    else:
        slash = image.rfind("/")
        colon = image.rfind(":")
        if colon > slash:
            name, tag_sep, tag = image[:colon], ":", image[colon + 1 :]
        suffix = f":{tag}" if tag_sep else ":latest"
    first, _, rest = name.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        name = f"docker.io/{name}"
    registry, _, repository = name.partition("/")
    if registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    package_id = f"{registry}/{repository}{suffix}"
    if not _DOCKER_ID.match(package_id):
        raise RecordError(f"{image!r} is not an image reference like NAME[:TAG]")
    return package_id


def maven_package_id(gav: str) -> str:
    """Check and return a Maven ``group:artifact:version`` coordinate."""
    parts = gav.split(":")
    if len(parts) != 3 or not all(_MAVEN_PART.match(p) for p in parts):
        raise RecordError(f"{gav!r} is not a Maven coordinate GROUP:ARTIFACT:VERSION")
    return gav


def _check_text(where: str, text: str) -> None:
    if _CONTROL.search(text):
        raise RecordError(f"{where}: control characters are not allowed")
    # UTF-8 takes at most 4 bytes a character: only long text can exceed the u16 length.
    if len(text) > 0x3FFF and len(text.encode()) > 0xFFFF:
        raise RecordError(f"{where}: longer than 65535 bytes")


def _text_ok(text: str) -> bool:
    """What _check_text accepts, without formatting its message on the hot path."""
    return not _CONTROL.search(text) and (len(text) <= 0x3FFF or len(text.encode()) <= 0xFFFF)


# The rules of each record part, shared by the dataclasses (which run them on construction)
# and by check_record (which runs them on parsed fields without building objects).


def _check_artifact(digest: str, size: int, media_type: str) -> None:
    if not _DIGEST.match(digest):
        raise RecordError(f"digest {digest!r}: expected sha256:<64 lowercase hex>")
    if not 0 <= size < 1 << 64:
        raise RecordError(f"artifact {digest}: size {size} is out of range")
    if not _text_ok(media_type):
        _check_text(f"artifact {digest} media type", media_type)


def _check_envelope(
    payload_type: str, payload: bytes, signatures: tuple[tuple[str, bytes], ...]
) -> None:
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise RecordError(
            f"envelope payloadType {payload_type!r}: expected {IN_TOTO_PAYLOAD_TYPE!r}"
        )
    if not signatures:
        raise RecordError("envelope: at least one signature is required")
    if len(signatures) > 1 and len({k for k, _ in signatures}) != len(signatures):
        raise RecordError("envelope: the same keyid signs twice")
    for keyid, sig in signatures:
        _check_text("envelope keyid", keyid)
        if len(sig) > 0xFFFF:
            raise RecordError(f"envelope signature by {keyid!r} is too long")
    if len(payload) >= 1 << 32:
        raise RecordError("envelope payload is larger than 4 GiB")


def _check_artifact_record(
    package_type: object,
    package_id: str,
    digests: list[str],
    attestations: list[tuple[str, bytes, tuple[tuple[str, bytes], ...]]],
) -> None:
    """``attestations`` as (payload type, payload, signatures): equal exactly when the
    envelopes are."""
    if not isinstance(package_type, PackageType):
        raise RecordError(f"package type {package_type!r}: expected docker or maven")
    _check_text("package id", package_id)
    if package_type is PackageType.DOCKER and not _DOCKER_ID.match(package_id):
        raise RecordError(f"docker package id {package_id!r}: expected registry/repository:tag")
    if package_type is PackageType.MAVEN:
        maven_package_id(package_id)
    if not digests:
        raise RecordError(f"{package_id}: a record needs at least one artifact")
    if not 1 <= len(attestations) <= 0xFFFF or len(digests) > 0xFFFF:
        raise RecordError(
            f"{package_id}: needs 1 to 65535 attestations and at most 65535 artifacts"
        )
    if len(digests) > 1 and len(set(digests)) != len(digests):
        raise RecordError(f"{package_id}: an artifact digest is listed twice")
    if len(attestations) > 1 and len(set(attestations)) != len(attestations):
        raise RecordError(f"{package_id}: an attestation is listed twice")


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, value: int) -> None:
        self.parts.append(struct.pack(">B", value))

    def u16(self, value: int) -> None:
        self.parts.append(struct.pack(">H", value))

    def u64(self, value: int) -> None:
        self.parts.append(struct.pack(">Q", value))

    def raw(self, value: bytes) -> None:
        self.parts.append(value)

    def str16(self, value: str) -> None:
        data = value.encode()
        self.u16(len(data))
        self.raw(data)

    def bytes16(self, value: bytes) -> None:
        self.u16(len(value))
        self.raw(value)

    def bytes32(self, value: bytes) -> None:
        self.parts.append(struct.pack(">I", len(value)))
        self.raw(value)

    def value(self) -> bytes:
        return b"".join(self.parts)


_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_U64_U16 = struct.Struct(">QH").unpack_from


class _Reader:
    """Reads fields left to right; every read checks that the bytes are there."""

    __slots__ = ("data", "end_pos", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end_pos = len(data)

    def _short(self, what: str) -> RecordError:
        return RecordError(f"{what} at byte {self.pos}: the record ends too early")

    def take(self, n: int, what: str) -> bytes:
        pos = self.pos
        if pos + n > self.end_pos:
            raise self._short(what)
        self.pos = pos + n
        return self.data[pos : pos + n]

    def u8(self, what: str) -> int:
        pos = self.pos
        if pos >= self.end_pos:
            raise self._short(what)
        self.pos = pos + 1
        return self.data[pos]

    def u16(self, what: str) -> int:
        pos = self.pos
        if pos + 2 > self.end_pos:
            raise self._short(what)
        self.pos = pos + 2
        value: int = _U16(self.data, pos)[0]
        return value

    def u64(self, what: str) -> int:
        pos = self.pos
        if pos + 8 > self.end_pos:
            raise self._short(what)
        self.pos = pos + 8
        value: int = _U64(self.data, pos)[0]
        return value

    def str16(self, what: str) -> str:
        raw = self.take(self.u16(what), what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise RecordError(f"{what}: not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != self.end_pos:
            raise RecordError(f"{self.end_pos - self.pos} unexpected bytes after the record")


def _enum(kind: type[_E], value: int, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise RecordError(f"{what}: unknown value {value}") from None


@dataclass(frozen=True, slots=True)
class Artifact:
    """One blob a package consists of (manifest, config, layer, jar, pom, ...)."""

    digest: str
    size: int
    media_type: str

    def __post_init__(self) -> None:
        _check_artifact(self.digest, self.size, self.media_type)


@dataclass(frozen=True, slots=True)
class DsseEnvelope:
    """A DSSE envelope kept verbatim: payload type, payload bytes, (keyid, sig) pairs."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        _check_envelope(self.payload_type, self.payload, self.signatures)

    @classmethod
    def from_json(cls, data: bytes) -> DsseEnvelope:
        """Parse DSSE JSON (``payloadType``, base64 ``payload``, ``signatures[{keyid, sig}]``)."""
        try:
            doc = json.loads(data)
            signatures = tuple(
                (str(s.get("keyid", "")), base64.b64decode(s["sig"], validate=True))
                for s in doc["signatures"]
            )
            return cls(
                str(doc["payloadType"]), base64.b64decode(doc["payload"], validate=True), signatures
            )
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"not a DSSE envelope: {exc!r}") from None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "payload": base64.b64encode(self.payload).decode(),
                "payloadType": self.payload_type,
                "signatures": [
                    {"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in self.signatures
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    """The network's agreement on a package's artifact digests, with the attestations."""

    package_type: PackageType
    package_id: str
    artifacts: tuple[Artifact, ...]
    attestations: tuple[DsseEnvelope, ...]

    def __post_init__(self) -> None:
        _check_artifact_record(
            self.package_type,
            self.package_id,
            [a.digest for a in self.artifacts],
            [(e.payload_type, e.payload, e.signatures) for e in self.attestations],
        )

    def encode(self) -> bytes:
        w = _Writer()
        w.u8(FORMAT_VERSION)
        w.u8(KIND_ARTIFACT)
        w.u8(self.package_type)
        w.str16(self.package_id)
        w.u16(len(self.artifacts))
        for a in self.artifacts:
            w.str16(a.digest)
            w.u64(a.size)
            w.str16(a.media_type)
        w.u16(len(self.attestations))
        for env in self.attestations:
            w.str16(env.payload_type)
            w.bytes32(env.payload)
            w.u16(len(env.signatures))
            for keyid, sig in env.signatures:
                w.str16(keyid)
                w.bytes16(sig)
        return w.value()

    @classmethod
    def decode(cls, data: bytes) -> ArtifactRecord:
        record = decode_record(data)
        if not isinstance(record, ArtifactRecord):
            raise RecordError("not an artifact record")
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "artifact",
            "package_type": self.package_type.name.lower(),
            "package_id": self.package_id,
            "artifacts": [
                {"digest": a.digest, "size": a.size, "media_type": a.media_type}
                for a in self.artifacts
            ],
            "attestations": [json.loads(env.to_json()) for env in self.attestations],
        }


@dataclass(frozen=True, slots=True)
class GovernanceRecord:
    """Adds or removes an authority; valid only when signed by the governance key."""

    chain_id: str
    sequence: int
    action: GovernanceAction
    name: str
    public_key: bytes
    grpc_address: str
    http_address: str
    metrics_address: str
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.action, GovernanceAction):
            raise RecordError(f"governance action {self.action!r}: expected add or remove")
        for where, text in (("chain id", self.chain_id), ("authority name", self.name)):
            if not text:
                raise RecordError(f"governance record: {where} must not be empty")
            _check_text(where, text)
        if not 0 <= self.sequence < 1 << 64:
            raise RecordError(f"governance sequence {self.sequence} is out of range")
        if len(self.public_key) != 32:
            raise RecordError("governance record: the public key must have 32 bytes")
        if len(self.signature) != 64:
            raise RecordError("governance record: the signature must have 64 bytes")
        addresses = (self.grpc_address, self.http_address, self.metrics_address)
        for address in addresses:
            _check_text("authority address", address)
        if self.action is GovernanceAction.REMOVE and any(addresses):
            raise RecordError("a remove record carries no addresses")

    @classmethod
    def create(
        cls,
        governance: Identity,
        chain_id: str,
        sequence: int,
        action: GovernanceAction,
        name: str,
        public_key: bytes,
        grpc_address: str = "",
        http_address: str = "",
        metrics_address: str = "",
    ) -> GovernanceRecord:
        """A record signed by ``governance`` (the holder of the network's governance key)."""
        unsigned = cls(
            chain_id,
            sequence,
            action,
            name,
            public_key,
            grpc_address,
            http_address,
            metrics_address,
            bytes(64),
        )
        signature = governance.sign(GOVERNANCE_DOMAIN + unsigned._signed_part())
        return cls(
            chain_id,
            sequence,
            action,
            name,
            public_key,
            grpc_address,
            http_address,
            metrics_address,
            signature,
        )

    @classmethod
    def membership(
        cls,
        governance: Identity,
        chain_id: str,
        sequence: int,
        action: GovernanceAction,
        name: str,
        public_key: bytes,
        addresses: tuple[str, str, str],
    ) -> GovernanceRecord:
        """``create`` for a membership change: an ADD carries ``addresses`` (gRPC, HTTP,
        metrics: where the others reach the new authority), a REMOVE none."""
        kept = addresses if action is GovernanceAction.ADD else ("", "", "")
        return cls.create(governance, chain_id, sequence, action, name, public_key, *kept)

    def _signed_part(self) -> bytes:
        w = _Writer()
        w.u8(FORMAT_VERSION)
        w.u8(KIND_GOVERNANCE)
        w.str16(self.chain_id)
        w.u64(self.sequence)
        w.u8(self.action)
        w.str16(self.name)
        w.raw(self.public_key)
        w.str16(self.grpc_address)
        w.str16(self.http_address)
        w.str16(self.metrics_address)
        return w.value()

    def encode(self) -> bytes:
        return self._signed_part() + self.signature

    def verify(self, governance_public_key: bytes, chain_id: str) -> None:
        """Raise :class:`GovernanceSignatureError` unless signed for ``chain_id`` by the key."""
        if self.chain_id != chain_id:
            raise GovernanceSignatureError(
                f"governance record is for chain {self.chain_id!r}, not {chain_id!r}"
            )
        message = GOVERNANCE_DOMAIN + self._signed_part()
        if not verify_signature(governance_public_key, self.signature, message):
            raise GovernanceSignatureError(
                f"governance record #{self.sequence} ({self.action.name.lower()} {self.name}) "
                "is not signed by this network's governance key"
            )

    @classmethod
    def decode(cls, data: bytes) -> GovernanceRecord:
        record = decode_record(data)
        if not isinstance(record, GovernanceRecord):
            raise RecordError("not a governance record")
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "governance",
            "chain_id": self.chain_id,
            "sequence": self.sequence,
            "action": self.action.name.lower(),
            "name": self.name,
            "public_key": base64.b64encode(self.public_key).decode(),
            "grpc_address": self.grpc_address,
            "http_address": self.http_address,
            "metrics_address": self.metrics_address,
            "signature": base64.b64encode(self.signature).decode(),
        }


Record = ArtifactRecord | GovernanceRecord


_Envelope = tuple[str, bytes, tuple[tuple[str, bytes], ...]]
ScannedArtifactRecord = tuple[PackageType, str, list[tuple[str, int, str]], list[_Envelope]]
_PACKAGE_TYPES = {t.value: t for t in PackageType}


def _scan_artifact(
    r: _Reader,
) -> ScannedArtifactRecord:
    """Parse and check an artifact record's body into plain values, without building the
    dataclasses: the hot path of every log append. The reads are inlined (one bounds check
    per field, struct.unpack_from) instead of going through _Reader's methods."""
    data, end = r.data, r.end_pos
    package_type = _PACKAGE_TYPES.get(r.u8("package type"))
    if package_type is None:
        raise RecordError(f"package type: unknown value {data[r.pos - 1]}")
    package_id = r.str16("package id")
    pos = r.pos

    def short(what: str) -> RecordError:
        return RecordError(f"{what} at byte {pos}: the record ends too early")

    def text(raw: bytes, what: str) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise RecordError(f"{what}: not valid UTF-8") from None

    if pos + 2 > end:
        raise short("artifact count")
    (count,) = _U16(data, pos)
    pos += 2
    artifacts = []
    for _ in range(count):
        if pos + 2 > end:
            raise short("digest")
        (n,) = _U16(data, pos)
        stop = pos + 2 + n
        if stop > end:
            raise short("digest")
        digest = text(data[pos + 2 : stop], "digest")
        if stop + 10 > end:
            raise short("size" if stop + 8 > end else "media type")
        (size, n) = _U64_U16(data, stop)
        pos = stop + 10
        if pos + n > end:
            raise short("media type")
        media_type = text(data[pos : pos + n], "media type")
        pos += n
        _check_artifact(digest, size, media_type)
        artifacts.append((digest, size, media_type))
    if pos + 2 > end:
        raise short("attestation count")
    (count,) = _U16(data, pos)
    pos += 2
    envelopes: list[_Envelope] = []
    for _ in range(count):
        if pos + 2 > end:
            raise short("payload type")
        (n,) = _U16(data, pos)
        stop = pos + 2 + n
        if stop > end:
            raise short("payload type")
        payload_type = text(data[pos + 2 : stop], "payload type")
        if stop + 4 > end:
            raise short("payload")
        (n,) = _U32(data, stop)
        pos = stop + 4
        if pos + n > end:
            raise short("payload")
        payload = data[pos : pos + n]
        pos += n
        if pos + 2 > end:
            raise short("signature count")
        (signature_count,) = _U16(data, pos)
        pos += 2
        signatures = []
        for _ in range(signature_count):
            if pos + 2 > end:
                raise short("keyid")
            (n,) = _U16(data, pos)
            stop = pos + 2 + n
            if stop > end:
                raise short("keyid")
            keyid = text(data[pos + 2 : stop], "keyid")
            if stop + 2 > end:
                raise short("signature")
            (n,) = _U16(data, stop)
            pos = stop + 2
            if pos + n > end:
                raise short("signature")
            signatures.append((keyid, data[pos : pos + n]))
            pos += n
        envelope = (payload_type, payload, tuple(signatures))
        _check_envelope(*envelope)
        envelopes.append(envelope)
    r.pos = pos
    _check_artifact_record(package_type, package_id, [a[0] for a in artifacts], envelopes)
    return package_type, package_id, artifacts, envelopes


_T = TypeVar("_T")
_set = object.__setattr__


def _checked(cls: type[_T], names: tuple[str, ...], values: tuple[object, ...]) -> _T:
    """An instance of the frozen dataclass ``cls`` built from ``values`` (its fields
    ``names``, in order) that ``_scan_artifact`` has already checked: the object the
    constructor would build, without running the same checks again in ``__post_init__``
    (a fifth of a decode's time went to running them twice)."""
    instance: _T = object.__new__(cls)
    for name, value in zip(names, values, strict=True):
        _set(instance, name, value)
    return instance


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


_ARTIFACT_FIELDS, _ENVELOPE_FIELDS, _RECORD_FIELDS = map(
    _names, (Artifact, DsseEnvelope, ArtifactRecord)
)


def _decode_artifact(r: _Reader) -> ArtifactRecord:
    package_type, package_id, artifacts, envelopes = _scan_artifact(r)
    return _checked(
        ArtifactRecord,
        _RECORD_FIELDS,
        (
            package_type,
            package_id,
            tuple(_checked(Artifact, _ARTIFACT_FIELDS, a) for a in artifacts),
            tuple(_checked(DsseEnvelope, _ENVELOPE_FIELDS, e) for e in envelopes),
        ),
    )


def _decode_governance(r: _Reader) -> GovernanceRecord:
    return GovernanceRecord(
        chain_id=r.str16("chain id"),
        sequence=r.u64("sequence"),
        action=_enum(GovernanceAction, r.u8("action"), "governance action"),
        name=r.str16("authority name"),
        public_key=r.take(32, "public key"),
        grpc_address=r.str16("grpc address"),
        http_address=r.str16("http address"),
        metrics_address=r.str16("metrics address"),
        signature=r.take(64, "signature"),
    )


_DECODERS: dict[int, Callable[[_Reader], Record]] = {
    KIND_ARTIFACT: _decode_artifact,
    KIND_GOVERNANCE: _decode_governance,
}


def _header(r: _Reader) -> int:
    """Read version and kind; return the kind."""
    version = r.u8("format version")
    if version != FORMAT_VERSION:
        raise RecordError(f"record format version {version} is not supported (expected 1)")
    kind = r.u8("record kind")
    if kind not in _DECODERS:
        raise RecordError(f"unknown record kind {kind}")
    return kind


def check_record(data: bytes) -> str | None:
    """Check that ``data`` is a canonical record without building it: raises
    :class:`RecordError` exactly when :func:`decode_record` does (``scan_record``, tested to
    agree). Returns an artifact record's package id, None for a governance record. About
    three times faster than decoding; the log uses it on append.
    """
    scanned = scan_record(data)
    return None if scanned is None else scanned[1]


def scan_record(data: bytes) -> ScannedArtifactRecord | None:
    """What :func:`decode_record` reads from ``data``, as plain values: an artifact
    record's (package type, package id, artifacts as (digest, size, media type),
    attestations as (payload type, payload, ((keyid, signature), ...))); None for a
    governance record. Raises :class:`RecordError` exactly when ``decode_record`` does
    (the same parser and rules). Consensus' record check reads every record with it:
    building the dataclasses was a third of a decode."""
    r = _Reader(bytes(data))
    if _header(r) == KIND_ARTIFACT:
        scanned = _scan_artifact(r)
        r.end()
        return scanned
    _decode_governance(r)
    r.end()
    return None


def package_id_of(data: bytes) -> str | None:
    """An artifact record's package id, None for a governance record, read from the header
    of bytes already known to be a canonical record (``decode_record`` or ``check_record``
    accepted them); the log's append of records consensus has checked. It checks nothing
    else: use ``check_record`` on bytes of unknown origin."""
    if data[1] == KIND_GOVERNANCE:
        return None
    (length,) = _U16(data, 3)  # after version, kind and package type
    return data[5 : 5 + length].decode()


def decode_record(data: bytes) -> Record:
    """Parse canonical record bytes; raise :class:`RecordError` on anything else."""
    r = _Reader(bytes(data))
    record = _DECODERS[_header(r)](r)
    r.end()
    # No re-encoding needed: every field has exactly one encoding (fixed width or length
    # prefixed, strict UTF-8 whose decoding round-trips byte for byte, enums by value), so
    # bytes parsed to their last byte are the record's canonical encoding. The property
    # test ``test_decode_accepts_only_canonical_bytes`` holds this to account.
    return record
