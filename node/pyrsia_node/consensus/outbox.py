"""What one authority has still to send to another: bounded in messages and in bytes.

Consensus tolerates lost messages (votes are retransmitted, a proposal's missing records
are fetched, a lagging node syncs blocks), so a slow, paused or unreachable destination must
cost bounded memory rather than a backlog that grows with the load: an `Outbox` keeps at
most `max_messages` envelopes and `max_bytes` of their serialized size, dropping the oldest
first. The newest envelope is always kept, even when it alone is larger than `max_bytes`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Outbox(Generic[T]):
    """A FIFO for one destination's sender task: `put` never blocks, `get` waits."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("an outbox holds at least one message and one byte")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.dropped = 0  # envelopes dropped so far to stay within the bounds

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, item: T, size: int) -> None:
        """Queue ``item`` (``size`` bytes serialized), dropping the oldest beyond the bounds."""
        self._items.append((item, size))
        self._bytes += size
        while len(self._items) > 1 and (
            len(self._items) > self.max_messages or self._bytes > self.max_bytes
        ):
            _, old = self._items.popleft()
            self._bytes -= old
            self.dropped += 1
        self._ready.set()

    async def get(self) -> T:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item, size = self._items.popleft()
        self._bytes -= size
        return item
