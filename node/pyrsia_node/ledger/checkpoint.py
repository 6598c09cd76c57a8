"""Checkpoints: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note`` envelopes, cosigned by
authorities with Ed25519, and their verification against a quorum of authorities.

Body (tlog-checkpoint)::

    <origin>\\n            e.g. "pyrsia.io/<chain_id>"
    <tree size>\\n         decimal, no sign, no leading zeros
    <base64 root hash>\\n  standard base64 of 32 bytes
    [<extension line>\\n]*

Signed note: the body, one empty line, then one line per signature
``— <name> <base64(key id || Ed25519 signature)>`` (U+2014 EM DASH, space). The signature
covers the body bytes exactly. Key id = first 4 bytes of
``SHA-256(name || 0x0A || 0x01 || public key)`` (0x01 is the Ed25519 signature type).

A checkpoint is valid for a network only with valid signatures from at least ``quorum``
distinct authorities in force at that size; signatures by keys the verifier does not know
are ignored, a known key whose signature does not verify rejects the note. This module is
pure apart from signing with a given key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pyrsia_node.identity import Identity, verify_signature
from pyrsia_node.merkle import HASH_SIZE

ED25519_TYPE = b"\x01"
MAX_SIGNATURES = 100
_SIG_PREFIX = "\u2014 "
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,19})$")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


class CheckpointError(ValueError):
    """A checkpoint or signed note that cannot be accepted; subclasses say which check failed."""


class MalformedNote(CheckpointError):
    """The text is not a signed note (layout, signature lines, encoding)."""


class MalformedCheckpoint(CheckpointError):
    """The note's body is not a tlog-checkpoint (origin, size, root hash lines)."""


class OriginMismatch(CheckpointError):
    """The checkpoint belongs to another log or network."""


class InvalidSignature(CheckpointError):
    """A signature by a known authority key does not verify."""


class QuorumNotReached(CheckpointError):
    """Fewer distinct known authorities signed than the quorum requires."""


def origin_for(chain_id: str) -> str:
    """The origin line of a network's log."""
    return f"pyrsia.io/{chain_id}"


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise MalformedNote(f"key name {name!r}: must be non-empty, without spaces or '+'")


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key id of an Ed25519 key named ``name``."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + public_key).digest()[:4]


