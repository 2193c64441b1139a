"""Which devices a round may select: exclusion of devices that keep failing or stalling rounds, and a preference for
devices that answer. Pure: the hub keeps each device's :class:`Standing` and :class:`Record` in its store.

**Strikes.** A device earns a strike when the hub can show that it broke a round: a SecAgg share or share bundle
proved bad (:mod:`fedge.core.secagg_server` names the sender), or it stayed selected, online and silent until a round
closed at its deadline. A round it contributes to takes one strike away. ``strikes`` strikes exclude it:
``rounds`` rounds the first time, twice as long each time after, and for good after ``max_exclusions`` exclusions,
until an operator readmits it (``fedge hub devices readmit``).

**Reliability.** Every selection and every answer (an update, a masked input in a sum, a report or a decline) is
counted; when a round selects fewer devices than are available it prefers those that answer (weight
``(answered + 1) / (selected + 1)``: 1 for a new device and for one that always answered), so a device that keeps
missing rounds is selected less often without being accused of anything (an honest straggler cut off by an early
close is not at fault either).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

__all__ = ["ConductPolicy", "Offence", "Record", "Standing", "after_good_round", "after_offence", "excluded",
           "readmitted", "reliability"]


class Offence(StrEnum):
    """What a strike is for."""

    BAD_SHARES = "bad_shares"          # a sealed share bundle its SecAgg neighbours could not open
    BAD_UNMASK = "bad_unmask"          # a revealed share that does not fit the secret's commitment
    BAD_INPUT = "bad_input"            # a stage message the hub had to refuse (wrong shape, protocol violation)
    STALLED = "stalled"                # selected, online and silent until the round's deadline


@dataclass(frozen=True)
class ConductPolicy:
    """``[conduct]`` of hub.toml: how many strikes exclude a device, for how many rounds the first time (doubling),
    and after how many exclusions it stays out until readmitted."""

    strikes: int = 2
    rounds: int = 5
    max_exclusions: int = 3

    def __post_init__(self) -> None:
        if self.strikes < 1 or self.rounds < 1 or self.max_exclusions < 1:
            raise ValueError("strikes, rounds and max_exclusions must be >= 1")


@dataclass(frozen=True)
class Standing:
    """A device's conduct: current strikes, exclusions so far, excluded before round ``until`` (0: not excluded),
    excluded for good, why (the last offence) and the round of the last offence."""

    strikes: int = 0
    exclusions: int = 0
    until: int = 0
    permanent: bool = False
    reason: str = ""
    last: int = 0


def excluded(s: Standing, round_id: int) -> bool:
    """Whether a device of standing ``s`` may not be selected for round ``round_id``."""
    return s.permanent or round_id < s.until


def after_offence(s: Standing, offence: Offence, round_id: int, policy: ConductPolicy, detail: str = "") -> Standing:
    """The standing after an offence in round ``round_id`` (an excluded device's offences add nothing)."""
    if excluded(s, round_id + 1):
        return s
    reason = f"{offence}: {detail}" if detail else str(offence)
    strikes = s.strikes + 1
    if strikes < policy.strikes:
        return replace(s, strikes=strikes, reason=reason, last=round_id)
    exclusions = s.exclusions + 1
    if exclusions > policy.max_exclusions:
        return Standing(0, exclusions, 0, True, reason, round_id)
    return Standing(0, exclusions, round_id + 1 + policy.rounds * 2 ** (exclusions - 1), False, reason, round_id)


def after_good_round(s: Standing, round_id: int) -> Standing:
    """Round ``round_id`` had the device's contribution: one strike less (none when it offended in that round)."""
    if s.last == round_id:
        return s
    return replace(s, strikes=max(s.strikes - 1, 0))


def readmitted(s: Standing) -> Standing:
    """The operator readmits the device: no strikes, no exclusion (its count of earlier exclusions is kept, so that
    it is excluded for good sooner if it goes on)."""
    return replace(s, strikes=0, until=0, permanent=False, reason="readmitted")


@dataclass(frozen=True)
class Record:
    """How often a device was selected and how often it answered."""

    selected: int = 0
    answered: int = 0


def reliability(records: Mapping[str, Record], devices: frozenset[str]) -> dict[str, float]:
    """Each device's selection weight: ``(answered + 1) / (selected + 1)`` (1 for a new device and for one that
    answered every round it was selected for; a device that missed m of n rounds: (n - m + 1) / (n + 1))."""
    out = {}
    for d in devices:
        r = records.get(d, Record())
        out[d] = (min(r.answered, r.selected) + 1) / (r.selected + 1)
    return out
