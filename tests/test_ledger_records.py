"""Ledger records: canonical encoding round trips and rejection of non-canonical bytes."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    GovernanceAction,
    GovernanceRecord,
    GovernanceSignatureError,
    PackageType,
    RecordError,
    check_record,
    decode_record,
    docker_package_id,
    maven_package_id,
    package_id_of,
)


def artifact_record(
    package_id: str = "docker.io/library/alpine:3.19", n: int = 2
) -> ArtifactRecord:
    envelope = DsseEnvelope(
        IN_TOTO_PAYLOAD_TYPE, b'{"_type":"statement"}', (("node-a", b"s" * 64),)
    )
    return ArtifactRecord(
        PackageType.DOCKER,
        package_id,
        tuple(
            Artifact(f"sha256:{i:064x}", 1000 + i, "application/vnd.oci.image.layer.v1.tar+gzip")
            for i in range(n)
        ),
        (envelope,),
    )


GOVERNANCE = Identity.generate()
AUTHORITY = Identity.generate()


def governance_record(action: GovernanceAction = GovernanceAction.ADD) -> GovernanceRecord:
    addresses = ("10.0.0.5:44000", "10.0.0.5:7888", "10.0.0.5:9090")
    return GovernanceRecord.create(
        GOVERNANCE,
        "pyrsia-test",
        7,
        action,
        "authority-4",
        AUTHORITY.public_key,
        *(addresses if action is GovernanceAction.ADD else ("", "", "")),
    )


def test_artifact_record_encoding_starts_with_version_and_kind() -> None:
    data = artifact_record().encode()
    assert data[:3] == b"\x01\x01\x01"


def test_artifact_record_round_trips() -> None:
    record = artifact_record()
    assert decode_record(record.encode()) == record
    assert ArtifactRecord.decode(record.encode()) == record


def test_governance_record_round_trips_and_verifies() -> None:
    for action in GovernanceAction:
        record = governance_record(action)
        assert GovernanceRecord.decode(record.encode()) == record
        record.verify(GOVERNANCE.public_key, "pyrsia-test")


def test_governance_record_signed_by_another_key_is_rejected() -> None:
    with pytest.raises(GovernanceSignatureError, match="not signed"):
        governance_record().verify(AUTHORITY.public_key, "pyrsia-test")


def test_governance_record_for_another_chain_is_rejected() -> None:
    with pytest.raises(GovernanceSignatureError, match="chain"):
        governance_record().verify(GOVERNANCE.public_key, "other-chain")


def test_altered_governance_record_no_longer_verifies() -> None:
    data = bytearray(governance_record().encode())
    data[20] ^= 1
    with pytest.raises(RecordError):
        GovernanceRecord.decode(bytes(data)).verify(GOVERNANCE.public_key, "pyrsia-test")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x02" + b[1:], "version"),
        (lambda b: b[:1] + b"\x09" + b[2:], "kind"),
        (lambda b: b[:2] + b"\x07" + b[2:], "package type"),
        (lambda b: b + b"\x00", "unexpected bytes"),
        (lambda b: b[:-1], "ends too early"),
        (lambda b: b"", "ends too early"),
    ],
)
def test_non_canonical_bytes_are_rejected(mutate: object, message: str) -> None:
    data = artifact_record().encode()
    with pytest.raises(RecordError, match=message):
        decode_record(mutate(data))  # type: ignore[operator]


def test_duplicate_digests_are_rejected() -> None:
    record = artifact_record()
    with pytest.raises(RecordError, match="twice"):
        ArtifactRecord(
            record.package_type, record.package_id, record.artifacts * 2, record.attestations
        )


def test_records_need_artifacts_and_attestations() -> None:
    record = artifact_record()
    with pytest.raises(RecordError, match="artifact"):
        ArtifactRecord(PackageType.DOCKER, record.package_id, (), record.attestations)
    with pytest.raises(RecordError, match="attestations"):
        ArtifactRecord(PackageType.DOCKER, record.package_id, record.artifacts, ())


def test_envelope_must_carry_in_toto_payload() -> None:
    with pytest.raises(RecordError, match="payloadType"):
        DsseEnvelope("text/plain", b"x", (("k", b"s"),))


def test_envelope_json_round_trips_dsse_layout() -> None:
    envelope = artifact_record().attestations[0]
    doc = json.loads(envelope.to_json())
    assert doc["payloadType"] == IN_TOTO_PAYLOAD_TYPE
    assert base64.b64decode(doc["payload"]) == envelope.payload
    assert DsseEnvelope.from_json(envelope.to_json()) == envelope
    with pytest.raises(RecordError, match="DSSE"):
        DsseEnvelope.from_json(b'{"payload": 1}')


def test_remove_record_carries_no_addresses() -> None:
    record = governance_record(GovernanceAction.REMOVE)
    with pytest.raises(RecordError, match="no addresses"):
        GovernanceRecord(
            record.chain_id,
            record.sequence,
            record.action,
            record.name,
            record.public_key,
            "x:1",
            "",
            "",
            record.signature,
        )


@pytest.mark.parametrize(
    ("image", "package_id"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("ghcr.io/org/app:v1", "ghcr.io/org/app:v1"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        (f"alpine@sha256:{'a' * 64}", f"docker.io/library/alpine@sha256:{'a' * 64}"),
    ],
)
def test_docker_package_ids_are_normalized(image: str, package_id: str) -> None:
    assert docker_package_id(image) == package_id


def test_malformed_package_ids_are_rejected() -> None:
    with pytest.raises(RecordError):
        docker_package_id("Not An Image")
    with pytest.raises(RecordError, match="Maven"):
        maven_package_id("org.example:lib")
    with pytest.raises(RecordError, match="docker package id"):
        artifact_record(package_id="alpine")


text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**64 - 1), text), min_size=1, max_size=5),
    st.lists(
        st.tuples(
            st.binary(max_size=100),
            st.lists(
                st.tuples(text, st.binary(max_size=80)),
                min_size=1,
                max_size=3,
                unique_by=lambda s: s[0],
            ),
        ),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(["org.example:lib:1.0", "com.acme:x-y_z:2.0.0-RC1"]),
)
def test_any_valid_record_round_trips(
    artifacts: list[tuple[int, str]],
    envelopes: list[tuple[bytes, list[tuple[str, bytes]]]],
    package_id: str,
) -> None:
    try:
        record = ArtifactRecord(
            PackageType.MAVEN,
            package_id,
            tuple(Artifact(f"sha256:{i:064x}", size, mt) for i, (size, mt) in enumerate(artifacts)),
            tuple(
                DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, payload, tuple(sigs))
                for payload, sigs in envelopes
            ),
        )
    except RecordError as exc:
        assert "twice" in str(exc)
        return
    data = record.encode()
    assert decode_record(data) == record
    assert decode_record(data).encode() == data
    assert package_id_of(data) == package_id


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_accepts_only_canonical_bytes(data: st.DataObject) -> None:
    encoded = (
        governance_record().encode() if data.draw(st.booleans()) else artifact_record().encode()
    )
    position = data.draw(st.integers(0, len(encoded) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = encoded[:position] + bytes([value]) + encoded[position + 1 :]
    try:
        record = decode_record(mutated)
    except RecordError:
        return
    assert record.encode() == mutated


# check_record: the log's fast check accepts exactly what decode_record accepts ------------


def _str16(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def raw_artifact_record(
    package_type: int = 1,
    package_id: str = "docker.io/library/alpine:3.19",
    artifacts: tuple[tuple[str, int, str], ...] = ((f"sha256:{1:064x}", 5, "a/b"),),
    envelopes: tuple[tuple[str, bytes, tuple[tuple[str, bytes], ...]], ...] = (
        (IN_TOTO_PAYLOAD_TYPE, b"{}", (("k", b"s"),)),
    ),
) -> bytes:
    """Artifact record bytes written field by field, without the dataclasses' checks."""
    out = [bytes((1, 1, package_type)), _str16(package_id), struct.pack(">H", len(artifacts))]
    for digest, size, media_type in artifacts:
        out += [_str16(digest), struct.pack(">Q", size), _str16(media_type)]
    out.append(struct.pack(">H", len(envelopes)))
    for payload_type, payload, signatures in envelopes:
        out += [_str16(payload_type), struct.pack(">I", len(payload)), payload]
        out.append(struct.pack(">H", len(signatures)))
        for keyid, sig in signatures:
            out += [_str16(keyid), struct.pack(">H", len(sig)), sig]
    return b"".join(out)


