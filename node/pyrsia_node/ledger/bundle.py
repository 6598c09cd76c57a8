"""Offline proof bundles: everything needed to check one record without a running node.

A bundle is canonical JSON::

    {"format": "pyrsia-proof-bundle/v2",
     "record": base64 canonical record bytes,
     "index": entry index,
     "inclusion_proof": [base64 hash, ...],
     "checkpoint": signed checkpoint note text,
     "authorities": [{"name": ..., "public_key": base64 Ed25519 key}, ...],
     "governance": [{"index": entry index, "record": base64 governance record,
                     "inclusion_proof": [base64 hash, ...]}, ...]}

``authorities`` are the authorities the node that made the bundle claims are in force.
``governance`` are the log's governance records below the checkpoint's size, each with its
inclusion proof in that checkpoint. Version 1 bundles (no ``governance``) are still read.

Which keys judge the checkpoint, strongest first:

- a genesis (``pyrsia verify --genesis``): the authorities in force at the checkpoint's
  size are replayed from the genesis and the bundle's governance records
  (``ledger.authorities``), each of which must be proven included in that very checkpoint;
  the node's claimed list is then only compared, never trusted;
- an authority list the caller already trusts;
- the bundle's own claimed list: this proves consistency, not authenticity.

A Merkle proof shows that a record is in the log, never that no other record is: a bundle
that leaves out governance records makes the verifier judge with an older authority set
(one the governance key did sign), never with keys it did not sign. Verification runs in
order and stops at the first failure, naming the step: the record decodes canonically, the
checkpoint parses, the governance records are included and replayed, the checkpoint is
signed by a quorum, the record is included in it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyrsia_node import merkle
from pyrsia_node.genesis import Genesis, quorum
from pyrsia_node.ledger.authorities import AuthoritiesInForce, authorities_in_force
from pyrsia_node.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    QuorumNotReached,
    SignedNote,
    origin_for,
    verify_checkpoint,
)
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import Record, RecordError, decode_record

FORMAT = "pyrsia-proof-bundle/v2"
READABLE_FORMATS = ("pyrsia-proof-bundle/v1", FORMAT)


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


def _proof(where: str, proof: object) -> tuple[bytes, ...]:
    if not isinstance(proof, list):
        raise BundleError("bundle format", f"{where}: expected a list")
    return tuple(_unb64(f"{where}[{i}]", h) for i, h in enumerate(proof))


def _index(where: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BundleError("bundle format", f"{where}: expected a non-negative integer")
    return value


@dataclass(frozen=True, slots=True)
class GovernanceEntry:
    """A governance record of the log with its inclusion proof in the bundle's checkpoint."""

    index: int
    record: bytes
    inclusion_proof: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ProofBundle:
    record: bytes
    index: int
    inclusion_proof: tuple[bytes, ...]
    checkpoint: str
    authorities: tuple[tuple[str, bytes], ...]
    governance: tuple[GovernanceEntry, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "record": _b64(self.record),
            "index": self.index,
            "inclusion_proof": [_b64(h) for h in self.inclusion_proof],
            "checkpoint": self.checkpoint,
            "authorities": [{"name": n, "public_key": _b64(k)} for n, k in self.authorities],
            "governance": [
                {
                    "index": g.index,
                    "record": _b64(g.record),
                    "inclusion_proof": [_b64(h) for h in g.inclusion_proof],
                }
                for g in self.governance
            ],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> ProofBundle:
        try:
            doc: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError("bundle format", f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") not in READABLE_FORMATS:
            raise BundleError("bundle format", f"expected a JSON object with format {FORMAT!r}")
        note, authorities = doc.get("checkpoint"), doc.get("authorities")
        governance = doc.get("governance", [])
        if not isinstance(note, str):
            raise BundleError("bundle format", "checkpoint: expected signed note text")
        if not isinstance(authorities, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) for a in authorities
        ):
            raise BundleError("bundle format", "authorities: expected [{name, public_key}]")
        if not isinstance(governance, list) or not all(isinstance(g, dict) for g in governance):
            raise BundleError("bundle format", "governance: expected [{index, record, proof}]")
        return cls(
            record=_unb64("record", doc.get("record")),
            index=_index("index", doc.get("index")),
            inclusion_proof=_proof("inclusion_proof", doc.get("inclusion_proof")),
            checkpoint=note,
            authorities=tuple(
                (a["name"], _unb64(f"authorities[{i}].public_key", a.get("public_key")))
                for i, a in enumerate(authorities)
            ),
            governance=tuple(
                GovernanceEntry(
                    _index(f"governance[{i}].index", g.get("index")),
                    _unb64(f"governance[{i}].record", g.get("record")),
                    _proof(f"governance[{i}].inclusion_proof", g.get("inclusion_proof")),
                )
                for i, g in enumerate(governance)
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
        """A bundle for entry ``index`` against ``note`` (default: the latest checkpoint),
        with every governance record below the checkpoint's size."""
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
            governance=tuple(
                GovernanceEntry(i, log.entry(i), tuple(log.inclusion_proof(i, size)))
                for i in log.governance_indexes(size)
            ),
        )


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """What a verified bundle proves: ``record`` is entry ``index`` of ``checkpoint``,
    signed by ``quorum`` of ``authorities``."""

    record: Record
    index: int
    checkpoint: Checkpoint
    quorum: int
    authorities: tuple[tuple[str, bytes], ...]
    # Set when the authorities were replayed from a genesis (``genesis=``).
    derived: AuthoritiesInForce | None = None
    # With ``derived``: whether the node's claimed list names the same authorities.
    claimed_authorities_match: bool | None = None


def verify_bundle(
    bundle: ProofBundle,
    authorities: Sequence[tuple[str, bytes]] | None = None,
    origin: str | None = None,
    genesis: Genesis | None = None,
) -> VerifiedBundle:
    """Check ``bundle``; raise :class:`BundleError` naming the first failed step.

    With ``genesis`` the checkpoint is judged by the authorities in force at its size,
    replayed from the genesis and the bundle's governance records, and its origin must be
    the genesis chain's; else by ``authorities``, else by the bundle's own claimed list.
    """
    try:
        record = decode_record(bundle.record)
    except RecordError as exc:
        raise BundleError("record", str(exc)) from None
    try:
        unverified = Checkpoint.parse(SignedNote.parse(bundle.checkpoint).body)
    except CheckpointError as exc:
        raise BundleError("checkpoint", f"{type(exc).__name__}: {exc}") from None
    derived: AuthoritiesInForce | None = None
    if genesis is not None:
        derived = _replay_governance(bundle, genesis, unverified)
        keys = derived.authorities
        origin = origin_for(genesis.chain_id) if origin is None else origin
    else:
        keys = tuple(bundle.authorities if authorities is None else authorities)
    if not keys:
        raise BundleError("checkpoint", "no authority keys to verify the checkpoint with")
    needed = quorum(len(keys))
    matches = None if derived is None else set(bundle.authorities) == set(keys)
    try:
        checkpoint = verify_checkpoint(bundle.checkpoint, keys, needed, origin)
    except CheckpointError as exc:
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, QuorumNotReached) and derived is not None:
            message += (
                f"; the authorities in force at size {unverified.size} are "
                f"{_names(keys)} (genesis + {len(derived.applied)} governance changes)"
            )
            if not matches:
                message += f", not the {_names(bundle.authorities)} the bundle claims"
            message += "".join(
                f"; governance entry {r.index} refused: {r.reason}" for r in derived.refused
            )
        raise BundleError("checkpoint", message) from None
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
    return VerifiedBundle(record, bundle.index, checkpoint, needed, keys, derived, matches)


def _names(authorities: Sequence[tuple[str, bytes]]) -> str:
    return ", ".join(sorted(name for name, _ in authorities)) or "(none)"


def _replay_governance(
    bundle: ProofBundle, genesis: Genesis, checkpoint: Checkpoint
) -> AuthoritiesInForce:
    """The authorities in force at the checkpoint's size, from the bundle's governance
    records, each proven to be in that checkpoint (whose signatures are checked next,
    against the result). Only records the governance key signed change anything; which
    of them a bundle carries is up to its maker (see the module docstring)."""
    for entry in bundle.governance:
        if entry.index >= checkpoint.size:
            raise BundleError(
                "governance",
                f"entry {entry.index} is beyond the checkpoint's size {checkpoint.size}",
            )
        try:
            merkle.verify_inclusion(
                merkle.leaf_hash(entry.record),
                entry.index,
                checkpoint.size,
                entry.inclusion_proof,
                checkpoint.root,
            )
        except merkle.ProofError as exc:
            raise BundleError(
                "governance",
                f"the record given for entry {entry.index} is not that entry of the "
                f"checkpoint of size {checkpoint.size}: {exc}",
            ) from None
    try:
        return authorities_in_force(
            genesis, ((g.index, g.record) for g in bundle.governance), checkpoint.size
        )
    except ValueError as exc:  # NotAGovernanceRecord, or indexes out of order
        raise BundleError("governance", str(exc)) from None
