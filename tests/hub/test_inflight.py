"""The hub's bound on received, unacknowledged messages: in messages and in bytes (a flood of large frames)."""

from __future__ import annotations

import threading

import pytest

from fedge.hub.inflight import InFlight


def test_the_byte_bound_blocks_until_room_is_released() -> None:
    room = InFlight(max_messages=10, max_bytes=100)
    assert room.acquire(60, timeout=0)
    assert not room.acquire(50, timeout=0.05)  # 110 > 100 bytes
    assert room.acquire(40, timeout=0)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: room.acquire(50, timeout=5) and got.set())
    waiter.start()
    assert not got.wait(0.1)
    room.release(60)
    waiter.join(5)
    assert got.is_set() and (room.messages, room.bytes) == (2, 90)


def test_the_message_bound_and_one_oversized_message_alone() -> None:
    room = InFlight(max_messages=2, max_bytes=100)
    assert room.acquire(500, timeout=0)  # larger than the bound, but nothing else waits: let in
    assert not room.acquire(1, timeout=0)
    room.release(500)
    assert room.acquire(1, timeout=0) and room.acquire(1, timeout=0)
    assert not room.acquire(1, timeout=0)  # two messages at most
    with pytest.raises(RuntimeError):
        InFlight(1, 1).release(1)
