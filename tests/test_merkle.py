"""RFC 9162 Merkle hashing, proofs and verifiers: known vectors and properties."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_node.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# RFC 6962 reference leaves and roots, as published by the certificate-transparency and
# transparency-dev/merkle test suites (testonly/constants.go).
LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    bytes(range(0x60, 0x70)),
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (index, size) -> path, from transparency-dev/merkle testonly/reference_test.go.
INCLUSION = {
    (0, 1): [],
    (0, 2): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
    (1, 2): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
# (size1, size2) -> proof, from transparency-dev/merkle proof/verify_test.go.
CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}

REFERENCE = MemoryTree([leaf_hash(d) for d in LEAVES])


def _tree(size: int) -> MemoryTree:
    return MemoryTree([leaf_hash(i.to_bytes(4, "big")) for i in range(size)])


BIG = _tree(300)
BIG_ROOTS = [BIG.root(n) for n in range(301)]


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert root_hash([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert EMPTY_ROOT.hex() == ROOTS[0]


def test_rfc6962_leaf_and_node_vectors() -> None:
    assert leaf_hash(b"").hex() == ROOTS[1]
    assert (
        leaf_hash(b"L123456").hex()
        == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert (
        node_hash(b"N123", b"N456").hex()
        == "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


@pytest.mark.parametrize("size", range(9))
def test_root_hash_matches_rfc6962_roots(size: int) -> None:
    leaves = [leaf_hash(d) for d in LEAVES[:size]]
    assert root_hash(leaves).hex() == ROOTS[size]
    assert REFERENCE.root(size).hex() == ROOTS[size]


@pytest.mark.parametrize(("index", "size"), sorted(INCLUSION))
def test_inclusion_proofs_match_published_vectors(index: int, size: int) -> None:
    expected = [bytes.fromhex(h) for h in INCLUSION[index, size]]
    assert inclusion_proof(REFERENCE, index, size) == expected
    verify_inclusion(leaf_hash(LEAVES[index]), index, size, expected, bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize(("size1", "size2"), sorted(CONSISTENCY))
def test_consistency_proofs_match_published_vectors(size1: int, size2: int) -> None:
    expected = [bytes.fromhex(h) for h in CONSISTENCY[size1, size2]]
    assert consistency_proof(REFERENCE, size1, size2) == expected
    verify_consistency(
        size1, size2, expected, bytes.fromhex(ROOTS[size1]), bytes.fromhex(ROOTS[size2])
    )


def test_every_inclusion_proof_up_to_300_verifies() -> None:
    for size in range(1, 301):
        root = BIG_ROOTS[size]
        for index in range(size):
            proof = inclusion_proof(BIG, index, size)
            verify_inclusion(BIG.subtree_hash(0, index), index, size, proof, root)


def test_every_consistency_proof_up_to_300_verifies() -> None:
    for size2 in range(301):
        for size1 in range(size2 + 1):
            proof = consistency_proof(BIG, size1, size2)
            verify_consistency(size1, size2, proof, BIG_ROOTS[size1], BIG_ROOTS[size2])


def test_root_from_stored_subtrees_equals_recomputed_root() -> None:
    for size in range(301):
        assert BIG_ROOTS[size] == root_hash([BIG.subtree_hash(0, i) for i in range(size)])


def _flip(proof: list[bytes], item: int, bit: int) -> list[bytes]:
    changed = bytearray(proof[item])
    changed[bit // 8] ^= 1 << (bit % 8)
    return [*proof[:item], bytes(changed), *proof[item + 1 :]]


index_and_size = st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n)))
sizes = st.integers(1, 299).flatmap(lambda n: st.tuples(st.integers(1, n), st.integers(n + 1, 300)))


@settings(max_examples=300, deadline=None)
@given(index_and_size, st.data())
def test_inclusion_proof_with_a_flipped_bit_fails(
    case: tuple[int, int], data: st.DataObject
) -> None:
    index, size = case
    proof = inclusion_proof(BIG, index, size)
    leaf, root = BIG.subtree_hash(0, index), BIG_ROOTS[size]
    target = data.draw(st.integers(0, len(proof) + 1))
    bit = data.draw(st.integers(0, 255))
    if target < len(proof):
        args = (leaf, index, size, _flip(proof, target, bit), root)
    elif target == len(proof):
        args = (_flip([leaf], 0, bit)[0], index, size, proof, root)
    else:
        args = (leaf, index, size, proof, _flip([root], 0, bit)[0])
    with pytest.raises(ProofError):
        verify_inclusion(*args)


@settings(max_examples=300, deadline=None)
@given(index_and_size, st.data())
def test_inclusion_proof_with_wrong_index_or_size_fails(
    case: tuple[int, int], data: st.DataObject
) -> None:
    index, size = case
    proof = inclusion_proof(BIG, index, size)
    leaf, root = BIG.subtree_hash(0, index), BIG_ROOTS[size]
    other_index = data.draw(st.integers(-1, 600).filter(lambda i: i != index))
    with pytest.raises(ProofError):
        verify_inclusion(leaf, other_index, size, proof, root)
    # A size with a different tree height changes the path's shape; sizes of the same
    # height may share it, so (as in transparency-dev/merkle) the probes double and halve.
    for other_size in (size * 2, size // 2):
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, other_size, proof, root)


@settings(max_examples=300, deadline=None)
@given(index_and_size, st.binary(min_size=32, max_size=32))
def test_truncated_or_extended_inclusion_proof_fails(case: tuple[int, int], extra: bytes) -> None:
    index, size = case
    proof = inclusion_proof(BIG, index, size)
    leaf, root = BIG.subtree_hash(0, index), BIG_ROOTS[size]
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, [*proof, extra], root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, [extra, *proof], root)
    if proof:
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, proof[:-1], root)
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, proof[1:], root)


@settings(max_examples=300, deadline=None)
@given(sizes, st.data())
def test_consistency_proof_with_a_flipped_bit_fails(
    case: tuple[int, int], data: st.DataObject
) -> None:
    size1, size2 = case
    proof = consistency_proof(BIG, size1, size2)
    root1, root2 = BIG_ROOTS[size1], BIG_ROOTS[size2]
    target = data.draw(st.integers(0, len(proof) + 1))
    bit = data.draw(st.integers(0, 255))
    if target < len(proof):
        args = (size1, size2, _flip(proof, target, bit), root1, root2)
    elif target == len(proof):
        args = (size1, size2, proof, _flip([root1], 0, bit)[0], root2)
    else:
        args = (size1, size2, proof, root1, _flip([root2], 0, bit)[0])
    with pytest.raises(ProofError):
        verify_consistency(*args)


@settings(max_examples=300, deadline=None)
@given(sizes)
def test_consistency_proof_with_wrong_sizes_fails(case: tuple[int, int]) -> None:
    size1, size2 = case
    proof = consistency_proof(BIG, size1, size2)
    root1, root2 = BIG_ROOTS[size1], BIG_ROOTS[size2]
    # Sizes of the same tree height may share a proof's shape, so (as in
    # transparency-dev/merkle) the probes are neighbours of size1 and a doubled or halved
    # size2.
    for other1 in {size1 - 1, size1 + 1, size1 * 2, size1 // 2} - {size1}:
        with pytest.raises(ProofError):
            verify_consistency(other1, size2, proof, root1, root2)
    for other2 in (size2 * 2, size2 // 2):
        with pytest.raises(ProofError):
            verify_consistency(size1, other2, proof, root1, root2)


@settings(max_examples=300, deadline=None)
@given(sizes, st.binary(min_size=32, max_size=32))
def test_truncated_or_extended_consistency_proof_fails(case: tuple[int, int], extra: bytes) -> None:
    size1, size2 = case
    proof = consistency_proof(BIG, size1, size2)
    root1, root2 = BIG_ROOTS[size1], BIG_ROOTS[size2]
    for bad in ([*proof, extra], [extra, *proof], proof[:-1], proof[1:]):
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, bad, root1, root2)


def test_trivial_consistency_cases() -> None:
    verify_consistency(0, 5, [], EMPTY_ROOT, BIG_ROOTS[5])
    verify_consistency(7, 7, [], BIG_ROOTS[7], BIG_ROOTS[7])
    with pytest.raises(ProofError, match="different root"):
        verify_consistency(7, 7, [], BIG_ROOTS[7], BIG_ROOTS[6])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(7, 7, [BIG_ROOTS[1]], BIG_ROOTS[7], BIG_ROOTS[7])
    with pytest.raises(ProofError, match="empty-tree"):
        verify_consistency(0, 5, [], BIG_ROOTS[1], BIG_ROOTS[5])
    with pytest.raises(ProofError, match="exceeds"):
        verify_consistency(6, 5, [], BIG_ROOTS[6], BIG_ROOTS[5])


@pytest.mark.parametrize(
    ("leaf", "root", "proof"),
    [
        (b"short", BIG_ROOTS[1], []),
        (BIG_ROOTS[1], b"", []),
        (BIG_ROOTS[1], BIG_ROOTS[1], [b""]),
    ],
)
def test_malformed_hash_lengths_are_rejected(leaf: bytes, root: bytes, proof: list[bytes]) -> None:
    with pytest.raises(ProofError, match="bytes"):
        verify_inclusion(leaf, 0, 1, proof, root)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (2, 1), (-1, 4)])
def test_inclusion_outside_the_tree_is_rejected(index: int, size: int) -> None:
    with pytest.raises(ProofError, match="outside"):
        verify_inclusion(EMPTY_ROOT, index, size, [], EMPTY_ROOT)


def test_proof_generation_rejects_impossible_requests() -> None:
    with pytest.raises(ProofError):
        inclusion_proof(BIG, 5, 5)
    with pytest.raises(ProofError):
        consistency_proof(BIG, 6, 5)
