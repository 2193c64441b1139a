"""Bounded influence of any one device by default (issue 21, item 1): a share cap on each update's weight, sample
counts checked against what the device registered, updates clipped to a typical norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.core.aggregators import Aggregator, Bounds, share_cap
from fedge.protocol.messages import Ack, ModelHead, Reject, RejectReason, RoundStatus
from tests.hub.fleet import SHAPES, TOPICS, hub_config, run_hub, zero_delta


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1, 1e12), min_size=1, max_size=12), st.floats(0.01, 1.0))
def test_no_capped_weight_exceeds_its_share_and_the_cap_is_the_largest_that_holds(counts: list[float],
                                                                                  share: float) -> None:
    cap = share_cap(counts, share)
    capped = [min(c, cap) for c in counts]
    n = len(counts)
    assert max(capped) <= max(share, 1 / n) * sum(capped) * (1 + 1e-9)
    assert all(w <= c for w, c in zip(capped, counts, strict=True))
    if cap < max(counts) and share * n > 1:  # a larger cap breaks the share (water-filling is tight)
        more = [min(c, cap * 1.001) for c in counts]
        assert max(more) > share * sum(more)


def test_equal_counts_are_left_alone_and_an_impossible_share_gives_equal_weights() -> None:
    assert share_cap([5, 5, 5, 5], 0.25) == np.inf
    assert share_cap([100, 1], 0.25) == 1.0  # two updates cannot be held below a half each: equal weights


@pytest.mark.parametrize(("share", "expected"), [(0.25, 0.5), (1.0, 0.0)])
def test_a_device_claiming_a_billion_samples_beside_four_honest_ones_gets_a_quarter(share: float,
                                                                                    expected: float) -> None:
    """Four honest devices move +1, the liar -1 with 10^9 samples. The weight cap alone (share 1.0, the old
    behaviour) gives the liar 4 x the median count: half of the round, so the round moves nowhere; the share cap
    holds it at a quarter."""
    bounds = Bounds(max_update_norm=10.0, norm_ceiling=10.0, max_weight_share=share)
    agg = Aggregator(SHAPES, 0.0, bounds)
    for _ in range(4):
        agg.add(zero_delta(SHAPES, 1.0), 100)
    agg.add(zero_delta(SHAPES, -1.0), 10**9)
    out = agg.mean_delta()
    np.testing.assert_allclose(out["h1_bias"], expected, atol=1e-9)
    assert agg.summary is not None and agg.summary.capped == 1


def test_an_update_claiming_more_samples_than_its_device_registered_is_rejected(tmp_path: Path,
                                                                                 artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 2})
    for fleet in run_hub(cfg):
        for name in ("a", "b"):
            fleet.device(name).hello(n_samples=100)
        rnd = fleet.start_round()
        a, b = fleet.device("a"), fleet.device("b")
        a.update(rnd, zero_delta(SHAPES, 0.1), n=10**6)  # more than its presence said
        [rej] = a.inbox
        assert isinstance(rej, Reject) and rej.reason is RejectReason.BAD_SAMPLES
        assert "registered" in rej.detail and "100" in rej.detail
        a.update(rnd, zero_delta(SHAPES, 0.1), n=80)  # its training rows: fine
        b.update(rnd, zero_delta(SHAPES, 0.1), n=80)
        assert isinstance(a.inbox[-1], Ack)
        [res] = fleet.results
        assert res.status is RoundStatus.COMPLETED and res.n_samples == 160 and res.rejected == 1
        assert fleet.hub.store.reject_counts() == {"bad_samples": 1}


def test_by_default_a_long_update_is_clipped_to_a_typical_one(tmp_path: Path, artifacts: Path) -> None:
    """The default "auto" bound is the median norm (norm_multiplier 1): one device sending a 100x longer update
    moves the head no further than an honest device would."""
    cfg = hub_config(tmp_path / "state", artifacts, devices=["a", "b", "c", "evil"],
                     aggregation={"proximal_lambda": 0.0})
    for fleet in run_hub(cfg):
        before = fleet.hub.registry.load_head("v0")
        rnd = fleet.start_round()
        for d in ("a", "b", "c"):
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=10)
        fleet.device("evil").update(rnd, zero_delta(SHAPES, -1.0), n=10)
        head = fleet.retained(TOPICS.model_head)
        assert isinstance(head, ModelHead)
        moved = {k: np.asarray(head.head[k], np.float64) - before[k] for k in SHAPES}
        # each device a quarter; the attacker clipped to the honest length: (3 x 0.01 - 0.01) / 4
        np.testing.assert_allclose(moved["h1_bias"], 0.005, rtol=1e-4)
