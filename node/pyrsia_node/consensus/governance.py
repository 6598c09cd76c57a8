"""Validator-set changes from committed ledger governance records.

A record changes the validator set only when it is a `GovernanceRecord` for this chain
signed by the genesis governance key; anything else (artifact records, malformed bytes,
bad signatures) changes nothing. Every node applies the same rule to the same committed
records, so they agree on the validator set of every height.
"""

from __future__ import annotations

from pyrsia_node.consensus.validators import ValidatorSetChange, ValidatorSetChangeDecoder
from pyrsia_node.genesis import Genesis
from pyrsia_node.ledger.records import (
    FORMAT_VERSION,
    KIND_GOVERNANCE,
    GovernanceAction,
    GovernanceRecord,
    RecordError,
    decode_record,
)

_GOVERNANCE_PREFIX = bytes((FORMAT_VERSION, KIND_GOVERNANCE))


def governance_decoder(genesis: Genesis) -> ValidatorSetChangeDecoder:
    """The decoder the consensus core applies to every committed record."""

    def decode(record: bytes) -> ValidatorSetChange | None:
        governance = governance_record(genesis, record)
        if governance is None:
            return None
        if governance.action is GovernanceAction.ADD:
            return ValidatorSetChange(add=(governance.public_key,))
        return ValidatorSetChange(remove=(governance.public_key,))

    return decode


def governance_record(genesis: Genesis, record: bytes) -> GovernanceRecord | None:
    """The record as a governance record valid on this chain, or None."""
    if not record.startswith(_GOVERNANCE_PREFIX):
        return None  # cheap exit for the common case: artifact records
    try:
        decoded = decode_record(record)
    except RecordError:
        return None
    if not isinstance(decoded, GovernanceRecord) or decoded.chain_id != genesis.chain_id:
        return None
    try:
        decoded.verify(genesis.governance_public_key, genesis.chain_id)
    except RecordError:
        return None
    return decoded
