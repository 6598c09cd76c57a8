"""RFC 9162 §2.1 Merkle tree hashing, proof generation and proof verification.

Pure functions over bytes; no IO, no clocks. This module never decides *what* goes into a
tree, only how a tree of leaf hashes is hashed and proven.

Hashing (RFC 9162 §2.1.1, identical to RFC 6962 §2.1):

- empty tree: ``SHA-256("")``
- leaf: ``SHA-256(0x00 || data)``
- interior node: ``SHA-256(0x01 || left || right)``, where a tree of ``n > 1`` leaves splits
  at ``k``, the largest power of two smaller than ``n``.

Proof generation reads a *stored tree* through :class:`SubtreeHashes`: the hash of every
complete (perfect) subtree, addressed by ``(level, index)`` where the node covers leaves
``[index * 2**level, (index + 1) * 2**level)``. Every proof needs O(log n) such reads, so a
log that stores its perfect subtrees proves in O(log n) lookups at any size.

Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) step by
step; both verifiers raise :class:`ProofError` on any mismatch or malformed input and
return ``None`` on success.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


class ProofError(ValueError):
    """A proof does not verify, or its inputs are malformed (sizes, hash lengths)."""


class SubtreeHashes(Protocol):
    """Read access to the perfect subtrees of a stored tree.

    ``subtree_hash(level, index)`` is the hash of leaves
    ``[index * 2**level, (index + 1) * 2**level)``; level 0 is the leaf hashes. Callers only
    ask for subtrees that lie entirely inside the tree they prove against.
    """

    def subtree_hash(self, level: int, index: int) -> bytes: ...


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf's data."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes (RFC 9162 §2.1.1); the empty list gives ``EMPTY_ROOT``."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    # Bottom-up: pair nodes level by level; an unpaired last node is carried up unchanged,
    # which is exactly the split-at-largest-power-of-two rule.
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def range_hash(tree: SubtreeHashes, start: int, end: int) -> bytes:
    """MTH of leaves ``[start, end)`` of a stored tree, with O(log n) subtree reads.

    ``start`` must be a multiple of the largest power of two not exceeding ``end - start``
    rounded up, which holds for every range the RFC's recursion visits.
    """
    n = end - start
    if n <= 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0:
        level = n.bit_length() - 1
        return tree.subtree_hash(level, start >> level)
    k = _split(n)
    return node_hash(range_hash(tree, start, start + k), range_hash(tree, start + k, end))


def _check_size(name: str, value: int) -> None:
    if value < 0:
        raise ProofError(f"{name} {value} is negative")


def inclusion_proof(tree: SubtreeHashes, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, leaf-side first."""
    _check_size("tree size", size)
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    path: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            path.append(range_hash(tree, start + k, end))
            end = start + k
        else:
            path.append(range_hash(tree, start, start + k))
            start, m = start + k, m - k
    path.reverse()
    return path


def consistency_proof(tree: SubtreeHashes, size1: int, size2: int) -> list[bytes]:
    """PROOF(size1, D[0:size2]) of RFC 9162 §2.1.4.1; empty when ``size1`` is 0 or ``size2``."""
    _check_size("first tree size", size1)
    if size1 > size2:
        raise ProofError(f"first tree size {size1} exceeds second tree size {size2}")
    if size1 in (0, size2):
        return []
    path: list[bytes] = []
    start, end, m, complete = 0, size2, size1, True
    # SUBPROOF(m, D[start:end], complete), unrolled; nodes are collected root-side first.
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            path.append(range_hash(tree, start + k, end))
            end = start + k
        else:
            path.append(range_hash(tree, start, start + k))
            start, m, complete = start + k, m - k, False
    if not complete:
        path.append(range_hash(tree, start, end))
    path.reverse()
    return path


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} has {len(value)} bytes, a SHA-256 hash has {HASH_SIZE}")


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    RFC 9162 §2.1.3.2, step by step. Raises :class:`ProofError` on any failure.
    """
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root hash", root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    # 1. leaf_index must be below tree_size.
    if index < 0 or index >= tree_size:
        raise ProofError(f"leaf index {index} is outside a tree of size {tree_size}")
    # 2-3.
    fn, sn = index, tree_size - 1
    r = leaf_hash
    # 4.
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 5.
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    if r != root:
        raise ProofError("inclusion proof leads to a different root hash")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of ``size1`` with ``root1`` is a prefix of the one with ``root2``.

    RFC 9162 §2.1.4.2 for ``0 < size1 < size2``. The RFC's algorithm does not cover the
    trivial cases, handled as RFC 9162 §2.1.4.1 defines their proofs: ``size1 == size2``
    needs an empty proof and equal roots; ``size1 == 0`` needs an empty proof and
    ``root1`` the empty-tree hash (every tree extends the empty one).
    Raises :class:`ProofError` on any failure.
    """
    _check_hash("first root hash", root1)
    _check_hash("second root hash", root2)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    if size1 < 0 or size2 < 0:
        raise ProofError(f"tree sizes must not be negative, got {size1} and {size2}")
    if size1 > size2:
        raise ProofError(f"first tree size {size1} exceeds second tree size {size2}")
    if size1 == size2:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if root1 != root2:
            raise ProofError("equal tree sizes with different root hashes")
        return
    if size1 == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree must be empty")
        if root1 != EMPTY_ROOT:
            raise ProofError("the first root is not the empty-tree hash")
        return
    # 1.
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    # 2.
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    # 3.
    fn, sn = size1 - 1, size2 - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError("consistency proof is shorter than needed")
    if fr != root1:
        raise ProofError("consistency proof does not reproduce the first root hash")
    if sr != root2:
        raise ProofError("consistency proof does not reproduce the second root hash")


class MemoryTree:
    """An in-memory tree that stores every perfect subtree: O(log n) append, for tests,
    simulations and offline tools. The owner mutates it only through :meth:`append`."""

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append(h)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; return its index."""
        _check_hash("leaf hash", leaf)
        index = self.size
        self._levels[0].append(leaf)
        level, pos = 0, index
        while pos & 1:
            nodes = self._levels[level]
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._levels[level + 1].append(node_hash(nodes[pos - 1], nodes[pos]))
            level, pos = level + 1, pos >> 1
        return index

    def subtree_hash(self, level: int, index: int) -> bytes:
        return self._levels[level][index]

    def root(self, size: int | None = None) -> bytes:
        return range_hash(self, 0, self.size if size is None else size)
