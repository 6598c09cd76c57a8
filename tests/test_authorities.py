"""The authorities in force at a tree size, replayed from the genesis and governance records,
agree with the consensus's validator sets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_node.consensus.governance import governance_decoder
from pyrsia_node.consensus.validators import ValidatorSet
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.authorities import NotAGovernanceRecord, authorities_in_force
from pyrsia_node.ledger.records import GovernanceAction, GovernanceRecord

GOVERNANCE = Identity.generate()
OTHER = Identity.generate()
POOL = [Identity.generate().public_key for _ in range(6)]
GENESIS = Genesis(
    chain_id="pyrsia-test",
    genesis_time="2026-01-01T00:00:00Z",
    governance_public_key=GOVERNANCE.public_key,
    authorities=tuple(
        Authority(f"authority-{i}", POOL[i], f"127.0.0.1:{1000 + i}", "") for i in range(3)
    ),
    ca_certificate="",
)


def change(
    sequence: int,
    action: GovernanceAction,
    key: int,
    *,
    signer: Identity = GOVERNANCE,
    chain: str = "pyrsia-test",
    name: str | None = None,
    address: str = "127.0.0.1:2000",
) -> bytes:
    added = action is GovernanceAction.ADD
    return GovernanceRecord.create(
        signer,
        chain,
        sequence,
        action,
        name or f"authority-{key}",
        POOL[key],
        address if added else "",
    ).encode()


def test_the_genesis_set_is_in_force_without_governance_records() -> None:
    result = authorities_in_force(GENESIS, [], 10)
    assert result.authorities == tuple((a.name, a.public_key) for a in GENESIS.authorities)
    assert result.quorum == 3


def test_adds_and_removes_apply_in_log_order() -> None:
    records = [
        (2, change(1, GovernanceAction.ADD, 3)),
        (5, change(2, GovernanceAction.REMOVE, 0)),
    ]
    result = authorities_in_force(GENESIS, records, 6)
    assert [name for name, _ in result.authorities] == ["authority-1", "authority-2", "authority-3"]
    assert result.applied == (2, 5)
    assert result.refused == ()


def test_a_record_with_a_bad_signature_or_another_chain_is_refused() -> None:
    records = [
        (0, change(1, GovernanceAction.ADD, 4, signer=OTHER)),
        (1, change(2, GovernanceAction.ADD, 5, chain="another-chain")),
    ]
    result = authorities_in_force(GENESIS, records, 2)
    assert len(result.authorities) == 3
    assert [r.index for r in result.refused] == [0, 1]
    assert "not signed by this network's governance key" in result.refused[0].reason
    assert "another-chain" in result.refused[1].reason


def test_an_add_with_an_address_renames_a_present_authority() -> None:
    renamed = change(1, GovernanceAction.ADD, 1, name="authority-one")
    result = authorities_in_force(GENESIS, [(0, renamed)], 1)
    assert result.authorities[1] == ("authority-one", POOL[1])
    assert result.applied == ()


def test_entries_that_are_not_governance_records_are_rejected() -> None:
    with pytest.raises(NotAGovernanceRecord, match="entry 4"):
        authorities_in_force(GENESIS, [(4, b"\x01\x01junk")], 5)


@pytest.mark.parametrize("indexes", [(3, 3), (4, 2), (0, 9)])
def test_indexes_must_increase_and_stay_below_the_size(indexes: tuple[int, int]) -> None:
    records = [(i, change(n, GovernanceAction.ADD, 3)) for n, i in enumerate(indexes)]
    with pytest.raises(ValueError, match="increasing indexes below size 9"):
        authorities_in_force(GENESIS, records, 9)


actions = st.lists(
    st.tuples(
        st.sampled_from(GovernanceAction),
        st.integers(0, len(POOL) - 1),
        st.sampled_from(["ok", "ok", "ok", "bad signature", "other chain"]),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(actions)
def test_the_replayed_set_is_the_consensus_validator_set(
    steps: list[tuple[GovernanceAction, int, str]],
) -> None:
    """Every prefix of the governance history: the same keys, in the same order, as
    ValidatorSet.apply over the consensus's governance decoder (skips included)."""
    records = [
        change(
            n,
            action,
            key,
            signer=OTHER if kind == "bad signature" else GOVERNANCE,
            chain="another-chain" if kind == "other chain" else "pyrsia-test",
        )
        for n, (action, key, kind) in enumerate(steps)
    ]
    decode = governance_decoder(GENESIS)
    validators = ValidatorSet.from_genesis(GENESIS)
    for size in range(len(records) + 1):
        replayed = authorities_in_force(GENESIS, list(enumerate(records[:size])), size)
        assert tuple(key for _, key in replayed.authorities) == validators.validators
        if size < len(records):
            validators = validators.apply(c for c in [decode(records[size])] if c is not None)
