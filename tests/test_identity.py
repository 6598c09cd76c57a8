import hashlib
import os
import stat
from pathlib import Path

import ed25519_zebra
import nacl.bindings
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_node.identity import _SMALL_ORDER_YS as SMALL_ORDER_YS
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


# Ed25519 arithmetic for crafting signatures no honest signer makes (RFC 8032 notation:
# B the base point, L the group order, signature (R, s) valid when sB = R + hA, h the
# SHA-512 of R || A || M reduced mod L; "cofactored" checks 8sB = 8R + 8hA instead).
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, -1, P) % P


def libsodium_accepts(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


def scalar(value: int) -> bytes:
    return (value % L).to_bytes(32, "little")


def base_times(value: int) -> bytes:
    return bytes(nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(scalar(value)))


def challenge(r: bytes, public_key: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + public_key + message).digest(), "little") % L


def sign_with(a: int, r_point: bytes, r: int, message: bytes, public_key: bytes) -> bytes:
    """(R, s) with s = r + h*a for the R given (whatever R is, sB - hA = rB)."""
    return r_point + scalar(r + challenge(r_point, public_key, message) * a)


def random_scalar() -> int:
    return int.from_bytes(os.urandom(64), "little") % L


def encode_y(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


ORDER_8 = encode_y(next(y for y in SMALL_ORDER_YS if y not in (0, 1, P - 1)))


def test_the_small_order_list_holds_the_eight_points_of_order_dividing_8() -> None:
    def x_of(y: int) -> int | None:  # a point's x, from -x^2 + y^2 = 1 + d x^2 y^2
        x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
        for x in (pow(x2, (P + 3) // 8, P), pow(x2, (P + 3) // 8, P) * pow(2, (P - 1) // 4, P)):
            if x * x % P == x2:
                return x % P
        return None

    def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        (x1, y1), (x2, y2) = a, b
        t = D * x1 * x2 * y1 * y2
        x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, P) % P
        return x3, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P

    points = set()
    for y in SMALL_ORDER_YS:
        x = x_of(y)
        assert x is not None, y
        points |= {(x, y), (-x % P, y)}
        point = (x, y)
        for _ in range(3):
            point = add(point, point)
        assert point == (0, 1), f"8 * (x, {y}) is not the identity"
        assert not nacl.bindings.crypto_core_ed25519_is_valid_point(encode_y(y))
    assert len(points) == 8  # all of them: the torsion subgroup has order 8


@settings(max_examples=200, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=300),
    flip=st.one_of(st.none(), st.integers(0, 64 * 8 - 1)),
    flip_key=st.one_of(st.none(), st.integers(0, 32 * 8 - 1)),
)
def test_signatures_are_judged_as_libsodium_judges_them(
    seed: bytes, message: bytes, flip: int | None, flip_key: int | None
) -> None:
    key = nacl.signing.SigningKey(seed)
    public_key, signature = bytes(key.verify_key), key.sign(message).signature
    if flip is not None:
        signature = bytearray(signature)
        signature[flip // 8] ^= 1 << flip % 8
    if flip_key is not None:
        public_key = bytearray(public_key)
        public_key[flip_key // 8] ^= 1 << flip_key % 8
    expected = libsodium_accepts(bytes(public_key), bytes(signature), message)
    assert verify_signature(bytes(public_key), bytes(signature), message) is expected
    assert expected is (flip is None and flip_key is None)


def test_a_non_canonical_s_is_refused() -> None:
    a = random_scalar()
    public_key, r = base_times(a), random_scalar()
    signature = sign_with(a, base_times(r), r, b"m", public_key)
    assert verify_signature(public_key, signature, b"m")
    s = int.from_bytes(signature[32:], "little")
    s_plus_l = signature[:32] + (s + L).to_bytes(32, "little")
    assert not libsodium_accepts(public_key, s_plus_l, b"m")
    assert not verify_signature(public_key, s_plus_l, b"m")


@pytest.mark.parametrize("y", [*sorted(SMALL_ORDER_YS), P, P + 1], ids=str)
@pytest.mark.parametrize("sign", [0, 1])
def test_a_small_order_or_non_canonical_r_is_refused_though_zip215_accepts_it(
    y: int, sign: int
) -> None:
    """R = T of small order, s = h*a: sB - hA - R = -T, which the cofactored equation
    ignores; libsodium refuses such an R, and so must we (without the check, ed25519-zebra
    accepts: the test would fail)."""
    a = random_scalar()
    public_key, r_point = base_times(a), encode_y(y, sign)
    signature = r_point + scalar(challenge(r_point, public_key, b"m") * a)
    if y != P or sign == 0:  # (y = p, negative) decodes to no point at all
        assert ed25519_zebra.ed_verify(signature, b"m", public_key)
    assert not libsodium_accepts(public_key, signature, b"m")
    assert not verify_signature(public_key, signature, b"m")


def test_a_key_outside_the_prime_order_group_is_judged_by_libsodium() -> None:
    """A key A' = A + T (T of order 8): the cofactorless equation holds only when h is a
    multiple of 8, the cofactored one always; we must answer as libsodium does."""
    a = random_scalar()
    public_key = bytes(nacl.bindings.crypto_core_ed25519_add(base_times(a), ORDER_8))
    outcomes = []
    for i in range(80):
        message, r = b"m%d" % i, random_scalar()
        signature = sign_with(a, base_times(r), r, message, public_key)
        expected = libsodium_accepts(public_key, signature, message)
        assert verify_signature(public_key, signature, message) is expected
        outcomes.append(expected)
    assert set(outcomes) == {True, False}  # both answers occurred, so both were compared
    r = random_scalar()
    for y in SMALL_ORDER_YS:  # a small-order key: sB - hA - rB is of small order for any s = r
        assert ed25519_zebra.ed_verify(base_times(r) + scalar(r), b"m", encode_y(y))
        assert not verify_signature(encode_y(y), base_times(r) + scalar(r), b"m")


def test_the_one_documented_difference_an_r_with_an_order_8_part() -> None:
    """R = rB + T: only the key's holder can make it; libsodium refuses it, ZIP-215
    accepts it (identity.verify_signature's docstring)."""
    a = random_scalar()
    public_key, r = base_times(a), random_scalar()
    r_point = bytes(nacl.bindings.crypto_core_ed25519_add(base_times(r), ORDER_8))
    signature = sign_with(a, r_point, r, b"m", public_key)
    assert not libsodium_accepts(public_key, signature, b"m")
    assert verify_signature(public_key, signature, b"m")
