"""The authorities in force at a tree size, replayed from the genesis and the log's
governance records: who must cosign a checkpoint of that size, and whose attestations
count for the record appended at that index.

Definition. The authorities *in force at size N* are the genesis authorities, in genesis
order, changed by every governance record among the log's first N entries, in log order,
that is for this chain and signed by the genesis governance key:

- ADD appends the record's key, unless it is already in force;
- REMOVE takes the key out, unless it is not in force or is the last authority.

Records that fail those checks (another chain, a bad signature) change nothing, and
neither do ADDs of present keys and REMOVEs of absent ones: the same rules, in the same
order, as the consensus (``ValidatorSet.apply`` over ``governance.governance_decoder``),
checked against it by ``tests/test_authorities.py``.

How this matches the node. A node cosigns the checkpoint of size N right after committing
the block that brings its log to N, having applied that block's governance records: the
set above is the chain's ``next_validators`` after that block, i.e. the validators of
height H + 2 when the block is at height H. (A change committed at H takes part in
*consensus votes* from H + 2, but it is *in* the log from size N on, so a checkpoint
covering it is judged by the set that includes it.) Every authority the node has ever
named cosigns, so removed authorities may add signatures: verifiers ignore them as unknown
keys.

The same set judges records: an artifact record at entry index N counts only attestations
of the authorities in force at size N, and needs the attestation threshold over their
number. Consensus checks the records of the block after height H against the chain's
``authorities_in_force`` after H (that is, ``next_validators``: the set at the log size
that block starts at), and a governance record ends its block, so no record of a block
follows a change in it: for every record that is the set at its own index. The Acquire
check (whose build requests an authority serves) and a coordinator's threshold use the
set at the log's size too.

An authority's note-signing name is the genesis name or, after an ADD carrying a gRPC
address, that record's name (the node learns names the same way); an ADD without an
address keeps an earlier name, or takes the record's name when the key has none.

Pure: no IO; the caller supplies the records (from a log or from a proof bundle).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pyrsia_node.genesis import Genesis, quorum
from pyrsia_node.ledger.records import (
    FORMAT_VERSION,
    KIND_GOVERNANCE,
    GovernanceAction,
    GovernanceRecord,
    RecordError,
    decode_record,
)


class NotAGovernanceRecord(ValueError):
    """An entry offered as a governance record is something else."""


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """A governance record in the log that changes nothing because it is not valid here."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class AuthoritiesInForce:
    """The outcome of replaying governance records up to ``size``."""

    size: int
    authorities: tuple[tuple[str, bytes], ...]  # (name, Ed25519 public key), in force order
    applied: tuple[int, ...]  # entry indexes of the records that changed the set
    refused: tuple[RefusedRecord, ...]  # governance records that are not valid on this chain

    @property
    def quorum(self) -> int:
        return quorum(len(self.authorities))


def authorities_in_force(
    genesis: Genesis, governance: Iterable[tuple[int, bytes]], size: int
) -> AuthoritiesInForce:
    """Replay ``governance`` ((entry index, record bytes) in increasing index order, every
    one below ``size``) over the genesis authorities; see the module docstring.

    Raises :class:`NotAGovernanceRecord` for an entry that is not a governance record and
    ``ValueError`` for indexes out of order or not below ``size``.
    """
    keys = [a.public_key for a in genesis.authorities]
    names = {a.public_key: a.name for a in genesis.authorities}
    applied: list[int] = []
    refused: list[RefusedRecord] = []
    previous = -1
    for index, data in governance:
        if not previous < index < size:
            raise ValueError(
                f"governance entry {index}: expected increasing indexes below size {size}"
            )
        previous = index
        record = _governance_record(index, data)
        try:
            record.verify(genesis.governance_public_key, genesis.chain_id)
        except RecordError as exc:
            refused.append(RefusedRecord(index, str(exc)))
            continue
        key = record.public_key
        if record.action is GovernanceAction.ADD:
            if record.grpc_address or key not in names:
                names[key] = record.name
            if key not in keys:
                keys.append(key)
                applied.append(index)
        elif key in keys and len(keys) > 1:
            keys.remove(key)
            applied.append(index)
    return AuthoritiesInForce(
        size, tuple((names[k], k) for k in keys), tuple(applied), tuple(refused)
    )


def _governance_record(index: int, data: bytes) -> GovernanceRecord:
    if data[:2] != bytes((FORMAT_VERSION, KIND_GOVERNANCE)):
        raise NotAGovernanceRecord(f"entry {index} is not a governance record")
    try:
        record = decode_record(data)
    except RecordError as exc:
        raise NotAGovernanceRecord(f"entry {index} is not a valid record: {exc}") from None
    assert isinstance(record, GovernanceRecord)
    return record