def assert_check_agrees_with_decode(data: bytes) -> None:
    try:
        record = decode_record(data)
    except RecordError:
        with pytest.raises(RecordError):
            check_record(data)
        return
    expected = record.package_id if isinstance(record, ArtifactRecord) else None
    assert check_record(data) == expected
    assert package_id_of(data) == expected  # the header read of checked records


DIGEST = f"sha256:{1:064x}"
ENVELOPE = (IN_TOTO_PAYLOAD_TYPE, b"{}", (("k", b"s"),))


@pytest.mark.parametrize(
    "data",
    [
        raw_artifact_record(),
        raw_artifact_record(package_type=2, package_id="org.example:lib:1.0"),
        raw_artifact_record(package_type=3),
        raw_artifact_record(package_id="Docker.io/UPPER:1"),
        raw_artifact_record(package_type=2, package_id="only:two"),
        raw_artifact_record(package_id="docker.io/library/alpine:3.19\x07"),
        raw_artifact_record(artifacts=()),
        raw_artifact_record(artifacts=((DIGEST, 1, "a"), (DIGEST, 2, "b"))),
        raw_artifact_record(artifacts=(("sha256:XYZ", 1, "a"),)),
        raw_artifact_record(artifacts=((DIGEST, 1, "tab\there"),)),
        raw_artifact_record(envelopes=()),
        raw_artifact_record(envelopes=(ENVELOPE, ENVELOPE)),
        raw_artifact_record(envelopes=(("text/plain", b"{}", (("k", b"s"),)),)),
        raw_artifact_record(envelopes=((IN_TOTO_PAYLOAD_TYPE, b"{}", ()),)),
        raw_artifact_record(envelopes=((IN_TOTO_PAYLOAD_TYPE, b"{}", (("k", b"1"), ("k", b"2"))),)),
        raw_artifact_record(envelopes=((IN_TOTO_PAYLOAD_TYPE, b"{}", (("\x00", b"s"),)),)),
        raw_artifact_record(artifacts=((DIGEST, 1, "\xe9\u2603"),)),
        raw_artifact_record()[:-1],
        raw_artifact_record() + b"\x00",
        raw_artifact_record().replace(b"a/b", b"a\xffb"),
        governance_record().encode(),
        governance_record(GovernanceAction.REMOVE).encode(),
    ],
)
def test_check_record_agrees_with_decode_record_on_each_rule(data: bytes) -> None:
    assert_check_agrees_with_decode(data)


