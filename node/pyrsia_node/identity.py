"""Node identity: the Ed25519 key that signs everything a node says, and its node id.

The node id is the lowercase hex SHA-256 of the raw 32-byte public key, so anyone holding
a public key can recompute the id and nobody can claim an id without the key. The key is
persisted in ``<data_dir>/keys/node.key`` (PKCS#8 PEM, mode 0600) and reused on restart.

This module never logs or returns private key material except through ``private_pem``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import ed25519_zebra
import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = Path("keys") / "node.key"


class IdentityError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key."""


def node_id_for(public_key: bytes) -> str:
    """The node id for a raw Ed25519 public key."""
    if len(public_key) != 32:
        raise IdentityError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()


_P = 2**255 - 19
_Y_MASK = (1 << 255) - 1


def _small_order_ys() -> frozenset[int]:
    """The y coordinates of Ed25519's eight points of order dividing 8.

    y = 1 (the identity, order 1), y = -1 (order 2), y = 0 (order 4), and the points of
    order 8, whose doubles have y = 0: with a = -1 the double of (x, y) has
    y' = (x^2 + y^2) / (2 - y^2 + x^2), so x^2 = -y^2, which on the curve gives
    d*y^4 + 2*y^2 - 1 = 0, y^2 = (-1 +- sqrt(1 + d)) / d, and y and -y for the square
    root that exists."""
    d = -121665 * pow(121666, -1, _P) % _P
    sqrt_m1 = pow(2, (_P - 1) // 4, _P)

    def sqrt(a: int) -> int | None:  # p = 5 (mod 8): Atkin's candidates
        root = pow(a, (_P + 3) // 8, _P)
        for candidate in (root, root * sqrt_m1 % _P):
            if candidate * candidate % _P == a % _P:
                return candidate
        return None

    ys = {0, 1, _P - 1}
    root_1_plus_d = sqrt(1 + d)
    assert root_1_plus_d is not None
    for sign in (1, -1):
        y = sqrt((-1 + sign * root_1_plus_d) * pow(d, -1, _P))
        if y is not None:
            ys |= {y, _P - y}
    assert len(ys) == 5
    return frozenset(ys)


_SMALL_ORDER_YS = _small_order_ys()


@functools.lru_cache(maxsize=4096)
def _prime_order_key(public_key: bytes) -> bool:
    """The key is a canonical encoding of a point of the prime-order subgroup, not the
    identity: what every honestly generated key is (checked once per key)."""
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(public_key))


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.

    Every authority verifies every record's attestation, so this is the node's hottest
    primitive. ed25519-zebra takes 38 us per call on the bench machine against 55 us for
    libsodium (PyNaCl) and 104 us for ``cryptography``'s OpenSSL. It applies ZIP-215's
    rules (the cofactored equation, non-canonical point encodings accepted); the checks
    in front of it narrow them to libsodium's strict ones, so that every signature one
    accepts the other accepts too, but one:

    * s must be below the group order (ZIP-215 already requires it): no malleability;
    * R must be a canonical encoding of a point that is not of small order, as libsodium
      requires;
    * the key must encode a point of the prime-order subgroup (checked once per key with
      libsodium); any other key is verified by libsodium itself, which refuses small-order
      and non-canonical keys, so no key can sign what several keys would accept.

    The one difference left: a signer can make its R the sum of a proper point and a
    point of order 8; libsodium's cofactorless equation refuses that signature and the
    cofactored one accepts it. Only the key's holder can do this (it forges nothing), and
    every pyrsia node applies the same rule, so nodes never disagree on a signature."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    public_key, signature, message = bytes(public_key), bytes(signature), bytes(message)
    if not _prime_order_key(public_key):
        try:
            nacl.signing.VerifyKey(public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
            return False
        return True
    r_y = int.from_bytes(signature[:32], "little") & _Y_MASK
    if r_y >= _P or r_y in _SMALL_ORDER_YS:
        return False
    return bool(ed25519_zebra.ed_verify(signature, message, public_key))


@dataclass(frozen=True, slots=True)
class Identity:
    """An Ed25519 signing key with its derived node id."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> Identity:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except ValueError as exc:
            raise IdentityError(f"not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"expected an Ed25519 key, got {type(key).__name__}")
        return cls(key)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the key atomically with mode 0600."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.private_pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def load_or_create(data_dir: Path) -> Identity:
    """The node's identity from ``data_dir``; a new key is generated and saved on first start."""
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            return Identity.from_pem(path.read_bytes())
        except OSError as exc:
            raise IdentityError(f"cannot read node key {path}: {exc}") from exc
    identity = Identity.generate()
    identity.save(path)
    return identity
