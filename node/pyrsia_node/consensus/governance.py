"""Validator-set changes from committed ledger governance records.

A record changes the validator set only when it is a `GovernanceRecord` for this chain
signed by the genesis governance key; anything else (artifact records, malformed bytes,
bad signatures) changes nothing. Every node applies the same rule to the same committed
records, so they agree on the validator set of every height.

A governance record that would change nothing because it is forged (not signed by the
governance key, or signed for another chain) is not admitted either (`governance_refusal`,
part of consensus' record check): it would sit in the immutable log for good, and anyone
who can reach an authority's admin API could fill the log with them. Chains written before
this rule may hold such records; replay still skips them.
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
    checked = _check(genesis, record)
    return checked if isinstance(checked, GovernanceRecord) else None


def governance_refusal(genesis: Genesis, record: bytes) -> str | None:
    """Why consensus must not admit ``record``, when it is a governance record that is not
    valid on this chain; None for a valid one and for every other kind of record."""
    checked = _check(genesis, record)
    return checked if isinstance(checked, str) else None


def _check(genesis: Genesis, record: bytes) -> GovernanceRecord | str | None:
    """None: not a governance record; the record when valid; else the reason."""
    if not record.startswith(_GOVERNANCE_PREFIX):
        return None  # cheap exit for the common case: artifact records
    try:
        decoded = decode_record(record)
    except RecordError as exc:
        return f"malformed governance record: {exc}"
    if not isinstance(decoded, GovernanceRecord):
        return "malformed governance record"
    try:
        decoded.verify(genesis.governance_public_key, genesis.chain_id)
    except RecordError as exc:
        return str(exc)
    return decoded
