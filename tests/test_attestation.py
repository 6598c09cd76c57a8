"""DSSE/in-toto attestations and the threshold-of-matching-attestations rule."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrsia_node.attestation import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    AcquiredImage,
    Artifact,
    Attestation,
    Envelope,
    InvalidSignature,
    MalformedEnvelope,
    MalformedStatement,
    UnknownAuthority,
    UnsupportedPayloadType,
    attest,
    decide,
    pae,
    parse_statement,
    unanimous,
    verify,
)
from pyrsia_node.identity import Identity

NOW = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image(seed: bytes = b"a", tag: str = "1.0") -> AcquiredImage:
    blobs = tuple(
        sorted(
            (
                Artifact(digest_of(seed + bytes([i])), 10 + i, "application/octet-stream")
                for i in range(3)
            ),
            key=lambda a: a.digest,
        )
    )
    return AcquiredImage(
        "docker.io",
        "library/alpine",
        tag,
        Artifact(digest_of(b"m" + seed), 500, MANIFEST),
        (),
        blobs,
    )


@pytest.fixture
def authorities() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def validators(ids: list[Identity]) -> dict[str, bytes]:
    return {i.node_id: i.public_key for i in ids}


def test_pae_matches_the_dsse_specification_example() -> None:
    # The worked example of the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_envelope_round_trips_and_verifies(authorities: list[Identity]) -> None:
    attestation, envelope = attest(
        image(), "http://up/v2/library/alpine/manifests/1.0", NOW, authorities[0]
    )
    parsed = Envelope.from_json(envelope.to_json())
    assert parsed == envelope
    assert verify(parsed, validators(authorities)) == attestation
    assert attestation.time == "2024-05-01T12:00:00Z"


def test_envelope_json_is_canonical_dsse(authorities: list[Identity]) -> None:
    _, envelope = attest(image(), "http://up/x", NOW, authorities[0])
    raw = envelope.to_json()
    doc = json.loads(raw)
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["payloadType"] == PAYLOAD_TYPE
    assert doc["signatures"][0]["keyid"] == authorities[0].node_id
    statement = json.loads(base64.b64decode(doc["payload"]))
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["predicate"]["source"] == "http://up/x"
    assert statement["predicate"]["authority"] == authorities[0].node_id


def test_statement_subjects_are_the_manifest_and_every_blob(authorities: list[Identity]) -> None:
    img = image()
    _, envelope = attest(img, "http://up/x", NOW, authorities[0])
    subjects = json.loads(envelope.payload)["subject"]
    assert {"sha256:" + s["digest"]["sha256"] for s in subjects} == {
        img.root.digest,
        *(b.digest for b in img.blobs),
    }
    assert all(s["name"].startswith("docker.io/library/alpine@sha256:") for s in subjects)


def test_altered_payload_fails_signature_check(authorities: list[Identity]) -> None:
    _, envelope = attest(image(), "http://up/x", NOW, authorities[0])
    forged = dataclasses.replace(envelope, payload=envelope.payload.replace(b"1.0", b"6.6"))
    with pytest.raises(InvalidSignature, match="does not verify"):
        verify(forged, validators(authorities))


def test_signature_over_other_payload_type_is_rejected(authorities: list[Identity]) -> None:
    _, envelope = attest(image(), "http://up/x", NOW, authorities[0])
    with pytest.raises(UnsupportedPayloadType):
        verify(dataclasses.replace(envelope, payload_type="text/plain"), validators(authorities))


def test_unknown_signer_is_rejected(authorities: list[Identity]) -> None:
    _, envelope = attest(image(), "http://up/x", NOW, Identity.generate())
    with pytest.raises(UnknownAuthority, match="not an authority"):
        verify(envelope, validators(authorities))


def test_statement_whose_subjects_disagree_with_predicate_is_rejected(
    authorities: list[Identity],
) -> None:
    signer = authorities[0]
    attestation, _ = attest(image(), "http://up/x", NOW, signer)
    statement = attestation.statement()
    statement["subject"].pop()
    payload = json.dumps(statement).encode()
    envelope = Envelope(
        PAYLOAD_TYPE, payload, signer.node_id, signer.sign(pae(PAYLOAD_TYPE, payload))
    )
    with pytest.raises(MalformedStatement, match="subject digests differ"):
        verify(envelope, validators(authorities))


def test_authority_cannot_attest_in_anothers_name(authorities: list[Identity]) -> None:
    attestation, _ = attest(image(), "http://up/x", NOW, authorities[1])
    payload = attestation.payload()
    signer = authorities[0]
    envelope = Envelope(
        PAYLOAD_TYPE, payload, signer.node_id, signer.sign(pae(PAYLOAD_TYPE, payload))
    )
    with pytest.raises(MalformedStatement, match="can only attest for itself"):
        verify(envelope, validators(authorities))


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"payload":"eA==","payloadType":"x","signatures":[]}',
        b'{"payload":"%%%","payloadType":"x","signatures":[{"keyid":"k","sig":"eA=="}]}',
    ],
)
def test_malformed_envelopes_are_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedEnvelope):
        Envelope.from_json(raw)


@given(st.binary(max_size=200))
def test_envelope_parser_never_raises_anything_but_malformed(raw: bytes) -> None:
    with contextlib.suppress(MalformedEnvelope):
        Envelope.from_json(raw)


def test_quorum_of_matching_attestations_commits(authorities: list[Identity]) -> None:
    img = image()
    envelopes = [attest(img, "http://up/x", NOW, a)[1] for a in authorities[:3]]
    decision = decide(envelopes, validators(authorities), threshold=3)
    assert decision.committed == img
    assert decision.supporters == tuple(sorted(a.node_id for a in authorities[:3]))
    assert decision.mismatches == ()


def test_below_threshold_nothing_commits(authorities: list[Identity]) -> None:
    img = image()
    envelopes = [attest(img, "http://up/x", NOW, a)[1] for a in authorities[:2]]
    decision = decide(envelopes, validators(authorities), threshold=3)
    assert decision.committed is None
    assert decision.leading == img
    assert "2 matching attestation(s), 3 required" in decision.report()


def test_tampered_authority_is_reported_while_the_others_commit(
    authorities: list[Identity],
) -> None:
    good, bad = image(b"a"), image(b"evil")
    envelopes = [attest(good, "http://up/x", NOW, a)[1] for a in authorities[:3]]
    envelopes.append(attest(bad, "http://tampered/x", NOW, authorities[3])[1])
    decision = decide(envelopes, validators(authorities), threshold=3)
    assert decision.committed == good
    [mismatch] = decision.mismatches
    assert mismatch.authority == authorities[3].node_id
    assert mismatch.saw == bad
    assert bad.root.digest in decision.report()


def test_split_authorities_commit_nothing_and_report_each_side(
    authorities: list[Identity],
) -> None:
    a, b = image(b"a"), image(b"b")
    envelopes = [attest(a, "u", NOW, x)[1] for x in authorities[:2]]
    envelopes += [attest(b, "u", NOW, x)[1] for x in authorities[2:]]
    decision = decide(envelopes, validators(authorities), threshold=3)
    assert decision.committed is None
    assert len(decision.mismatches) == 2


def test_one_authority_counts_once(authorities: list[Identity]) -> None:
    img = image()
    envelopes = [attest(img, "u", NOW, authorities[0])[1]] * 3
    assert decide(envelopes, validators(authorities), threshold=2).committed is None


def test_equivocating_authority_counts_for_nothing(authorities: list[Identity]) -> None:
    a, b = image(b"a"), image(b"b")
    envelopes = [attest(a, "u", NOW, authorities[0])[1], attest(b, "u", NOW, authorities[0])[1]]
    envelopes.append(attest(a, "u", NOW, authorities[1])[1])
    decision = decide(envelopes, validators(authorities), threshold=2)
    assert decision.committed is None
    assert decision.equivocations == (authorities[0].node_id,)


def test_forged_envelopes_are_listed_not_counted(authorities: list[Identity]) -> None:
    img = image()
    outsider = Identity.generate()
    envelopes = [attest(img, "u", NOW, a)[1] for a in authorities[:2]]
    envelopes.append(attest(img, "u", NOW, outsider)[1])
    decision = decide(envelopes, validators(authorities), threshold=3)
    assert decision.committed is None
    assert outsider.node_id in decision.rejected


def test_different_source_urls_still_match(authorities: list[Identity]) -> None:
    img = image()
    envelopes = [
        attest(img, f"http://mirror-{i}/v2/x", NOW + dt.timedelta(seconds=i), a)[1]
        for i, a in enumerate(authorities)
    ]
    assert decide(envelopes, validators(authorities), threshold=4).committed == img


def test_a_parsed_statement_is_reused_and_a_malformed_one_fails_every_time() -> None:
    key = Identity.generate()
    attestation, envelope = attest(image(), "https://registry-1.docker.io", NOW, key)
    again = bytes(bytearray(envelope.payload))  # equal bytes, another object
    assert parse_statement(envelope.payload) == attestation
    assert parse_statement(again) is parse_statement(envelope.payload)
    broken = envelope.payload.replace(PREDICATE_TYPE.encode(), b"https://example.test/other")
    for _ in range(2):
        with pytest.raises(MalformedStatement):
            parse_statement(broken)


def test_a_statement_is_read_as_json_reads_its_bytes() -> None:
    # parse_statement decodes UTF-8 itself when json.detect_encoding would choose UTF-8.
    key = Identity.generate()
    attestation, envelope = attest(image(), "https://registry-1.docker.io", NOW, key)
    text = envelope.payload.decode()
    for encoded in (text.encode("utf-16"), text.encode("utf-8-sig"), text.encode("utf-32")):
        assert parse_statement(encoded) == attestation


_POOL_KEYS = [Identity.generate() for _ in range(3)]
_OUTSIDER = Identity.generate()
_POOL = [
    *(attest(image(b"a"), "u", NOW, key)[1] for key in _POOL_KEYS),
    *(attest(image(b"b"), "u", NOW, key)[1] for key in _POOL_KEYS),
    attest(image(b"a"), "v", NOW + dt.timedelta(seconds=1), _POOL_KEYS[0])[1],
    attest(image(b"a"), "u", NOW, _OUTSIDER)[1],
    dataclasses.replace(attest(image(b"a"), "u", NOW, _POOL_KEYS[1])[1], signature=bytes(64)),
]


@given(st.lists(st.sampled_from(range(len(_POOL))), max_size=6), st.integers(1, 4))
def test_unanimous_commits_exactly_what_decide_commits_without_dissent(
    picks: list[int], threshold: int
) -> None:
    envelopes = [_POOL[i] for i in picks]
    decision = decide(envelopes, validators(_POOL_KEYS), threshold)
    clean = not (decision.rejected or decision.mismatches or decision.equivocations)
    expected = decision.committed if clean else None
    assert unanimous(envelopes, validators(_POOL_KEYS), threshold) == expected


def _statement_with(change: object) -> bytes:
    statement = Attestation(image(), "http://up/x", "2024-05-01T12:00:00Z", "ab" * 32).statement()
    change(statement)  # type: ignore[operator]
    return json.dumps(statement).encode()


def _set_path(path: tuple[object, ...], value: object) -> object:
    def change(statement: dict[str, object]) -> None:
        target: object = statement
        for key in path[:-1]:
            target = target[key]  # type: ignore[index]
        target[path[-1]] = value  # type: ignore[index]

    return change


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("predicate", "authority"), "", r"predicate\.authority: expected non-empty text"),
        (("predicate", "authority"), "not-hex", r"predicate\.authority: expected a node id"),
        (("predicate", "registry"), 7, r"predicate\.registry: expected non-empty text"),
        (("predicate", "tag"), None, r"predicate\.tag: expected non-empty text"),
        (("predicate", "source"), "", r"predicate\.source: expected non-empty text"),
        (("predicate", "time"), [], r"predicate\.time: expected non-empty text"),
        (("predicate", "root"), "x", r"predicate\.root: expected an object"),
        (("predicate", "root", "size"), -1, r"negative size -1"),
        (("predicate", "root", "size"), True, r"predicate\.root\.size: expected an integer"),
        (("predicate", "root", "mediaType"), 3, r"predicate\.root\.mediaType: expected text"),
        (("predicate", "root", "digest"), "sha256:AB", r"predicate\.root\.digest: expected"),
        (("predicate", "blobs", 1, "digest"), "md5:x", r"predicate\.blobs\[1\]\.digest"),
        (("predicate", "blobs", 2), 5, r"predicate\.blobs\[2\]: expected an object"),
        (("subject", 0, "digest"), {"sha512": "ab"}, r"subject\[0\]: expected a sha256"),
        (("subject", 1), "x", r"subject\[1\]: expected a sha256"),
        (("subject", 2, "digest", "sha256"), "AB" * 32, r"subject\[2\]: expected"),
        (("subject", 3, "digest", "sha256"), "ab" * 32, "subject digests differ"),
    ],
)
def test_each_statement_field_is_checked_with_its_location(
    path: tuple[object, ...], value: object, message: str
) -> None:
    assert parse_statement(_statement_with(lambda s: None)).image == image()
    with pytest.raises(MalformedStatement, match=message):
        parse_statement(_statement_with(_set_path(path, value)))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**64) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=9), inner),
    max_leaves=6,
)
_PATHS = st.sampled_from(
    [
        ("predicate", key)
        for key in ("authority", "registry", "repository", "tag", "source", "time", "root")
    ]
    + [("predicate", "root", key) for key in ("digest", "size", "mediaType")]
    + [("predicate", "blobs", 0), ("predicate", "manifests"), ("subject",)]
    + [("subject", 0), ("subject", 0, "digest"), ("subject", 0, "digest", "sha256")]
)


@given(_PATHS, _JSON)
def test_a_statement_with_any_field_replaced_parses_or_is_malformed(
    path: tuple[object, ...], value: object
) -> None:
    """Any other exception, or an image whose digests its subjects do not name, is a bug."""
    try:
        parsed = parse_statement(_statement_with(_set_path(path, value)))
    except MalformedStatement:
        return
    subjects = json.loads(_statement_with(_set_path(path, value)))["subject"]
    assert {"sha256:" + s["digest"]["sha256"] for s in subjects} == parsed.image.digests
    assert all(isinstance(a.size, int) and a.size >= 0 for a in parsed.image.artifacts)
