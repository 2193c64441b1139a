"""``fedge.simulate_async``: synchronous rounds against buffered aggregation on a fleet whose devices come and go,
with real training on the demo task's data (a small source model). Checks are on what the runs did: who made each
version, when devices were online, what the gate deployed."""

from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest

from fedge.demo import DemoPaths
from fedge.simulate import SimFleet, load_fleet
from fedge.simulate_async import (
    AsyncSettings,
    Availability,
    HeldOut,
    Jobs,
    Trace,
    run_buffered,
    run_sync,
    time_to_target,
)

DEVICES = 30


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> SimFleet:
    from fedge.export.testing import export_small

    paths = DemoPaths(tmp_path_factory.mktemp("simulate_async"))
    export_small(paths.artifacts, trained=True)
    paths.source_model.write_bytes(b"")  # a placeholder: prepare keeps the small source model
    return load_fleet(paths, DEVICES, seed=0)


def test_availability_spells_alternate_and_cover_the_online_share() -> None:
    settings = AsyncSettings(online_share=0.3, seed=3)
    av = Availability(200, settings, horizon=2_000.0)
    online = 0.0
    for spells in av.spells:
        for (s0, e0), (s1, _) in pairwise(spells):
            assert s0 < e0 < s1  # an offline gap between online spells
        online += sum(min(e, 2_000.0) - s for s, e in spells)
    assert online / (200 * 2_000.0) == pytest.approx(0.3, abs=0.03)
    s, e = av.spells[0][0]
    assert av.online_until(0, (s + e) / 2) == e
    assert av.next_online(0, e) == (av.spells[0][1][0] if len(av.spells[0]) > 1 else None)


def test_jobs_are_the_same_sequence_per_device_in_both_modes() -> None:
    settings = AsyncSettings(seed=5)
    a, b = Jobs(4, settings), Jobs(4, settings)
    first = [a.next(2) for _ in range(3)]
    b.next(0), b.next(1)  # other devices' draws do not shift device 2's
    assert [b.next(2) for _ in range(3)] == first
    assert all(x > 0 for x in first)


def test_time_to_target_needs_the_curve_to_stay() -> None:
    trace = Trace(points=[(0.0, 0.1), (1.0, 0.62), (2.0, 0.55), (3.0, 0.61), (4.0, 0.64)])
    assert time_to_target(trace, 0.62) == 4.0  # 1.0 was a lucky crossing: it fell 7 points after
    assert time_to_target(trace, 0.60) == 3.0  # 0.61 reached it and the rest stayed within a point
    assert time_to_target(trace, 0.70) == math.inf


def test_buffered_versions_come_from_k_distinct_devices_once_per_version(fleet: SimFleet) -> None:
    settings = AsyncSettings(k=5, rounds=6, seed=1)
    av = Availability(DEVICES, settings, horizon=1e4)
    held_out = HeldOut(fleet, 1)
    sync = run_sync(fleet, settings, av, held_out)
    buffered = run_buffered(fleet, settings, av, held_out, horizon=sync.end)
    assert len(buffered.made) >= 3
    for senders in buffered.made:
        assert len(senders) == settings.k
        assert len(set(senders)) == settings.k, senders  # distinct devices
    assert buffered.updates >= sum(len(m) for m in buffered.made)  # the rest are in the unfilled buffer
    # every made version is deployed or held back; each deployed one has a measured point
    assert len(buffered.points) - 1 + buffered.held_back == len(buffered.made)
    assert all(t <= sync.end for t, _ in buffered.points)
    # the synchronous run's rounds are cohorts of distinct devices, over-selected as the hub does by default
    assert all(len(set(m)) == len(m) <= math.ceil(settings.k * (1 + settings.over_select)) for m in sync.made)
    assert buffered.refused == 0  # a device trains again only on a version later than the one its update went to
    # buffered aggregation gets more updates in than synchronous rounds in the same simulated time
    assert buffered.updates > sync.updates


def test_the_gate_holds_back_only_when_on(fleet: SimFleet) -> None:
    held_out = HeldOut(fleet, 2)
    assert len(set(held_out.gate.tolist()) & set(held_out.measure.tolist())) == 0
    off = AsyncSettings(k=5, rounds=6, seed=2, deploy_tolerance=None)
    av = Availability(DEVICES, off, horizon=1e4)
    sync = run_sync(fleet, off, av, held_out)
    assert sync.held_back == 0 and len(sync.points) - 1 == len(sync.made)
    strict = AsyncSettings(k=5, rounds=6, seed=2, deploy_tolerance=-1.0)  # only a version 1.0 better may deploy
    gated = run_buffered(fleet, strict, av, held_out, horizon=sync.end)
    assert len(gated.points) == 1 and gated.held_back == len(gated.made) >= 1
    # held back: its devices train again on the deployed version (the hub's next buffer_attempt), so the run does
    # not stall once every device has trained on it: more versions than the devices could make once each
    per_device = Counter(d for m in gated.made for d in m)
    assert max(per_device.values()) > 1
    assert len(gated.made) > DEVICES // strict.k
    assert all(len(set(m)) == len(m) == strict.k for m in gated.made)  # still k distinct devices per version
    assert gated.points[0][1] == pytest.approx(held_out.accuracy(fleet.w0, held_out.measure))
    assert np.isfinite(gated.points[0][1])


def test_a_retry_after_a_held_back_version_is_not_the_same_update(fleet: SimFleet) -> None:
    """A buffered round's retry (a higher ``buffer_attempt`` on the same version) shuffles the device's data
    differently: the same update again would make the same held-back version again."""
    from fedge.simulate_async import _update

    settings = AsyncSettings(k=5, seed=4)
    first = _update(fleet, 3, fleet.w0, 0, settings, attempt=0)
    again = _update(fleet, 3, fleet.w0, 0, settings, attempt=0)
    retry = _update(fleet, 3, fleet.w0, 0, settings, attempt=1)
    assert first is not None and again is not None and retry is not None
    assert all(np.array_equal(first[0][k], again[0][k]) for k in first[0])  # deterministic per attempt
    assert any(not np.array_equal(first[0][k], retry[0][k]) for k in first[0])
