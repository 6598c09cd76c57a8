import stat
from pathlib import Path

import pytest
from pyrsia_node.identity import (
    KEY_FILE,
    Identity,
    IdentityError,
    load_or_create,
    node_id_for,
    verify_signature,
)


def test_identity_is_created_once_and_reused(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    second = load_or_create(tmp_path)
    assert first.node_id == second.node_id
    assert first.public_key == second.public_key


def test_key_file_is_private(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_node_id_is_sha256_of_public_key(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path)
    assert identity.node_id == node_id_for(identity.public_key)
    assert len(identity.node_id) == 64


def test_signature_verifies_only_for_signed_message() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"message")
    assert verify_signature(identity.public_key, signature, b"message")
    assert not verify_signature(identity.public_key, signature, b"other")
    assert not verify_signature(Identity.generate().public_key, signature, b"message")


def test_corrupt_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).parent.mkdir(parents=True)
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="PEM"):
        load_or_create(tmp_path)
