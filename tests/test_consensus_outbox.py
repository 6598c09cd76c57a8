"""The per-destination outbox of the consensus transport: bounded in messages and bytes,
oldest dropped first, newest always kept, order preserved."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrsia_node.consensus.outbox import Outbox


async def test_items_come_out_in_order_and_get_waits_for_a_put() -> None:
    box: Outbox[str] = Outbox(10, 1000)
    waiting = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    box.put("a", 1)
    box.put("b", 1)
    assert await asyncio.wait_for(waiting, 1) == "a"
    assert await box.get() == "b"
    assert len(box) == 0 and box.bytes == 0


def test_the_oldest_go_first_beyond_the_message_bound() -> None:
    box: Outbox[int] = Outbox(3, 1000)
    for i in range(5):
        box.put(i, 10)
    assert [box._items[i][0] for i in range(len(box))] == [2, 3, 4]
    assert (len(box), box.bytes, box.dropped) == (3, 30, 2)


def test_the_oldest_go_first_beyond_the_byte_bound_and_the_newest_stays() -> None:
    box: Outbox[str] = Outbox(100, 1 << 20)
    box.put("small", 1000)
    box.put("large", 900 << 10)
    box.put("larger", 800 << 10)  # together beyond 1 MiB: the two before it go
    assert [item for item, _ in box._items] == ["larger"]
    box.put("huge", 4 << 20)  # alone beyond the bound: kept, the one before goes
    assert [item for item, _ in box._items] == ["huge"]
    assert box.dropped == 3 and box.bytes == 4 << 20


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Outbox(0, 10)
    with pytest.raises(ValueError):
        Outbox(10, 0)


operations = st.lists(st.one_of(st.integers(1, 400), st.none()), max_size=60)


@given(operations, st.integers(1, 8), st.integers(1, 1000))
def test_an_outbox_holds_the_newest_suffix_within_its_bounds(
    steps: list[int | None], max_messages: int, max_bytes: int
) -> None:
    """Sizes put, or None for a get: what the outbox holds is always a suffix of what was
    put and not yet taken, in order, within both bounds unless it is one envelope."""
    box: Outbox[int] = Outbox(max_messages, max_bytes)
    model: list[tuple[int, int]] = []  # (sequence number, size) put and not yet taken
    for n, step in enumerate(steps):
        if step is None:
            if len(box):
                assert asyncio.run(box.get()) == model[0][0]
                model = model[1:]
            continue
        box.put(n, step)
        model.append((n, step))
        held = [(item, size) for item, size in box._items]
        assert held == model[len(model) - len(held) :]
        assert len(held) >= 1 and len(held) <= max_messages
        assert box.bytes == sum(size for _, size in held)
        assert box.bytes <= max_bytes or len(held) == 1
        model = held
