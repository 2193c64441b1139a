"""Is the fleet's model improving? Rounds in a row that did not improve it raise the hub's alert.

A round did not improve the model when it made no version, when a deploy gate kept its version back (the held-out
gate at its close, or the devices in its evaluation round), or when its version scores below the source model on
the hub's held-out data. At ``STALL_ROUNDS`` in a row the hub says so: a warning in its log, ``alert`` in the
store's meta (``fedge hub status``, the dashboard). A version that deploys and is not below the source clears it.
"""

from __future__ import annotations

import logging

from fedge.hub.store import Store

log = logging.getLogger("fedge.hub")

__all__ = ["STALL_ROUNDS", "note"]

STALL_ROUNDS = 3


def note(store: Store, round_id: int, improved: bool, why: str) -> None:
    """Record one decided round: ``improved``, or not and ``why`` (for the alert's text)."""
    streak = 0 if improved else int(store.get_meta("stall_streak") or 0) + 1
    store.set_meta("stall_streak", str(streak))
    if streak >= STALL_ROUNDS:
        alert = (f"{streak} rounds in a row did not improve the deployed model (round {round_id}: {why}); check the "
                 "devices' data, the learning rate and the source model")
        store.set_meta("alert", alert)
        log.warning("%s", alert)
    elif streak == 0 and store.get_meta("alert"):
        store.set_meta("alert", "")
