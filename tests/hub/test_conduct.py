"""The exclusion policy (fedge.core.conduct): strikes, exclusions that double, exclusion for good, readmission."""

from __future__ import annotations

from fedge.core.conduct import ConductPolicy, Offence, Standing, after_good_round, after_offence, excluded, readmitted

POLICY = ConductPolicy(strikes=2, rounds=5, max_exclusions=2)


def test_strikes_exclude_for_longer_each_time_then_for_good() -> None:
    s = after_offence(Standing(), Offence.BAD_SHARES, 10, POLICY)
    assert s.strikes == 1 and not excluded(s, 11)
    s = after_offence(s, Offence.BAD_SHARES, 11, POLICY)
    assert excluded(s, 12) and excluded(s, 16) and not excluded(s, 17)  # rounds 12..16
    assert after_offence(s, Offence.STALLED, 13, POLICY) == s  # an excluded device's offences add nothing
    for rid in (20, 21):
        s = after_offence(s, Offence.STALLED, rid, POLICY)
    assert s.exclusions == 2 and excluded(s, 31) and not excluded(s, 32)  # 10 rounds the second time
    for rid in (40, 41):
        s = after_offence(s, Offence.BAD_UNMASK, rid, POLICY)
    assert s.permanent and excluded(s, 10**6)
    back = readmitted(s)
    assert not excluded(back, 42) and back.exclusions == 3


def test_a_good_round_takes_a_strike_away_but_not_in_the_round_of_the_offence() -> None:
    s = after_offence(Standing(), Offence.BAD_UNMASK, 3, POLICY)
    assert after_good_round(s, 3) == s
    assert after_good_round(s, 4).strikes == 0