def test_check_record_returns_the_package_id() -> None:
    assert check_record(artifact_record().encode()) == "docker.io/library/alpine:3.19"
    assert check_record(governance_record().encode()) is None


RECORDS = [
    artifact_record().encode(),
    artifact_record(n=3).encode(),
    raw_artifact_record(
        package_type=2,
        package_id="org.example:lib:1.0",
        artifacts=((DIGEST, 7, "application/java-archive"), (f"sha256:{2:064x}", 8, "pom")),
        envelopes=(ENVELOPE, (IN_TOTO_PAYLOAD_TYPE, b"[1]", (("a", b"x"), ("b", b"y")))),
    ),
    governance_record().encode(),
]


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_check_record_agrees_with_decode_record_on_damaged_bytes(data: st.DataObject) -> None:
    """Flip, insert or delete a byte, or cut the tail, anywhere in a record."""
    encoded = bytearray(data.draw(st.sampled_from(RECORDS)))
    position = data.draw(st.integers(0, len(encoded) - 1))
    how = data.draw(st.sampled_from(["set", "insert", "delete", "cut"]))
    if how == "set":
        encoded[position] = data.draw(st.integers(0, 255))
    elif how == "insert":
        encoded.insert(position, data.draw(st.integers(0, 255)))
    elif how == "delete":
        del encoded[position]
    else:
        del encoded[position:]
    assert_check_agrees_with_decode(bytes(encoded))
