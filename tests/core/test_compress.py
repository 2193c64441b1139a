"""Compressed updates: the codes round-trip, rounding is unbiased, error feedback carries what rounding lost, and
hostile codes are refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.core.compress import SCALES, compress, decompress

SHAPES = {"h0_kernel": (7, 5), "h0_bias": (5,), "h1_kernel": (5, 3), "h1_bias": (3,)}


def _delta(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("mode,step", [("int8", 1 / 127), ("int4", 1 / 7)])
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-6, 1e3))
@settings(max_examples=40, deadline=None)
def test_codes_round_trip_within_one_step(mode: str, step: float, seed: int, scale: float) -> None:
    delta = _delta(seed, scale)
    codes, left = compress(delta, mode, np.random.default_rng(seed))
    back = decompress(codes, SHAPES, mode)
    for k, v in delta.items():
        peak = float(np.abs(v).max())
        assert np.abs(back[k] - v).max() <= peak * step * 1.0001 + 1e-12  # within one quantisation step
        np.testing.assert_allclose(back[k] + left[k], v, rtol=1e-5, atol=peak * 1e-6)  # the residual is the rest


def test_int4_is_half_a_byte_per_value_and_rounding_is_unbiased() -> None:
    delta = {"h0_kernel": np.full((64, 32), 0.3, np.float32)}  # 0.3 of a peak 1.0: between two codes
    delta["h0_kernel"][0, 0] = 1.0
    codes, _ = compress(delta, "int4", np.random.default_rng(0))
    assert codes["h0_kernel"].nbytes == 64 * 32 // 2 and codes[SCALES].dtype == np.float32
    means = [decompress(compress(delta, "int4", np.random.default_rng(s))[0], {"h0_kernel": (64, 32)},
                        "int4")["h0_kernel"][1:, :].mean() for s in range(50)]
    assert abs(float(np.mean(means)) - 0.3) < 0.003  # stochastic rounding: unbiased, not 2/7 or 3/7


def test_error_feedback_sends_what_rounding_lost_later() -> None:
    delta = {"w": np.full(1000, 0.01, np.float32)}
    delta["w"][0] = 1.0  # the peak sets the step at 1/7: 0.01 rounds to 0 most of the time
    total = np.zeros(1000)
    residual = None
    for r in range(200):
        codes, residual = compress(delta, "int4", np.random.default_rng(r), residual)
        total += decompress(codes, {"w": (1000,)}, "int4")["w"]
    np.testing.assert_allclose(total[1:] / 200, 0.01, atol=0.002)  # nothing is lost for good


@pytest.mark.parametrize("bad", ["missing", "scales", "size", "code"])
def test_hostile_codes_are_refused_with_a_reason(bad: str) -> None:
    codes, _ = compress(_delta(1), "int4", np.random.default_rng(0))
    if bad == "missing":
        del codes["h1_bias"]
    elif bad == "scales":
        codes[SCALES] = np.array([np.inf, 1, 1, 1], np.float32)
    elif bad == "size":
        codes["h0_bias"] = np.zeros(9, np.uint8)
    else:
        codes["h0_kernel"] = np.full_like(codes["h0_kernel"], 0xFF)  # nibble 15 > 2 * 7
    with pytest.raises(ValueError):
        decompress(codes, SHAPES, "int4")
