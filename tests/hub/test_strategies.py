"""Aggregation strategies: FedAvg + proximal pull (properties, the batch formula), weight cap, norm bound, median,
trimmed mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.core.aggregators import Aggregator, Bounds, lower_median
from fedge.core.rounds import RoundParams
from fedge.core.strategy import Robust

RNG = np.random.default_rng(0)
PARAMS = RoundParams(min_devices=1, deadline_s=60.0, fraction=1.0, local_epochs=1, lr=0.1)


def _robust(name: str, lam: float, bounds: Bounds | None = None, trim_fraction: float = 0.2) -> Robust:
    return Robust(name, lam, bounds if bounds is not None else Bounds(), trim_fraction)

SHAPES = {"h0_kernel": (3, 2), "h0_bias": (2,)}
LOOSE = Bounds(max_weight_ratio=1e12, max_update_norm=1e300, norm_ceiling=1e300,  # plain FedAvg: no bound bites
               max_weight_share=1.0)


def _head(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


updates_st = st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 1000)), min_size=1, max_size=8)


def _run(lam: float, updates: list[tuple[dict[str, np.ndarray], int]], g: dict[str, np.ndarray],
         w0: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    agg = _robust("fedavg", lam, LOOSE).aggregator(PARAMS, SHAPES, (), RNG)
    for delta, n in updates:
        agg.add(delta, n)
    return agg.result(g, w0)


@settings(max_examples=50, deadline=None)
@given(updates_st, st.floats(0, 10), st.randoms(use_true_random=False))
def test_order_does_not_matter(spec: list[tuple[int, int]], lam: float, shuffler: object) -> None:
    rng = np.random.default_rng(0)
    g, w0 = _head(rng), _head(rng)
    ups = [(_head(np.random.default_rng(s)), n) for s, n in spec]
    perm = list(ups)
    shuffler.shuffle(perm)  # type: ignore[attr-defined]
    a, b = _run(lam, ups, g, w0), _run(lam, perm, g, w0)
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 10**6), min_size=1, max_size=6))
def test_identical_trained_heads_are_a_fixed_point_without_pull(seed: int, counts: list[int]) -> None:
    rng = np.random.default_rng(seed)
    g, w0, delta = _head(rng), _head(rng), _head(rng)
    out = _run(0.0, [(delta, n) for n in counts], g, w0)
    for k in SHAPES:
        np.testing.assert_allclose(out[k], g[k] + delta[k], rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_huge_lambda_pulls_to_w0(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g, w0 = _head(rng), _head(rng)
    out = _run(1e9, [(_head(rng), 5), (_head(rng), 7)], g, w0)
    for k in SHAPES:
        np.testing.assert_allclose(out[k], w0[k], atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 50), st.integers(1, 50))
def test_weighting_by_samples(seed: int, n1: int, n2: int) -> None:
    rng = np.random.default_rng(seed)
    g, w0, d1, d2 = _head(rng), _head(rng), _head(rng), _head(rng)
    out = _run(0.0, [(d1, n1), (d2, n2)], g, w0)
    # an update counted n times equals n copies of weight 1
    copies = _run(0.0, [(d1, 1)] * n1 + [(d2, 1)] * n2, g, w0)
    for k in SHAPES:
        expected = g[k] + (n1 * d1[k].astype(np.float64) + n2 * d2[k]) / (n1 + n2)
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[k], copies[k], rtol=1e-5, atol=1e-5)


def test_streaming_equals_batch_weighted_mean_with_pull() -> None:
    rng = np.random.default_rng(3)
    g, w0 = _head(rng), _head(rng)
    ups = [(_head(rng), int(rng.integers(1, 100))) for _ in range(40)]
    lam = 0.3
    out = _run(lam, ups, g, w0)
    n = sum(c for _, c in ups)
    for k in SHAPES:
        w_bar = g[k] + sum(c * d[k].astype(np.float64) for d, c in ups) / n
        np.testing.assert_allclose(out[k], (w_bar + 2 * lam * w0[k]) / (1 + 2 * lam), rtol=1e-6, atol=1e-6)


def test_invalid_inputs_raise() -> None:
    agg = Aggregator(SHAPES, bounds=LOOSE)
    with pytest.raises(ValueError, match="no update"):
        agg.result(_head(np.random.default_rng(0)), _head(np.random.default_rng(1)))
    with pytest.raises(ValueError, match="n_samples"):
        agg.add(_head(np.random.default_rng(0)), 0)
    with pytest.raises(ValueError, match="names"):
        agg.add({"h0_kernel": np.zeros((3, 2), np.float32)}, 1)
    with pytest.raises(ValueError):
        _robust("fedavg", -1.0)
    with pytest.raises(ValueError, match="unknown"):
        _robust("krum", 0.0)
    with pytest.raises(ValueError, match="trim_fraction"):
        _robust("trimmed_mean", 0.0, trim_fraction=0.5)
    with pytest.raises(ValueError, match="max_weight_ratio"):
        Bounds(max_weight_ratio=0.5)


def _const(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


DIM = sum(int(np.prod(s)) for s in SHAPES.values())


def test_lower_median_ignores_the_larger_of_two() -> None:
    assert lower_median([1.0, 1e30]) == 1.0
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([4, 1, 3, 2]) == 2.0


def test_weight_is_capped_at_a_multiple_of_the_median_count() -> None:
    g = _const(0.0)
    agg = _robust("fedavg", 0.0, Bounds(max_weight_ratio=2.0, max_update_norm=1e9, norm_ceiling=1e9,
                                        max_weight_share=1.0)).aggregator(PARAMS, SHAPES, (), RNG)
    for value, n in [(1.0, 10), (1.0, 10), (1.0, 10), (-1.0, 10**9)]:
        agg.add(_const(value), n)
    out = agg.result(g, g)
    # the liar weighs 2 x 10 = 20 against 30: (30 - 20) / 50
    np.testing.assert_allclose(out["h0_bias"], 0.2, rtol=1e-6)
    assert agg.summary is not None and agg.summary.weight_cap == 20.0 and agg.summary.capped == 1


def test_updates_above_the_norm_bound_are_clipped_not_dropped() -> None:
    g = _const(0.0)
    agg = _robust("fedavg", 0.0, Bounds(max_update_norm=1.0)).aggregator(PARAMS, SHAPES, (), RNG)
    agg.add(_const(10.0), 5)  # norm 10 sqrt(DIM): clipped to 1
    agg.add(_const(0.0), 5)
    out = agg.result(g, g)
    np.testing.assert_allclose(out["h0_bias"], 0.5 / np.sqrt(DIM), rtol=1e-6)
    assert agg.summary is not None and agg.summary.clipped == 1 and agg.summary.norm_bound == 1.0


@pytest.mark.parametrize("history", [(), (1.0,) * 20])
def test_auto_bound_is_a_multiple_of_the_lower_median_norm_capped_by_the_ceiling(history: tuple[float, ...]) -> None:
    b = Bounds(norm_multiplier=3.0, norm_ceiling=50.0)
    norms = [1.0, 1.0, 1.0, 1e30]
    assert b.norm_bound(norms, history) == 3.0
    assert b.norm_bound([1e30], ()) == 50.0  # one device alone: the ceiling
    assert b.norm_bound([20.0] * 3, history) == (3.0 if history else 50.0)  # a long honest history holds
    assert Bounds(max_update_norm=7.0, norm_ceiling=5.0).norm_bound(norms) == 5.0
    assert b.norm_bound([0.0, 2.0], ()) == 6.0, "a zero update does not freeze the bound at 0"
    assert b.norm_bound([0.0, 0.0], ()) == 50.0


@pytest.mark.parametrize("name", ["fedavg", "median", "trimmed_mean"])
def test_no_strategy_moves_the_head_further_than_the_bound(name: str) -> None:
    rng = np.random.default_rng(5)
    g = _head(rng)
    agg = _robust(name, 0.0, Bounds(max_update_norm=0.5)).aggregator(PARAMS, SHAPES, (), RNG)
    for _ in range(5):
        agg.add({k: v * 100 for k, v in _head(rng).items()}, int(rng.integers(1, 10**9)))
    out = agg.result(g, g)
    moved = np.sqrt(sum(np.sum((out[k].astype(np.float64) - g[k]) ** 2) for k in SHAPES))
    assert moved <= 0.5 * (1 + 1e-6) + 1e-6


def test_median_and_trimmed_mean_ignore_a_minority_of_outliers() -> None:
    g = _const(0.0)
    loose = Bounds(max_update_norm=1e9, norm_ceiling=1e9)
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    med = _robust("median", 0.0, loose).aggregator(PARAMS, SHAPES, (), RNG)
    trim = _robust("trimmed_mean", 0.0, loose, trim_fraction=0.2).aggregator(PARAMS, SHAPES, (), RNG)
    for v in values:
        med.add(_const(v), 1)
        trim.add(_const(v), 10**6 if v == 1000.0 else 1)  # sample counts play no part
    np.testing.assert_allclose(med.result(g, g)["h0_kernel"], 3.0)
    np.testing.assert_allclose(trim.result(g, g)["h0_kernel"], 3.0)  # mean of 2, 3, 4
    untrimmed = _robust("trimmed_mean", 0.0, loose, trim_fraction=0.1).aggregator(PARAMS, SHAPES, (), RNG)
    for v in values:  # floor(0.1 x 5) = 0: nothing trimmed
        untrimmed.add(_const(v), 1)
    np.testing.assert_allclose(untrimmed.result(g, g)["h0_kernel"], sum(values) / 5, rtol=1e-6)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_strategies_keep_the_proximal_pull(name: str) -> None:
    rng = np.random.default_rng(9)
    g, w0 = _head(rng), _head(rng)
    agg = _robust(name, 0.5, Bounds(max_update_norm=1e9, norm_ceiling=1e9)).aggregator(PARAMS, SHAPES, (), RNG)
    for _ in range(3):
        agg.add(_const(1.0), 1)
    out = agg.result(g, w0)
    for k in SHAPES:  # lambda 0.5: (w_bar + w0) / 2
        np.testing.assert_allclose(out[k], (g[k].astype(np.float64) + 1.0 + w0[k]) / 2, rtol=1e-6, atol=1e-6)


def test_an_aggregate_beyond_float32_is_returned_as_inf_without_a_warning() -> None:
    big = float(np.finfo(np.float32).max)
    g = _const(big)
    agg = _robust("fedavg", 0.0, Bounds(max_update_norm=1e300, norm_ceiling=1e300)).aggregator(PARAMS, SHAPES, (), RNG)
    agg.add(_const(big), 1)
    agg.add(_const(big), 1)
    out = agg.result(g, g)  # finite deltas, finite head: the sum does not fit float32 (the hub refuses it)
    assert not np.isfinite(out["h0_kernel"]).any()
