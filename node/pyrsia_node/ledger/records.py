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
from dataclasses import dataclass
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
    if len(text.encode()) > 0xFFFF:
        raise RecordError(f"{where}: longer than 65535 bytes")


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


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise RecordError(f"{what} at byte {self.pos}: the record ends too early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u16(self, what: str) -> int:
        return int(struct.unpack(">H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.take(8, what))[0])

    def str16(self, what: str) -> str:
        raw = self.take(self.u16(what), what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise RecordError(f"{what}: not valid UTF-8") from None

    def bytes16(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def bytes32(self, what: str) -> bytes:
        return self.take(self.u32(what), what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise RecordError(f"{len(self.data) - self.pos} unexpected bytes after the record")


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
        if not _DIGEST.match(self.digest):
            raise RecordError(f"digest {self.digest!r}: expected sha256:<64 lowercase hex>")
        if not 0 <= self.size < 1 << 64:
            raise RecordError(f"artifact {self.digest}: size {self.size} is out of range")
        _check_text(f"artifact {self.digest} media type", self.media_type)


@dataclass(frozen=True, slots=True)
class DsseEnvelope:
    """A DSSE envelope kept verbatim: payload type, payload bytes, (keyid, sig) pairs."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if self.payload_type != IN_TOTO_PAYLOAD_TYPE:
            raise RecordError(
                f"envelope payloadType {self.payload_type!r}: expected {IN_TOTO_PAYLOAD_TYPE!r}"
            )
        if not self.signatures:
            raise RecordError("envelope: at least one signature is required")
        keyids = [k for k, _ in self.signatures]
        if len(set(keyids)) != len(keyids):
            raise RecordError("envelope: the same keyid signs twice")
        for keyid, sig in self.signatures:
            _check_text("envelope keyid", keyid)
            if len(sig) > 0xFFFF:
                raise RecordError(f"envelope signature by {keyid!r} is too long")
        if len(self.payload) >= 1 << 32:
            raise RecordError("envelope payload is larger than 4 GiB")

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
        if not isinstance(self.package_type, PackageType):
            raise RecordError(f"package type {self.package_type!r}: expected docker or maven")
        _check_text("package id", self.package_id)
        if self.package_type is PackageType.DOCKER and not _DOCKER_ID.match(self.package_id):
            raise RecordError(
                f"docker package id {self.package_id!r}: expected registry/repository:tag"
            )
        if self.package_type is PackageType.MAVEN:
            maven_package_id(self.package_id)
        if not self.artifacts:
            raise RecordError(f"{self.package_id}: a record needs at least one artifact")
        if not 1 <= len(self.attestations) <= 0xFFFF or len(self.artifacts) > 0xFFFF:
            raise RecordError(
                f"{self.package_id}: needs 1 to 65535 attestations and at most 65535 artifacts"
            )
        digests = [a.digest for a in self.artifacts]
        if len(set(digests)) != len(digests):
            raise RecordError(f"{self.package_id}: an artifact digest is listed twice")
        if len(set(self.attestations)) != len(self.attestations):
            raise RecordError(f"{self.package_id}: an attestation is listed twice")

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


def _decode_artifact(r: _Reader) -> ArtifactRecord:
    package_type = _enum(PackageType, r.u8("package type"), "package type")
    package_id = r.str16("package id")
    artifacts = tuple(
        Artifact(r.str16("digest"), r.u64("size"), r.str16("media type"))
        for _ in range(r.u16("artifact count"))
    )
    attestations = []
    for _ in range(r.u16("attestation count")):
        payload_type = r.str16("payload type")
        payload = r.bytes32("payload")
        signatures = tuple(
            (r.str16("keyid"), r.bytes16("signature")) for _ in range(r.u16("signature count"))
        )
        attestations.append(DsseEnvelope(payload_type, payload, signatures))
    return ArtifactRecord(package_type, package_id, artifacts, tuple(attestations))


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


def decode_record(data: bytes) -> Record:
    """Parse canonical record bytes; raise :class:`RecordError` on anything else."""
    r = _Reader(bytes(data))
    version = r.u8("format version")
    if version != FORMAT_VERSION:
        raise RecordError(f"record format version {version} is not supported (expected 1)")
    kind = r.u8("record kind")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise RecordError(f"unknown record kind {kind}")
    record = decoder(r)
    r.end()
    if record.encode() != data:
        raise RecordError("record bytes are not in canonical form")
    return record
