"""Generic test helpers shared by every test package (free ports, waiting, a mosquitto process: the one
launcher in ``fedge.hub.mosquitto``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fedge.hub.mosquitto import MOSQUITTO, Mosquitto, free_port, wait_port

__all__ = ["MOSQUITTO", "Mosquitto", "free_port", "wait_port", "wait_until"]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true (returns True) or the time is up (returns False)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
