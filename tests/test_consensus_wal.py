"""The write-ahead file: durable states, torn tails, corruption and compaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyrsia_node.consensus import Block, Step, Vote, VoteType, WalError, WalState, WriteAheadFile
from pyrsia_node.consensus.messages import Proposal

KEY = b"\x01" * 32
BLOCK = Block("pyrsia-test", 3, b"\x02" * 32, KEY, (b"record",))


def state(round_: int = 0, floor: int | None = 0) -> WalState:
    vote = Vote(VoteType.PREVOTE, 3, round_, BLOCK.hash, KEY, b"\x03" * 64)
    other = Vote(VoteType.PREVOTE, 3, round_, BLOCK.hash, b"\x09" * 32, b"\x07" * 64)
    proposal = Proposal(BLOCK, round_, -1, KEY, b"\x04" * 64)
    proof = (vote, other)
    return WalState(
        3, round_, Step.PRECOMMIT, round_, BLOCK, round_, BLOCK, (proposal, vote), floor, proof
    )


def test_state_encoding_round_trips() -> None:
    for s in (state(), state(2, None)):
        assert WalState.decode(s.encode()) == s


def test_missing_file_means_no_state(tmp_path: Path) -> None:
    assert WriteAheadFile(tmp_path / "consensus" / "wal").load() is None


def test_last_appended_state_is_loaded(tmp_path: Path) -> None:
    wal = WriteAheadFile(tmp_path / "consensus" / "wal")
    for round_ in range(5):
        wal.append(state(round_))
    assert wal.load() == state(4)


def test_torn_last_frame_falls_back_to_the_previous_state(tmp_path: Path) -> None:
    wal = WriteAheadFile(tmp_path / "wal")
    wal.append(state(1))
    wal.append(state(2))
    data = wal.path.read_bytes()
    wal.path.write_bytes(data[:-7])
    assert wal.load() == state(1)


def test_corrupt_last_frame_falls_back_to_the_previous_state(tmp_path: Path) -> None:
    wal = WriteAheadFile(tmp_path / "wal")
    wal.append(state(1))
    wal.append(state(2))
    data = bytearray(wal.path.read_bytes())
    data[-3] ^= 0xFF
    wal.path.write_bytes(bytes(data))
    assert wal.load() == state(1)


def test_file_without_any_intact_state_is_an_error(tmp_path: Path) -> None:
    wal = WriteAheadFile(tmp_path / "wal")
    wal.path.write_bytes(b"\x00\x00\x00\x10garbage")
    with pytest.raises(WalError, match="no intact state"):
        wal.load()


def test_compaction_rewrites_to_the_latest_state(tmp_path: Path) -> None:
    wal = WriteAheadFile(tmp_path / "wal", compact_bytes=2000)
    for round_ in range(20):
        wal.append(state(round_))
        assert wal.path.stat().st_size <= 2000
    assert wal.load() == state(19)
    assert not (tmp_path / "wal.tmp").exists()


def test_file_is_private(tmp_path: Path) -> None:
    wal = WriteAheadFile(tmp_path / "wal")
    wal.append(state())
    assert wal.path.stat().st_mode & 0o777 == 0o600


def test_each_distinct_block_is_written_once() -> None:
    other = Block("pyrsia-test", 3, b"\x02" * 32, KEY, (b"x" * 1000,))
    same = WalState(
        3, 1, Step.PREVOTE, 0, other, 0, other, (Proposal(other, 1, 0, KEY, b"\x05" * 64),), 0
    )
    assert len(same.encode()) < 2 * 1000
    two = WalState(3, 1, Step.PREVOTE, 0, other, 1, BLOCK, (), 0)
    assert WalState.decode(two.encode()) == two
