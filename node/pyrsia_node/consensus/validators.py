"""Validator sets, the changes governance records make to them, and the chain position.

A validator is an authority's raw 32-byte Ed25519 public key; every validator has one vote.
The set for height ``h`` is the genesis set with the changes of every block committed at a
height ``<= h - 2`` applied in order (a change committed at ``H`` is in force from ``H + 2``),
so every node derives the same set for every height from the chain alone.

Changes that cannot apply (adding a present key, removing an absent one, removing the last
validator) are skipped deterministically: a committed record cannot be uncommitted, and
every node must skip the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyrsia_node.genesis import Genesis, quorum

PUBLIC_KEY_SIZE = 32
HASH_SIZE = 32
GENESIS_PREV_HASH = bytes(HASH_SIZE)


@dataclass(frozen=True, slots=True)
class ValidatorSetChange:
    """Keys a governance record adds to or removes from the validator set."""

    add: tuple[bytes, ...] = ()
    remove: tuple[bytes, ...] = ()


ValidatorSetChangeDecoder = Callable[[bytes], ValidatorSetChange | None]
"""Reads a committed record; returns its validator-set change, or None for other records."""


def no_validator_set_changes(record: bytes) -> ValidatorSetChange | None:
    """A decoder for chains whose records never change the validator set."""
    return None


@dataclass(frozen=True, slots=True)
class ValidatorSet:
    """The ordered validators of one height; the order fixes the proposer rotation."""

    validators: tuple[bytes, ...]
    _members: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.validators:
            raise ValueError("a validator set needs at least one validator")
        if any(len(key) != PUBLIC_KEY_SIZE for key in self.validators):
            raise ValueError("validators are 32-byte Ed25519 public keys")
        members = frozenset(self.validators)
        if len(members) != len(self.validators):
            raise ValueError("a validator is listed twice")
        object.__setattr__(self, "_members", members)

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> ValidatorSet:
        return cls(tuple(a.public_key for a in genesis.authorities))

    def __len__(self) -> int:
        return len(self.validators)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    @property
    def quorum(self) -> int:
        """floor(2n/3) + 1 votes: any two quorums share an honest validator."""
        return quorum(len(self.validators))

    @property
    def skip_threshold(self) -> int:
        """f + 1 votes, f = n - quorum: at least one of them is honest."""
        return len(self.validators) - self.quorum + 1

    def proposer(self, height: int, round_: int) -> bytes:
        return self.validators[(height + round_) % len(self.validators)]

    def apply(self, changes: Iterable[ValidatorSetChange]) -> ValidatorSet:
        validators = list(self.validators)
        for change in changes:
            for key in change.remove:
                if key in validators and len(validators) > 1:
                    validators.remove(key)
            for key in change.add:
                if len(key) == PUBLIC_KEY_SIZE and key not in validators:
                    validators.append(key)
        return ValidatorSet(tuple(validators))
