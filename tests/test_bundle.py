"""Offline proof bundles: a good bundle verifies; each kind of damage names its step."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.bundle import BundleError, GovernanceEntry, ProofBundle, verify_bundle
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote, cosign, origin_for
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    GovernanceAction,
    GovernanceRecord,
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


# Authorities replayed from the genesis and the bundle's governance records ----------------

GOVERNANCE = Identity.generate()
NEWCOMER = Identity.generate()
GENESIS = Genesis(
    chain_id="pyrsia-test",
    genesis_time="2026-01-01T00:00:00Z",
    governance_public_key=GOVERNANCE.public_key,
    authorities=tuple(
        Authority(f"authority-{i}", k.public_key, f"127.0.0.1:{1000 + i}", "")
        for i, k in enumerate(KEYS)
    ),
    ca_certificate="",
)
SIGNERS = {f"authority-{i}": k for i, k in enumerate([*KEYS, NEWCOMER])}


def governance(sequence: int, action: GovernanceAction, name: str, signer: Identity) -> bytes:
    key = SIGNERS[name].public_key if name in SIGNERS else Identity.generate().public_key
    address = "127.0.0.1:2000" if action is GovernanceAction.ADD else ""
    return GovernanceRecord.create(
        signer, "pyrsia-test", sequence, action, name, key, address
    ).encode()


def signed_by(log: TransparencyLog, names: list[str], keys: dict[str, Identity]) -> str:
    checkpoint = Checkpoint(origin_for("pyrsia-test"), log.size, log.root())
    note = SignedNote(checkpoint.body(), ())
    for name in names:
        note = cosign(note, name, keys[name])
    return note.format()


@pytest.fixture
def changed_log(tmp_path: Path) -> TransparencyLog:
    """authority-4 added at entry 3, authority-0 removed at entry 6: in force at size 9 are
    authority-1..4, quorum 3."""
    log = TransparencyLog(tmp_path / "changed")
    log.append([maven_record(i) for i in range(3)])
    log.append([governance(1, GovernanceAction.ADD, "authority-4", GOVERNANCE)])
    log.append([maven_record(i) for i in range(4, 6)])
    log.append([governance(2, GovernanceAction.REMOVE, "authority-0", GOVERNANCE)])
    log.append([maven_record(i) for i in range(7, 9)])
    return log


def test_a_bundle_after_an_add_and_a_remove_verifies_with_the_replayed_set(
    changed_log: TransparencyLog,
) -> None:
    note = signed_by(changed_log, ["authority-1", "authority-2", "authority-4"], SIGNERS)
    bundle = ProofBundle.from_log(changed_log, 7, AUTHORITIES, note)
    assert [g.index for g in bundle.governance] == [3, 6]
    verified = verify_bundle(ProofBundle.from_json(bundle.to_json()), genesis=GENESIS)
    assert verified.derived is not None
    assert verified.derived.applied == (3, 6)
    assert sorted(name for name, _ in verified.authorities) == [
        "authority-1", "authority-2", "authority-3", "authority-4"]  # fmt: skip
    assert verified.quorum == 3
    # The node claimed the genesis set: not used, and reported.
    assert verified.claimed_authorities_match is False
    # Pinning the genesis authorities alone (the old behaviour) cannot accept it.
    with pytest.raises(BundleError, match="QuorumNotReached"):
        verify_bundle(bundle, authorities=AUTHORITIES)


def test_forged_claimed_authorities_fail_against_the_replayed_set(
    changed_log: TransparencyLog,
) -> None:
    """A node that swaps in its own keys and signs a checkpoint with them convinces a
    verifier that trusts the bundle, never one holding the genesis."""
    mallory = {f"mallory-{i}": Identity.generate() for i in range(3)}
    note = signed_by(changed_log, list(mallory), mallory)
    claimed = tuple((name, key.public_key) for name, key in mallory.items())
    forged = ProofBundle.from_log(changed_log, 7, claimed, note)
    assert verify_bundle(forged).index == 7  # unpinned: consistent, not authentic
    with pytest.raises(BundleError) as info:
        verify_bundle(forged, genesis=GENESIS)
    assert info.value.step == "checkpoint"
    assert str(info.value) == (
        "checkpoint: QuorumNotReached: 0 of 4 authorities signed checkpoint size 9; a quorum "
        "needs 3; the authorities in force at size 9 are authority-1, authority-2, "
        "authority-3, authority-4 (genesis + 2 governance changes), not the mallory-0, "
        "mallory-1, mallory-2 the bundle claims"
    )


def test_a_governance_record_with_a_bad_signature_is_refused(tmp_path: Path) -> None:
    """An 'add' signed by anyone but the governance key changes nothing: the newcomer's
    signature does not count, so two genuine signatures of four stay below quorum."""
    with TransparencyLog(tmp_path) as log:
        log.append([maven_record(0)])
        log.append([governance(1, GovernanceAction.ADD, "authority-4", NEWCOMER)])
        note = signed_by(log, ["authority-1", "authority-2", "authority-4"], SIGNERS)
        bundle = ProofBundle.from_log(log, 0, AUTHORITIES, note)
    with pytest.raises(BundleError) as info:
        verify_bundle(bundle, genesis=GENESIS)
    assert "2 of 4 authorities signed" in str(info.value)
    assert str(info.value).endswith(
        "governance entry 1 refused: governance record #1 (add authority-4) is not signed "
        "by this network's governance key"
    )


def test_a_governance_record_not_in_the_checkpoint_fails_at_governance(
    changed_log: TransparencyLog,
) -> None:
    note = signed_by(changed_log, ["authority-1", "authority-2", "authority-4"], SIGNERS)
    bundle = ProofBundle.from_log(changed_log, 7, AUTHORITIES, note)
    swapped = governance(9, GovernanceAction.ADD, "authority-5", GOVERNANCE)
    entry = replace(bundle.governance[0], record=swapped)
    with pytest.raises(BundleError, match=r"^governance: the record given for entry 3 is not"):
        verify_bundle(replace(bundle, governance=(entry, *bundle.governance[1:])), genesis=GENESIS)


def test_an_artifact_record_offered_as_governance_fails_at_governance(
    changed_log: TransparencyLog,
) -> None:
    note = signed_by(changed_log, ["authority-1", "authority-2", "authority-4"], SIGNERS)
    bundle = ProofBundle.from_log(changed_log, 7, AUTHORITIES, note)
    artifact = GovernanceEntry(5, changed_log.entry(5), tuple(changed_log.inclusion_proof(5)))
    with pytest.raises(BundleError, match="entry 5 is not a governance record"):
        first, second = bundle.governance
        verify_bundle(replace(bundle, governance=(first, artifact, second)), genesis=GENESIS)


def test_a_version_1_bundle_is_still_read(bundle: ProofBundle) -> None:
    doc = json.loads(bundle.to_json())
    doc["format"] = "pyrsia-proof-bundle/v1"
    del doc["governance"]
    assert ProofBundle.from_json(json.dumps(doc).encode()) == bundle
