"""Where a node stands on the chain: the next height, the last block hash and the
validator sets for the next two heights.

`ChainState.after(block, decoder)` is the only way to advance, so replaying the committed
blocks from genesis always yields the same state; the node does that at start-up from its
durable ledger, and the consensus core does it on every commit.

Two questions, two answers from the same state:

* *who votes* at the next height: `validators` (a change committed at H votes from H + 2);
* *whose attestations count* for the records of the next block: `authorities_in_force`,
  the set after every committed change. It is the ledger's authorities in force at the
  log's size (`pyrsia_node.ledger.authorities`), because a governance record ends its block
  (`ConsensusCore`): no record of a block sits after a change in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyrsia_node.consensus.messages import Block
from pyrsia_node.consensus.validators import (
    GENESIS_PREV_HASH,
    ValidatorSet,
    ValidatorSetChangeDecoder,
)


@dataclass(frozen=True, slots=True)
class ChainState:
    """The next height to decide and the validators for it and for the one after."""

    height: int
    prev_hash: bytes
    validators: ValidatorSet
    next_validators: ValidatorSet

    @property
    def authorities_in_force(self) -> ValidatorSet:
        """The authorities in force after the last committed block: whose attestations
        count for a record of the next block, whose cosignatures the checkpoint of the log's
        size needs, whose build requests are served. Equal to `next_validators`; it depends
        only on the committed chain, so every node judges a record alike."""
        return self.next_validators

    @classmethod
    def genesis(cls, validators: ValidatorSet) -> ChainState:
        return cls(1, GENESIS_PREV_HASH, validators, validators)

    def after(self, block: Block, decoder: ValidatorSetChangeDecoder) -> ChainState:
        """The state once `block` (at `self.height`) is committed: its governance changes
        take effect two heights later."""
        if block.height != self.height or block.prev_hash != self.prev_hash:
            raise ValueError(
                f"block {block.height} does not extend the chain at height {self.height}"
            )
        changes = [c for c in map(decoder, block.records) if c is not None]
        return ChainState(
            self.height + 1,
            block.hash,
            self.next_validators,
            self.next_validators.apply(changes) if changes else self.next_validators,
        )
