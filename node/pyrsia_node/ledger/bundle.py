"""Offline proof bundles: everything needed to check one record without a running node.

A bundle is canonical JSON::

    {"format": "pyrsia-proof-bundle/v1",
     "record": base64 canonical record bytes,
     "index": entry index,
     "inclusion_proof": [base64 hash, ...],
     "checkpoint": signed checkpoint note text,
     "authorities": [{"name": ..., "public_key": base64 Ed25519 key}, ...]}

``authorities`` are the authorities in force at the checkpoint's size. A verifier that
knows them from elsewhere (the genesis) passes its own set and the bundle's is ignored.
Verification runs in order and stops at the first failure, naming the step: the record
decodes canonically, the checkpoint is signed by a quorum, the record is included in it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyrsia_node import merkle
from pyrsia_node.genesis import quorum
from pyrsia_node.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    SignedNote,
    verify_checkpoint,
)
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import Record, RecordError, decode_record

FORMAT = "pyrsia-proof-bundle/v1"


class BundleError(ValueError):
    """A bundle that is unreadable or does not verify; ``step`` names the failed check."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(where: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise BundleError("bundle format", f"{where}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise BundleError("bundle format", f"{where}: not valid base64") from None


@dataclass(frozen=True, slots=True)
class ProofBundle:
    record: bytes
    index: int
    inclusion_proof: tuple[bytes, ...]
    checkpoint: str
    authorities: tuple[tuple[str, bytes], ...]

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "record": _b64(self.record),
            "index": self.index,
            "inclusion_proof": [_b64(h) for h in self.inclusion_proof],
            "checkpoint": self.checkpoint,
            "authorities": [{"name": n, "public_key": _b64(k)} for n, k in self.authorities],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> ProofBundle:
        try:
            doc: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError("bundle format", f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BundleError("bundle format", f"expected a JSON object with format {FORMAT!r}")
        index, proof, note, authorities = (
            doc.get("index"),
            doc.get("inclusion_proof"),
            doc.get("checkpoint"),
            doc.get("authorities"),
        )
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise BundleError("bundle format", "index: expected a non-negative integer")
        if not isinstance(proof, list):
            raise BundleError("bundle format", "inclusion_proof: expected a list")
        if not isinstance(note, str):
            raise BundleError("bundle format", "checkpoint: expected signed note text")
        if not isinstance(authorities, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) for a in authorities
        ):
            raise BundleError("bundle format", "authorities: expected [{name, public_key}]")
        return cls(
            record=_unb64("record", doc.get("record")),
            index=index,
            inclusion_proof=tuple(_unb64(f"inclusion_proof[{i}]", h) for i, h in enumerate(proof)),
            checkpoint=note,
            authorities=tuple(
                (a["name"], _unb64(f"authorities[{i}].public_key", a.get("public_key")))
                for i, a in enumerate(authorities)
            ),
        )

    @classmethod
    def from_log(
        cls,
        log: TransparencyLog,
        index: int,
        authorities: Sequence[tuple[str, bytes]],
        note: str | None = None,
    ) -> ProofBundle:
        """A bundle for entry ``index`` against ``note`` (default: the latest checkpoint)."""
        note = log.latest_checkpoint() if note is None else note
        if note is None:
            raise BundleError("checkpoint", "the log has no cosigned checkpoint yet")
        size = Checkpoint.parse(SignedNote.parse(note).body).size
        return cls(
            record=log.entry(index),
            index=index,
            inclusion_proof=tuple(log.inclusion_proof(index, size)),
            checkpoint=note,
            authorities=tuple(authorities),
        )


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """What a verified bundle proves: ``record`` is entry ``index`` of ``checkpoint``."""

    record: Record
    index: int
    checkpoint: Checkpoint
    quorum: int


def verify_bundle(
    bundle: ProofBundle,
    authorities: Sequence[tuple[str, bytes]] | None = None,
    origin: str | None = None,
) -> VerifiedBundle:
    """Check ``bundle``; raise :class:`BundleError` naming the first failed step."""
    try:
        record = decode_record(bundle.record)
    except RecordError as exc:
        raise BundleError("record", str(exc)) from None
    keys = tuple(bundle.authorities if authorities is None else authorities)
    if not keys:
        raise BundleError("checkpoint", "no authority keys to verify the checkpoint with")
    needed = quorum(len(keys))
    try:
        checkpoint = verify_checkpoint(bundle.checkpoint, keys, needed, origin)
    except CheckpointError as exc:
        raise BundleError("checkpoint", f"{type(exc).__name__}: {exc}") from None
    try:
        merkle.verify_inclusion(
            merkle.leaf_hash(bundle.record),
            bundle.index,
            checkpoint.size,
            bundle.inclusion_proof,
            checkpoint.root,
        )
    except merkle.ProofError as exc:
        raise BundleError(
            "inclusion",
            f"record is not entry {bundle.index} of the checkpoint of size "
            f"{checkpoint.size}: {exc}",
        ) from None
    return VerifiedBundle(record, bundle.index, checkpoint, needed)
