"""Streaming FedAvg + proximal pull: properties, equality with the batch formula, speed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.hub.strategies import Aggregator, FedAvgProx

SHAPES = {"h0_kernel": (3, 2), "h0_bias": (2,)}


def _head(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


updates_st = st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 1000)), min_size=1, max_size=8)


def _run(lam: float, updates: list[tuple[dict[str, np.ndarray], int]], g: dict[str, np.ndarray],
         w0: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    agg = FedAvgProx(lam).aggregator(SHAPES)
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
    agg = Aggregator(SHAPES)
    with pytest.raises(ValueError, match="no update"):
        agg.result(_head(np.random.default_rng(0)), _head(np.random.default_rng(1)))
    with pytest.raises(ValueError, match="n_samples"):
        agg.add(_head(np.random.default_rng(0)), 0)
    with pytest.raises(ValueError, match="names"):
        agg.add({"h0_kernel": np.zeros((3, 2), np.float32)}, 1)
    with pytest.raises(ValueError):
        FedAvgProx(-1.0)


def test_aggregation_uses_constant_memory() -> None:
    """Streaming: 1,000 updates reuse the same sum buffers (throughput is measured in bench/round_overhead.py)."""
    shapes = {"h0_kernel": (1000, 100)}
    agg = Aggregator(shapes, 0.1)
    rng = np.random.default_rng(0)
    deltas = [{"h0_kernel": rng.normal(size=(1000, 100)).astype(np.float32)} for _ in range(4)]
    buffers_before = {id(a) for a in agg._sums.values()}
    for i in range(1000):
        agg.add(deltas[i % 4], 10 + i % 7)
    assert {id(a) for a in agg._sums.values()} == buffers_before
    assert agg.count == 1000
