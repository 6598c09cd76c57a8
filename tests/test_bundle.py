"""Offline proof bundles: a good bundle verifies; each kind of damage names its step."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.bundle import BundleError, ProofBundle, verify_bundle
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote, cosign, origin_for
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    PackageType,
)

KEYS = [Identity.generate() for _ in range(4)]
AUTHORITIES = tuple((f"authority-{i}", k.public_key) for i, k in enumerate(KEYS))


def maven_record(i: int) -> bytes:
    return ArtifactRecord(
        PackageType.MAVEN,
        f"org.example:lib:1.{i}",
        (Artifact(f"sha256:{i:064x}", 10 * i, "application/java-archive"),),
        (DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, b"{}", (("authority-0", b"s" * 64),)),),
    ).encode()


def cosigned(log: TransparencyLog, signers: range) -> str:
    checkpoint = Checkpoint(origin_for("pyrsia-test"), log.size, log.root())
    note = SignedNote(checkpoint.body(), ())
    for i in signers:
        note = cosign(note, f"authority-{i}", KEYS[i])
    return note.format()


@pytest.fixture
def bundle(tmp_path: Path) -> ProofBundle:
    with TransparencyLog(tmp_path) as log:
        log.append([maven_record(i) for i in range(13)])
        log.put_checkpoint(cosigned(log, range(3)))
        return ProofBundle.from_log(log, 6, AUTHORITIES)


def test_bundle_from_log_verifies(bundle: ProofBundle) -> None:
    verified = verify_bundle(bundle, origin=origin_for("pyrsia-test"))
    assert verified.index == 6
    assert verified.checkpoint.size == 13
    assert verified.quorum == 3
    assert isinstance(verified.record, ArtifactRecord)
    assert verified.record.package_id == "org.example:lib:1.6"


def test_bundle_json_round_trips(bundle: ProofBundle) -> None:
    assert ProofBundle.from_json(bundle.to_json()) == bundle


def test_altered_record_fails_at_inclusion(bundle: ProofBundle) -> None:
    with pytest.raises(BundleError, match="inclusion") as info:
        verify_bundle(replace(bundle, record=maven_record(7)))
    assert info.value.step == "inclusion"


def test_wrong_index_fails_at_inclusion(bundle: ProofBundle) -> None:
    with pytest.raises(BundleError, match="not entry 7"):
        verify_bundle(replace(bundle, index=7))


def test_garbage_record_fails_at_record(bundle: ProofBundle) -> None:
    with pytest.raises(BundleError, match=r"^record:"):
        verify_bundle(replace(bundle, record=b"\x01\x01\x01"))


def test_below_quorum_fails_at_checkpoint(tmp_path: Path) -> None:
    with TransparencyLog(tmp_path) as log:
        log.append([maven_record(i) for i in range(3)])
        thin = ProofBundle.from_log(log, 1, AUTHORITIES, cosigned(log, range(2)))
    with pytest.raises(BundleError, match="QuorumNotReached") as info:
        verify_bundle(thin)
    assert info.value.step == "checkpoint"


def test_pinned_authorities_override_the_bundles_keys(bundle: ProofBundle) -> None:
    strangers = [(f"authority-{i}", Identity.generate().public_key) for i in range(4)]
    forged = replace(bundle, authorities=tuple(strangers))
    with pytest.raises(BundleError, match="checkpoint"):
        verify_bundle(forged)
    assert verify_bundle(forged, authorities=AUTHORITIES).index == 6


def test_wrong_origin_fails_at_checkpoint(bundle: ProofBundle) -> None:
    with pytest.raises(BundleError, match="OriginMismatch"):
        verify_bundle(bundle, origin=origin_for("another-network"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "v0"}, "format"),
        ({"index": -1}, "index"),
        ({"record": "%%%"}, "record: not valid base64"),
        ({"inclusion_proof": "x"}, "inclusion_proof"),
        ({"authorities": [{"public_key": ""}]}, "authorities"),
    ],
)
def test_malformed_bundle_files_are_rejected(
    bundle: ProofBundle, change: dict[str, object], message: str
) -> None:
    doc = json.loads(bundle.to_json())
    doc.update(change)
    with pytest.raises(BundleError, match=message):
        ProofBundle.from_json(json.dumps(doc).encode())


def test_proof_hashes_are_base64_in_the_file(bundle: ProofBundle) -> None:
    doc = json.loads(bundle.to_json())
    assert [base64.b64decode(h) for h in doc["inclusion_proof"]] == list(bundle.inclusion_proof)