def verifier_key(name: str, public_key: bytes) -> str:
    """The signed-note verifier key text ``name+<hex key id>+<base64(0x01 || key)>``."""
    return (
        f"{name}+{key_id(name, public_key).hex()}+"
        + base64.b64encode(ED25519_TYPE + public_key).decode()
    )


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A commitment to the log's first ``size`` entries: ``root`` is their RFC 9162 root."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or _CONTROL.search(self.origin):
            raise MalformedCheckpoint(f"origin {self.origin!r}: one non-empty line expected")
        if not 0 <= self.size < 1 << 64:
            raise MalformedCheckpoint(f"tree size {self.size} is out of range")
        if len(self.root) != HASH_SIZE:
            raise MalformedCheckpoint(f"root hash has {len(self.root)} bytes, expected 32")
        for line in self.extensions:
            if not line or "\n" in line or _CONTROL.search(line):
                raise MalformedCheckpoint(f"extension line {line!r}: one non-empty line expected")

    def body(self) -> bytes:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return ("\n".join([*lines, *self.extensions]) + "\n").encode()

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise MalformedCheckpoint("checkpoint body is not UTF-8") from None
        if not text.endswith("\n"):
            raise MalformedCheckpoint("checkpoint body must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpoint("checkpoint needs origin, tree size and root hash lines")
        origin, size, root, *extensions = lines
        if not _SIZE.match(size):
            raise MalformedCheckpoint(f"tree size {size!r}: expected a decimal number")
        try:
            raw_root = base64.b64decode(root, validate=True)
        except binascii.Error:
            raise MalformedCheckpoint(f"root hash {root!r}: not base64") from None
        checkpoint = cls(origin, int(size), raw_root, tuple(extensions))
        if checkpoint.body() != body:
            raise MalformedCheckpoint("checkpoint body is not in canonical form")
        return checkpoint


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line of a signed note."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        blob = base64.b64encode(self.key_id + self.signature).decode()
        return f"{_SIG_PREFIX}{self.name} {blob}\n"


@dataclass(frozen=True, slots=True)
class SignedNote:
    """A note body with its signature lines, in the order they appear."""

    body: bytes
    signatures: tuple[NoteSignature, ...]

    def format(self) -> str:
        return self.body.decode() + "\n" + "".join(s.line() for s in self.signatures)

    def with_signature(self, signature: NoteSignature) -> SignedNote:
        """This note with ``signature`` added, replacing any earlier one by the same key."""
        kept = tuple(
            s for s in self.signatures if (s.name, s.key_id) != (signature.name, signature.key_id)
        )
        return replace(self, signatures=(*kept, signature))

    @classmethod
    def parse(cls, text: str) -> SignedNote:
        if _CONTROL.search(text):
            raise MalformedNote("a signed note must not contain control characters but newline")
        split = text.rfind("\n\n")
        if split < 0:
            raise MalformedNote("no empty line separates the note body from its signatures")
        body, block = text[: split + 1], text[split + 2 :]
        if not block.endswith("\n"):
            raise MalformedNote("the last signature line must end with a newline")
        signatures: list[NoteSignature] = []
        for line in block[:-1].split("\n"):
            if not line.startswith(_SIG_PREFIX):
                raise MalformedNote(f"signature line {line!r} does not start with '— '")
            name, sep, blob = line[len(_SIG_PREFIX) :].partition(" ")
            _check_name(name)
            try:
                raw = base64.b64decode(blob, validate=True) if sep else b""
            except binascii.Error:
                raw = b""
            if len(raw) < 5:
                raise MalformedNote(f"signature line for {name!r}: expected base64 of key id||sig")
            signatures.append(NoteSignature(name, raw[:4], raw[4:]))
        if len(signatures) > MAX_SIGNATURES:
            raise MalformedNote(f"{len(signatures)} signatures; at most {MAX_SIGNATURES}")
        return cls(body.encode(), tuple(signatures))


def sign(checkpoint: Checkpoint, name: str, identity: Identity) -> NoteSignature:
    """``identity``'s cosignature of ``checkpoint`` under the key name ``name``."""
    _check_name(name)
    return NoteSignature(name, key_id(name, identity.public_key), identity.sign(checkpoint.body()))


def cosign(note: SignedNote, name: str, identity: Identity) -> SignedNote:
    """``note`` with ``identity``'s signature added (its body must be a checkpoint)."""
    return note.with_signature(sign(Checkpoint.parse(note.body), name, identity))


def verify_checkpoint(
    note_text: str,
    authorities: Sequence[tuple[str, bytes]],
    quorum: int,
    origin: str | None = None,
) -> Checkpoint:
    """The checkpoint in ``note_text`` when at least ``quorum`` of ``authorities``
    ((name, Ed25519 public key) pairs) signed it; raises a :class:`CheckpointError` subclass
    naming the failed check otherwise. Signatures by unknown keys are ignored."""
    note = SignedNote.parse(note_text)
    checkpoint = Checkpoint.parse(note.body)
    if origin is not None and checkpoint.origin != origin:
        raise OriginMismatch(f"checkpoint origin is {checkpoint.origin!r}, expected {origin!r}")
    known = {(name, key_id(name, key)): key for name, key in authorities}
    signers: set[bytes] = set()
    for sig in note.signatures:
        public_key = known.get((sig.name, sig.key_id))
        if public_key is None:
            continue
        if not verify_signature(public_key, sig.signature, note.body):
            raise InvalidSignature(
                f"the signature of authority {sig.name!r} does not verify for this checkpoint"
            )
        signers.add(public_key)
    if len(signers) < quorum:
        raise QuorumNotReached(
            f"{len(signers)} of {len(known)} authorities signed checkpoint size "
            f"{checkpoint.size}; a quorum needs {quorum}"
        )
    return checkpoint
