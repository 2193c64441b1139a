"""The hub's record of how devices behave (decisions in :mod:`fedge.core.conduct`): who answered the rounds they were
selected for, strikes for proved misbehaviour and stalls, exclusions and the operator's readmission.

Called on the daemon's worker thread (through :class:`~fedge.hub.port.HubPort`), except :func:`readmit`, which the
``fedge hub devices readmit`` command runs on the store directly (the daemon reads standings from the store when it
plans a round, so a readmitted device is selectable from the next round on).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fedge.core.conduct import ConductPolicy, Offence, after_good_round, after_offence, excluded, readmitted
from fedge.hub.port import HubPort
from fedge.hub.store import Store
from fedge.protocol.errors import ConfigError

log = logging.getLogger("fedge.hub")

__all__ = ["account", "policy_of", "readmit", "strike"]


def policy_of(hub: HubPort) -> ConductPolicy:
    c = hub.cfg.conduct
    return ConductPolicy(c.strikes, c.exclude_rounds, c.max_exclusions)


def strike(hub: HubPort, rid: int, device: str, offence: Offence, detail: str) -> None:
    """One strike against ``device`` for round ``rid``: recorded with an alert, and an exclusion when it is one too
    many."""
    store = hub.store
    before = store.standing(device)
    after = after_offence(before, offence, rid, policy_of(hub), detail)
    if after == before:
        return
    store.set_standing(device, after)
    store.add_alert(rid, str(offence), device, detail)
    if excluded(after, rid + 1) and not excluded(before, rid + 1):
        how = "for good (fedge hub devices readmit)" if after.permanent else f"until round {after.until}"
        store.add_alert(rid, "excluded", device, f"{device} excluded {how}: {after.reason}")
        log.warning("round %d: %s excluded %s (%s)", rid, device, how, after.reason)
    else:
        log.warning("round %d: strike %d against %s (%s)", rid, after.strikes, device, detail)


def account(hub: HubPort, rid: int, selected: Iterable[str], answered: set[str], contributed: set[str],
            stalled: Iterable[str] = ()) -> None:
    """A closed round: who was selected and who answered it (participation, the selection weights); one strike
    less for each device that ``contributed``; a strike for each device that ``stalled`` it."""
    store = hub.store
    store.count_participation(tuple(selected), answered)
    for d in contributed:
        s = store.standing(d)
        if s.strikes and after_good_round(s, rid) != s:
            store.set_standing(d, after_good_round(s, rid))
    for d in stalled:
        strike(hub, rid, d, Offence.STALLED, f"selected for round {rid}, online and silent until its deadline")


def readmit(store: Store, device: str) -> str:
    """The operator's readmission of an excluded device (ConfigError if it is not excluded); what was lifted."""
    s = store.standing(device)
    rid = store.next_round_id()
    if not excluded(s, rid) and not s.strikes:
        raise ConfigError("device", f"{device!r} is not excluded (no strikes either)")
    store.set_standing(device, readmitted(s))
    store.add_alert(None, "readmitted", device, f"{device} readmitted by the operator (was: {s.reason or 'strikes'})")
    return s.reason
