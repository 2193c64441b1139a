"""Over-selection without I/O: how many updates close a round early, and how long the others still get.

A round selects more devices than it needs (``[rounds] over_select``) so that the slowest, offline or silent ones
cost nothing: it closes once :func:`round_target` valid updates (or SecAgg masked inputs) arrived and the others had
their grace (:func:`straggler_grace`).
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["MIN_GRACE_S", "round_target", "straggler_grace"]

MIN_GRACE_S: Final = 0.5
"""The least time a round that reached its target still waits for the other selected devices."""


def straggler_grace(opened_at: float, reached_at: float) -> float:
    """How long a round (or a SecAgg masked-input stage) that reached its target at ``reached_at`` still waits for
    the devices it over-selected: as long again as reaching the target took (at least :data:`MIN_GRACE_S`), so an
    honest straggler a little behind the others still counts, and a silent device costs at most twice the time of
    the devices that answer."""
    return max(MIN_GRACE_S, reached_at - opened_at)


def round_target(selected: int, min_devices: int, over_select: float) -> int:
    """How many valid updates close a round of ``selected`` devices early: selecting ``1 + over_select`` times what
    the round needs means the slowest (or silent) ``over_select`` share is not waited for; never below the quorum.
    0 (wait for every selected device) when nothing would be saved."""
    if over_select <= 0 or selected < 1:
        return 0
    target = max(min_devices, math.ceil(selected / (1 + over_select)))
    return target if target < selected else 0
