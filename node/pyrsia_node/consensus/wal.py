"""The write-ahead state of one validator: what it has signed and what it is locked on.

Invariant (safety across restarts): the consensus core emits `Persist(state)` before the
`Broadcast` of any message it signed, and the shell returns from `WriteAheadFile.append`
only after the bytes are fsynced. After a crash, `WriteAheadFile.load` returns the last
complete state, which includes every message that may have left the node, so the restored
core never signs a second, different message for a (height, round, type) and keeps its lock.

File format: a sequence of frames ``u32 length | u32 crc32 | payload`` where the payload is
`WalState.encode()`. Only the last intact frame matters; a torn frame at the end (a crash
in the middle of a write) is cut off by `load`, so the states appended after a restart
follow the last intact one (were they written after the torn bytes, the next `load` would
stop at those and return a state older than messages the node signed since). When the
file grows past `compact_bytes` it is rewritten atomically (temp file, fsync, rename,
fsync of the directory) with one frame.

This module does blocking IO: call it from a thread in asyncio code.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pyrsia_node.consensus.canonical import CanonicalDecodeError, Reader, Writer
from pyrsia_node.consensus.messages import (
    Block,
    ConsensusMessage,
    MessageKind,
    Proposal,
    Vote,
    decode_message,
    encode_message,
)
from pyrsia_node.consensus.validators import PUBLIC_KEY_SIZE

MAGIC = b"pyrsia-wal/v1\x00"
_FRAME = struct.Struct(">II")


class Step(enum.IntEnum):
    """Tendermint steps in order; NEW_HEIGHT is the pause before round 0 of a height."""

    NEW_HEIGHT = 0
    PROPOSE = 1
    PREVOTE = 2
    PRECOMMIT = 3


class WalError(Exception):
    """The write-ahead file cannot be read or written; the node must not vote."""


@dataclass(frozen=True, slots=True)
class WalState:
    """Everything a validator must remember across a crash to stay safe."""

    height: int
    round: int
    step: Step
    locked_round: int
    locked_block: Block | None
    valid_round: int
    valid_block: Block | None
    own_messages: tuple[ConsensusMessage, ...]
    signing_floor: int | None
    """Lowest height this key may sign at; None while it is still unknown after state loss."""
    proof_of_lock: tuple[Vote, ...] = ()
    """The quorum of prevotes for valid_block in valid_round: after a restart the node still
    holds them, so it can relay them and others can accept its re-proposal even when some
    of their signers are gone."""

    def encode(self) -> bytes:
        # Each distinct block is written once: the locked block, the valid block and an own
        # proposal are usually the same block, and blocks dominate the size of a state.
        blocks: dict[bytes, int] = {}
        table: list[Block] = []

        def ref(block: Block | None) -> int:
            if block is None:
                return -1
            if block.hash not in blocks:
                blocks[block.hash] = len(table)
                table.append(block)
            return blocks[block.hash]

        locked, valid = ref(self.locked_block), ref(self.valid_block)
        messages = Writer().u32(len(self.own_messages))
        for message in self.own_messages:
            if isinstance(message, Proposal):
                messages.u8(MessageKind.PROPOSAL).i64(ref(message.block)).u32(message.round)
                messages.i64(message.valid_round).blob(message.proposer).blob(message.signature)
            else:
                messages.u8(0).blob(encode_message(message))
        writer = Writer().raw(MAGIC).u64(self.height).u32(self.round).u8(self.step)
        writer.u32(len(table))
        for block in table:
            writer.blob(block.canonical_bytes())
        writer.i64(self.locked_round).i64(locked).i64(self.valid_round).i64(valid)
        writer.raw(messages.bytes())
        writer.u32(len(self.proof_of_lock))
        for vote in self.proof_of_lock:
            writer.blob(encode_message(vote))
        writer.i64(-1 if self.signing_floor is None else self.signing_floor)
        return writer.bytes()

    @classmethod
    def decode(cls, data: bytes) -> WalState:
        reader = Reader(data)
        if reader.raw(len(MAGIC)) != MAGIC:
            raise CanonicalDecodeError("not a pyrsia consensus write-ahead state")
        height, round_, step = reader.u64(), reader.u32(), Step(reader.u8())
        table = [Block.from_canonical_bytes(reader.blob()) for _ in range(reader.u32())]

        def deref(index: int) -> Block | None:
            if index == -1:
                return None
            if not 0 <= index < len(table):
                raise CanonicalDecodeError(f"block reference {index} is out of range")
            return table[index]

        locked_round, locked_block = reader.i64(), deref(reader.i64())
        valid_round, valid_block = reader.i64(), deref(reader.i64())
        messages: list[ConsensusMessage] = []
        for _ in range(reader.u32()):
            if reader.u8() == MessageKind.PROPOSAL:
                block = deref(reader.i64())
                if block is None:
                    raise CanonicalDecodeError("a proposal without its block")
                round_of, valid_of = reader.u32(), reader.i64()
                proposer, signature = reader.blob(PUBLIC_KEY_SIZE), reader.blob(64)
                messages.append(Proposal(block, round_of, valid_of, proposer, signature))
            else:
                messages.append(decode_message(reader.blob()))
        proof: list[Vote] = []
        for _ in range(reader.u32()):
            vote = decode_message(reader.blob())
            if not isinstance(vote, Vote):
                raise CanonicalDecodeError("the proof of lock holds a proposal")
            proof.append(vote)
        floor = reader.i64()
        reader.end()
        return cls(
            height,
            round_,
            step,
            locked_round,
            locked_block,
            valid_round,
            valid_block,
            tuple(messages),
            None if floor < 0 else floor,
            tuple(proof),
        )


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


class WriteAheadFile:
    """Durable, append-only storage of `WalState`s; the owner is one consensus shell."""

    def __init__(self, path: Path, compact_bytes: int = 4 << 20) -> None:
        self.path = path
        self.compact_bytes = compact_bytes

    def load(self) -> WalState | None:
        """The last intact state, or None when the file does not exist; cuts off a torn
        tail."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WalError(f"cannot read write-ahead file {self.path}: {exc.strerror}") from exc
        last: bytes | None = None
        pos = 0
        while pos + _FRAME.size <= len(data):
            size, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size : pos + _FRAME.size + size]
            if len(payload) != size or zlib.crc32(payload) != crc:
                break
            last = payload
            pos += _FRAME.size + size
        if last is None:
            if data:
                raise WalError(
                    f"write-ahead file {self.path} holds no intact state; move it away only "
                    "if this key has never signed, otherwise restore it from a backup"
                )
            return None
        try:
            state = WalState.decode(last)
        except (CanonicalDecodeError, ValueError) as exc:
            raise WalError(f"write-ahead file {self.path} is corrupt: {exc}") from exc
        if pos != len(data):
            try:
                with open(self.path, "r+b") as handle:
                    handle.truncate(pos)
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise WalError(f"cannot cut the torn tail of {self.path}: {exc.strerror}") from exc
        return state

    def append(self, state: WalState) -> None:
        """Make `state` durable; returns only after fsync."""
        frame = _frame(state.encode())
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        try:
            if size + len(frame) > self.compact_bytes:
                self._replace(frame)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _write_all(fd, frame)
                os.fsync(fd)
            finally:
                os.close(fd)
            if size == 0:
                _fsync_dir(self.path.parent)
        except OSError as exc:
            raise WalError(f"cannot write write-ahead file {self.path}: {exc.strerror}") from exc

    def _replace(self, frame: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, frame)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
