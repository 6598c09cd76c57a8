"""Checkpoints: C2SP signed-note format, key ids, cosigning and quorum verification."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_node.genesis import quorum
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.checkpoint import (
    Checkpoint,
    InvalidSignature,
    MalformedCheckpoint,
    MalformedNote,
    NoteSignature,
    OriginMismatch,
    QuorumNotReached,
    SignedNote,
    cosign,
    key_id,
    origin_for,
    sign,
    verifier_key,
    verify_checkpoint,
)

ROOT = hashlib.sha256(b"root").digest()
KEYS = [Identity.generate() for _ in range(4)]
AUTHORITIES = [(f"authority-{i}", k.public_key) for i, k in enumerate(KEYS)]
CHECKPOINT = Checkpoint(origin_for("pyrsia-test"), 42, ROOT)


def note_signed_by(*indexes: int, checkpoint: Checkpoint = CHECKPOINT) -> str:
    note = SignedNote(checkpoint.body(), ())
    for i in indexes:
        note = cosign(note, f"authority-{i}", KEYS[i])
    return note.format()


def test_body_is_origin_size_and_base64_root() -> None:
    expected = f"pyrsia.io/pyrsia-test\n42\n{base64.b64encode(ROOT).decode()}\n".encode()
    assert CHECKPOINT.body() == expected


def test_key_id_is_first_four_bytes_of_sha256_of_name_newline_type_key() -> None:
    key = KEYS[0].public_key
    digest = hashlib.sha256(b"authority-0\n\x01" + key).digest()
    assert key_id("authority-0", key) == digest[:4]
    assert verifier_key("authority-0", key).split("+")[1] == digest[:4].hex()


def test_golang_sumdb_note_verifier_key_id_matches() -> None:
    # The example verifier key in golang.org/x/mod/sumdb/note's documentation: the key id
    # it embeds must equal our computation from its name and public key.
    vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    name, hex_id, blob = vkey.split("+")
    raw = base64.b64decode(blob)
    assert raw[0] == 1
    assert key_id(name, raw[1:]).hex() == hex_id


def test_signed_note_round_trips_through_text() -> None:
    text = note_signed_by(0, 1, 2)
    note = SignedNote.parse(text)
    assert note.format() == text
    assert Checkpoint.parse(note.body) == CHECKPOINT
    assert [s.name for s in note.signatures] == ["authority-0", "authority-1", "authority-2"]
    assert text.split("\n\n")[1].startswith("\u2014 authority-0 ")


def test_checkpoint_with_extension_lines_round_trips() -> None:
    checkpoint = Checkpoint("o", 0, ROOT, ("ext one",))
    assert Checkpoint.parse(checkpoint.body()) == checkpoint


def test_quorum_of_signatures_verifies() -> None:
    assert quorum(4) == 3
    assert verify_checkpoint(note_signed_by(0, 1, 3), AUTHORITIES, 3) == CHECKPOINT


def test_below_quorum_is_rejected() -> None:
    with pytest.raises(QuorumNotReached, match="2 of 4 authorities"):
        verify_checkpoint(note_signed_by(0, 1), AUTHORITIES, 3)


def test_signatures_by_unknown_keys_do_not_count_but_are_accepted() -> None:
    strangers = [Identity.generate() for _ in range(3)]
    note = SignedNote.parse(note_signed_by(0, 1, 2))
    for i, key in enumerate(strangers):
        note = cosign(note, f"stranger-{i}", key)
    assert verify_checkpoint(note.format(), AUTHORITIES, 3) == CHECKPOINT
    only_strangers = SignedNote(CHECKPOINT.body(), note.signatures[3:])
    with pytest.raises(QuorumNotReached, match="0 of 4"):
        verify_checkpoint(only_strangers.format(), AUTHORITIES, 3)


def test_unknown_key_using_an_authority_name_does_not_count() -> None:
    impostor = Identity.generate()
    note = SignedNote.parse(note_signed_by(0, 1))
    note = note.with_signature(sign(CHECKPOINT, "authority-2", impostor))
    with pytest.raises(QuorumNotReached):
        verify_checkpoint(note.format(), AUTHORITIES, 3)


def test_same_authority_signing_twice_counts_once() -> None:
    note = SignedNote.parse(note_signed_by(0, 1))
    duplicate = NoteSignature("authority-0", key_id("authority-0", KEYS[0].public_key), b"")
    doubled = SignedNote(note.body, (*note.signatures, note.signatures[0]))
    assert duplicate.name == "authority-0"
    with pytest.raises(QuorumNotReached, match="2 of 4"):
        verify_checkpoint(doubled.format(), AUTHORITIES, 3)


def test_invalid_signature_by_known_key_is_rejected() -> None:
    other = Checkpoint(CHECKPOINT.origin, 43, ROOT)
    forged = SignedNote(CHECKPOINT.body(), (*SignedNote.parse(note_signed_by(0, 1)).signatures,))
    wrong = sign(other, "authority-2", KEYS[2])
    with pytest.raises(InvalidSignature, match="authority-2"):
        verify_checkpoint(forged.with_signature(wrong).format(), AUTHORITIES, 3)


def test_altered_body_fails_verification() -> None:
    text = note_signed_by(0, 1, 2).replace("\n42\n", "\n43\n")
    with pytest.raises(InvalidSignature):
        verify_checkpoint(text, AUTHORITIES, 3)


def test_wrong_origin_is_rejected() -> None:
    with pytest.raises(OriginMismatch, match=r"pyrsia\.io/other"):
        verify_checkpoint(note_signed_by(0, 1, 2), AUTHORITIES, 3, origin_for("other"))


@pytest.mark.parametrize(
    "text",
    [
        "pyrsia.io/x\n1\nAAAA\n",
        "no blank line\n\u2014 a AAAAAAAA\n",
        "o\n1\nAAAA\n\n- a AAAAAAAA\n",
        "o\n1\nAAAA\n\n\u2014 a AAAAAAAA",
        "o\n1\nAAAA\n\n\u2014 a AA\n",
        "o\r\n1\nAAAA\n\n\u2014 a AAAAAAAA\n",
        "o\n1\nAAAA\n\n\u2014 a+b AAAAAAAA\n",
    ],
)
def test_malformed_notes_are_rejected(text: str) -> None:
    with pytest.raises(MalformedNote):
        SignedNote.parse(text)


@pytest.mark.parametrize(
    "body",
    [
        b"o\n01\n" + base64.b64encode(ROOT) + b"\n",
        b"o\n-1\n" + base64.b64encode(ROOT) + b"\n",
        b"o\n1\n" + base64.b64encode(ROOT[:31]) + b"\n",
        b"o\n1\n" + base64.b64encode(ROOT),
        b"\n1\n" + base64.b64encode(ROOT) + b"\n",
        b"o\n1\n",
    ],
)
def test_malformed_checkpoint_bodies_are_rejected(body: bytes) -> None:
    with pytest.raises(MalformedCheckpoint):
        Checkpoint.parse(body)


@settings(max_examples=100, deadline=None)
@given(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30),
    st.integers(0, 2**63),
    st.binary(min_size=32, max_size=32),
    st.sets(st.integers(0, 3), min_size=1),
)
def test_any_checkpoint_signed_by_any_subset_round_trips(
    origin: str, size: int, root: bytes, signers: set[int]
) -> None:
    checkpoint = Checkpoint(origin, size, root)
    text = note_signed_by(*sorted(signers), checkpoint=checkpoint)
    assert SignedNote.parse(text).format() == text
    if len(signers) >= 3:
        assert verify_checkpoint(text, AUTHORITIES, 3) == checkpoint
    else:
        with pytest.raises(QuorumNotReached):
            verify_checkpoint(text, AUTHORITIES, 3)


def test_note_without_signatures_is_rejected() -> None:
    with pytest.raises(MalformedNote):
        SignedNote.parse(SignedNote(CHECKPOINT.body(), ()).format())
