"""Durable store of committed blocks with their commit certificates, one per height.

Authorities and peers keep every committed (block, certificate) so they can serve block
sync and replay `ChainState` at start-up. File format: frames ``u32 length | u32 crc32 |
payload`` where the payload is ``blob(block canonical bytes) | blob(certificate canonical
bytes)``; frame i holds height i + 1. A torn last frame (crash during a write) is cut off
when the store opens. Every append is fsynced before it returns.

Memory holds, per height, where its frame starts and how many records the chain holds up
to it (16 bytes), and the latest blocks up to `CACHE_BYTES` of records (what followers and
lagging authorities ask for most); any other block is read back from the file, its CRC
checked, when asked for. So memory does not grow with the chain (it held every block, each
record's bytes included, for the life of the process).

Blocking IO: call it from a thread in asyncio code. One thread appends at a time; reads may
run meanwhile (on the event loop too): a height is visible once its frame is fsynced.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from pyrsia_node.consensus.canonical import CanonicalDecodeError, Reader, Writer
from pyrsia_node.consensus.messages import Block, CommitCertificate

_FRAME = struct.Struct(">II")
# Record bytes of the latest blocks kept decoded in memory (at least the last block).
CACHE_BYTES = 16 << 20

Entry = tuple[Block, CommitCertificate]


class BlockStoreError(Exception):
    """The block file is unreadable, or an append does not extend the stored chain."""


class BlockStore:
    """Append-only committed chain; the owner is one consensus service."""

    def __init__(self, path: Path, cache_bytes: int = CACHE_BYTES) -> None:
        self.path = path
        self._cache_bytes = cache_bytes
        self._starts = array("Q")  # height h's frame starts at _starts[h - 1]
        self._ends = array("Q")  # the records of heights 1..h number _ends[h - 1]
        self._size = 0  # where the next frame goes
        self._last_hash: bytes | None = None
        self._cache: OrderedDict[int, tuple[Entry, int]] = OrderedDict()  # height -> (, bytes)
        self._cached = 0
        self._lock = threading.Lock()  # the cache: appends in a thread, reads on the loop
        self._reader: int | None = None
        self._load()

    @property
    def height(self) -> int:
        """The height of the last stored block (0 when empty)."""
        return len(self._starts)

    @property
    def records(self) -> int:
        """How many records the stored blocks hold, all together."""
        return self._ends[-1] if self._ends else 0

    def height_of_record(self, index: int) -> int:
        """The height whose block holds the chain's record number ``index`` (from 0);
        ``height + 1`` when the stored blocks hold ``index`` records or fewer."""
        return bisect.bisect_right(self._ends, index) + 1

    def records_before(self, height: int) -> int:
        """How many records the blocks below ``height`` hold."""
        return self._ends[height - 2] if height >= 2 else 0

    def get(self, height: int) -> Entry:
        if not 1 <= height <= self.height:
            raise KeyError(height)
        with self._lock:
            cached = self._cache.get(height)
        if cached is not None:
            return cached[0]
        return self._read(height)

    def range(self, from_height: int, limit: int, max_bytes: int | None = None) -> list[Entry]:
        """Up to ``limit`` blocks from ``from_height`` on; with ``max_bytes``, no more once
        their records reach that many bytes (one block at least), so that a reader
        catching up holds a bounded amount of old blocks at a time."""
        start = max(from_height, 1)
        entries: list[Entry] = []
        size = 0
        for height in range(start, min(start + limit, self.height + 1)):
            if entries and max_bytes is not None and size >= max_bytes:
                break
            entry = self.get(height)
            entries.append(entry)
            size += sum(map(len, entry[0].records))
        return entries

    def cached(self, height: int) -> bool:
        """Whether block ``height`` is in memory (``get`` reads no file for it)."""
        with self._lock:
            return height in self._cache

    def __iter__(self) -> Iterator[Entry]:
        """Every stored block from height 1, read in order (for replays at start-up)."""
        for height in range(1, self.height + 1):
            yield self.get(height)

    def append(self, block: Block, cert: CommitCertificate) -> None:
        if block.height != self.height + 1:
            raise BlockStoreError(
                f"block {block.height} does not follow the stored height {self.height}"
            )
        if self._last_hash is not None and block.prev_hash != self._last_hash:
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
        self._remember(block.height, (block, cert))
        self._ends.append(self.records + len(block.records))
        self._last_hash = block.hash
        self._starts.append(self._size)  # last: the height is visible from here on
        self._size += len(frame)

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                os.close(self._reader)
                self._reader = None

    def _remember(self, height: int, entry: Entry) -> None:
        size = sum(map(len, entry[0].records))
        with self._lock:
            self._cache[height] = (entry, size)
            self._cached += size
            while self._cached > self._cache_bytes and len(self._cache) > 1:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._cached -= dropped

    def _read(self, height: int) -> Entry:
        start = self._starts[height - 1]
        with self._lock:
            if self._reader is None:
                self._reader = os.open(self.path, os.O_RDONLY)
            reader = self._reader
        size, crc = _FRAME.unpack(os.pread(reader, _FRAME.size, start))
        payload = os.pread(reader, size, start + _FRAME.size)
        if len(payload) != size or zlib.crc32(payload) != crc:
            raise BlockStoreError(f"block file {self.path}: height {height} changed on disk")
        entry = _decode(payload, self.path)
        if entry[0].height != height:
            raise BlockStoreError(f"block file {self.path}: height {height} changed on disk")
        return entry

    def _load(self) -> None:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (closed below, after the truncation)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BlockStoreError(f"cannot read block file {self.path}: {exc.strerror}") from exc
        with handle:
            total = os.fstat(handle.fileno()).st_size
            pos = 0
            while True:
                header = handle.read(_FRAME.size)
                if len(header) < _FRAME.size:
                    break
                size, crc = _FRAME.unpack(header)
                payload = handle.read(size)
                if len(payload) != size or zlib.crc32(payload) != crc:
                    break
                block, cert = _decode(payload, self.path)
                if block.height != self.height + 1:
                    raise BlockStoreError(f"block file {self.path} skips to height {block.height}")
                self._ends.append(self.records + len(block.records))
                self._starts.append(pos)
                self._last_hash = block.hash
                self._remember(block.height, (block, cert))
                pos += _FRAME.size + size
        self._size = pos
        if pos != total:
            with open(self.path, "r+b") as torn:
                torn.truncate(pos)
                torn.flush()
                os.fsync(torn.fileno())


def _decode(payload: bytes, path: Path) -> Entry:
    try:
        reader = Reader(payload)
        block = Block.from_canonical_bytes(reader.blob())
        cert = CommitCertificate.from_canonical_bytes(reader.blob())
        reader.end()
    except (CanonicalDecodeError, ValueError) as exc:
        raise BlockStoreError(f"block file {path} is corrupt: {exc}") from exc
    return block, cert
