"""Durable store of committed blocks with their commit certificates, one per height.

Authorities and peers keep every committed (block, certificate) so they can serve block
sync and replay `ChainState` at start-up. File format: frames ``u32 length | u32 crc32 |
payload`` where the payload is ``blob(block canonical bytes) | blob(certificate canonical
bytes)``; frame i holds height i + 1. A torn last frame (crash during a write) is cut off
when the store opens. Every append is fsynced before it returns.

The whole chain is kept in memory as well; this module does blocking IO (call it from a
thread in asyncio code).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from pyrsia_node.consensus.canonical import CanonicalDecodeError, Reader, Writer
from pyrsia_node.consensus.messages import Block, CommitCertificate

_FRAME = struct.Struct(">II")


class BlockStoreError(Exception):
    """The block file is unreadable, or an append does not extend the stored chain."""


class BlockStore:
    """Append-only committed chain; the owner is one consensus service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._chain: list[tuple[Block, CommitCertificate]] = []
        self._records = 0
        self._load()

    @property
    def height(self) -> int:
        """The height of the last stored block (0 when empty)."""
        return len(self._chain)

    @property
    def records(self) -> int:
        """How many records the stored blocks hold, all together."""
        return self._records

    def get(self, height: int) -> tuple[Block, CommitCertificate]:
        if not 1 <= height <= len(self._chain):
            raise KeyError(height)
        return self._chain[height - 1]

    def range(self, from_height: int, limit: int) -> list[tuple[Block, CommitCertificate]]:
        start = max(from_height, 1) - 1
        return self._chain[start : start + limit]

    def append(self, block: Block, cert: CommitCertificate) -> None:
        if block.height != len(self._chain) + 1:
            raise BlockStoreError(
                f"block {block.height} does not follow the stored height {len(self._chain)}"
            )
        if self._chain and block.prev_hash != self._chain[-1][0].hash:
            raise BlockStoreError(f"block {block.height} does not extend the stored chain")
        payload = Writer().blob(block.canonical_bytes()).blob(cert.canonical_bytes()).bytes()
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(frame)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._chain.append((block, cert))
        self._records += len(block.records)

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BlockStoreError(f"cannot read block file {self.path}: {exc.strerror}") from exc
        pos = 0
        while pos + _FRAME.size <= len(data):
            size, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size : pos + _FRAME.size + size]
            if len(payload) != size or zlib.crc32(payload) != crc:
                break
            try:
                reader = Reader(payload)
                block = Block.from_canonical_bytes(reader.blob())
                cert = CommitCertificate.from_canonical_bytes(reader.blob())
                reader.end()
            except (CanonicalDecodeError, ValueError) as exc:
                raise BlockStoreError(f"block file {self.path} is corrupt: {exc}") from exc
            if block.height != len(self._chain) + 1:
                raise BlockStoreError(f"block file {self.path} skips to height {block.height}")
            self._chain.append((block, cert))
            self._records += len(block.records)
            pos += _FRAME.size + size
        if pos != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(pos)
                handle.flush()
                os.fsync(handle.fileno())
