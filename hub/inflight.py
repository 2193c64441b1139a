"""How much the hub holds received and not yet acknowledged: a bound in messages and in bytes.

Over MQTT the network thread hands each message to the worker without waiting for it (the hub acknowledges it
once the batch that handled it is committed). :class:`InFlight` bounds what waits: the network thread blocks in
:meth:`InFlight.acquire` beyond either bound, so the broker keeps the rest (back-pressure), and a flood of large
hostile frames costs the hub at most ``max_bytes`` of memory, not the flood's size. One message larger than the
byte bound is still let in when nothing else waits (the decoder then refuses it by its own size limit).
"""

from __future__ import annotations

import threading

__all__ = ["InFlight"]


class InFlight:
    """A counting bound on messages and their bytes (thread-safe)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be >= 1")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self._cond = threading.Condition()

    def _room(self, size: int) -> bool:
        return self.messages < self.max_messages and (self.bytes == 0 or self.bytes + size <= self.max_bytes)

    def acquire(self, size: int, timeout: float) -> bool:
        """Take room for one message of ``size`` bytes; False when there was none within ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._room(size), timeout):
                return False
            self.messages += 1
            self.bytes += size
            return True

    def release(self, size: int) -> None:
        """Give back what :meth:`acquire` took for a message of ``size`` bytes."""
        with self._cond:
            if self.messages < 1 or self.bytes < size:
                raise RuntimeError("released more than was acquired")
            self.messages -= 1
            self.bytes -= size
            self._cond.notify_all()
