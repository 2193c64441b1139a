"""Clipping, noise, accounting, sampling and the device's own ledger (fedge.core.privacy / ledger)."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.core.aggregators import DpAggregator
from fedge.core.privacy import (
    DpEvent,
    DpParams,
    clip_update,
    epsilon,
    event_for,
    l2_norm,
    noise_for_epsilon,
    privatize,
)
from fedge.core.rounds import poisson_select
from fedge.edge_agent.config import DevicePrivacy
from fedge.edge_agent.ledger import DeviceLedger, decline_reason
from fedge.protocol.messages import DeclineReason

SHAPES = {"w": (300, 100), "b": (100,)}


def _delta(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-4, 1e3), clip=st.floats(1e-3, 100.0), seed=st.integers(0, 2**16))
def test_every_clipped_update_is_within_c(scale: float, clip: float, seed: int) -> None:
    delta = _delta(np.random.default_rng(seed), scale)
    clipped, norm = clip_update(delta, clip)
    assert norm == pytest.approx(l2_norm(delta))
    assert l2_norm(clipped) <= clip * (1 + 1e-5)
    if norm <= clip:  # already within: unchanged
        for k in delta:
            np.testing.assert_array_equal(clipped[k], delta[k])
    else:  # scaled, direction kept
        assert l2_norm(clipped) == pytest.approx(clip, rel=1e-4)
        np.testing.assert_allclose(clipped["b"] * (norm / clip), delta["b"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("mode", "z", "clip", "m", "std"), [
    ("local", 1.0, 2.0, 1, 2.0),
    ("local", 0.5, 1.0, 1, 0.5),
    ("distributed", 1.0, 2.0, 17, 0.5),   # zC / sqrt(m - 1)
    ("central", 1.0, 2.0, 1, 0.0),        # the hub adds it, not the device
])
def test_device_noise_has_the_announced_scale(mode: str, z: float, clip: float, m: int, std: float) -> None:
    """On 30,100 coordinates the sample std of (private - clipped) must be std within 2 % (its own standard error
    is std/sqrt(2n) ≈ 0.4 %), the mean near 0, and the noise must differ between calls."""
    params = DpParams(mode, z, clip, 0.1, m)
    delta = _delta(np.random.default_rng(0), 1e-3)  # well within C: the clipped update is the update
    private, _ = privatize(delta, params, np.random.default_rng(1))
    noise = np.concatenate([(private[k].astype(np.float64) - delta[k]).ravel() for k in SHAPES])
    if std == 0:
        assert np.abs(noise).max() < 1e-6
        return
    n = noise.size
    assert abs(noise.std() / std - 1) < 0.02
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    again, _ = privatize(delta, params, np.random.default_rng(2))
    assert not np.allclose(again["w"], private["w"])


def _reference_epsilon(z: float, q: float, rounds: int, delta: float, amplified: bool) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if amplified:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def test_ledger_epsilon_reproduces_dp_accounting() -> None:
    eps = epsilon([DpEvent(1.0, 0.1, True)] * 100, 1e-5)
    assert eps == pytest.approx(7.9, abs=0.01)  # platform.md: z = 1, q = 0.1, 100 rounds, delta 1e-5
    assert eps == pytest.approx(_reference_epsilon(1.0, 0.1, 100, 1e-5, True), rel=1e-9)
    # one unamplified Gaussian round of z = 1 is ~4.7
    assert epsilon([DpEvent(1.0)], 1e-5) == pytest.approx(_reference_epsilon(1.0, 1.0, 1, 1e-5, False), rel=1e-9)
    assert epsilon([DpEvent(1.0)], 1e-5) == pytest.approx(4.73, abs=0.01)
    # mixed rounds compose
    mixed = [DpEvent(1.0, 0.1, True)] * 50 + [DpEvent(2.0, 0.1, True)] * 50
    assert epsilon([DpEvent(1.0, 0.1, True)] * 50, 1e-5) < epsilon(mixed, 1e-5) < eps
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([DpEvent(0.0)], 1e-5) == math.inf


def test_events_amplify_only_when_trusted_and_local_mode_counts_replacement() -> None:
    central = DpParams("central", 1.0, 1.0, 0.1)
    assert event_for(central, trust_sampling=True) == DpEvent(1.0, 0.1, True)
    assert event_for(central, trust_sampling=False) == DpEvent(1.0, 1.0, False)
    # local: the hub sees each update; replacing a device's data moves its clipped update by up to 2C -> z/2
    assert event_for(DpParams("local", 1.0, 1.0, 0.1), trust_sampling=True) == DpEvent(0.5, 1.0, False)


def test_noise_for_epsilon_inverts_the_accountant() -> None:
    z = noise_for_epsilon(4.0, 1e-5, rounds=20, sample_rate=0.1)
    assert epsilon([DpEvent(z, 0.1, True)] * 20, 1e-5) <= 4.0
    assert epsilon([DpEvent(z * 0.98, 0.1, True)] * 20, 1e-5) > 4.0


def test_poisson_sampling_selects_each_device_with_probability_q() -> None:
    devices = [f"d{i:03d}" for i in range(1000)]
    sizes = [len(poisson_select(devices, 0.1, seed=7, round_id=r)) for r in range(1, 51)]
    assert len(set(sizes)) > 5  # the cohort size is random, not fixed
    assert np.mean(sizes) == pytest.approx(100, rel=0.05)
    counts: dict[str, int] = {}
    for r in range(1, 51):
        for d in poisson_select(devices, 0.1, seed=7, round_id=r):
            counts[d] = counts.get(d, 0) + 1
    assert np.mean([counts.get(d, 0) for d in devices]) == pytest.approx(5, rel=0.05)
    assert poisson_select(devices, 0.1, 7, 3) == poisson_select(devices, 0.1, 7, 3)  # reproducible for a seed
    # the hub passes a generator seeded by the operating system: cohorts nobody can predict
    unpredictable = [poisson_select(devices, 0.1, np.random.default_rng()) for _ in range(2)]
    assert unpredictable[0] != unpredictable[1]


def test_dp_aggregator_uses_uniform_weights_a_fixed_denominator_and_central_noise() -> None:
    shapes = {"w": (200, 100)}
    params = DpParams("central", 0.0 + 1e-12, 1.0, 0.1)
    agg = DpAggregator(shapes, 0.0, params, expected_cohort=4.0, rng=np.random.default_rng(0))
    agg.add({"w": np.full((200, 100), 1e-4, np.float32)}, n_samples=1000)   # n ignored
    agg.add({"w": np.full((200, 100), 5.0, np.float32)}, n_samples=1)       # re-clipped to C = 1
    mean = agg.mean_delta()["w"]
    clipped = 1.0 / math.sqrt(200 * 100)  # every coordinate of the second update, clipped to norm C = 1
    np.testing.assert_allclose(mean, (1e-4 + clipped) / 4.0, rtol=1e-5)  # divided by 4, not 2, not by samples
    noisy = DpAggregator(shapes, 0.0, DpParams("central", 2.0, 1.0, 0.1), expected_cohort=10.0,
                         rng=np.random.default_rng(1))
    noisy.add({"w": np.zeros((200, 100), np.float32)}, 1)
    assert noisy.mean_delta()["w"].std() == pytest.approx(2.0 * 1.0 / 10.0, rel=0.03)  # zC on the sum / (qN)


def test_device_ledger_declines_and_survives(tmp_path: Path) -> None:
    policy = DevicePrivacy(epsilon_budget=20.0, delta=1e-5, min_noise_multiplier=0.8, max_clip=2.0,
                           modes=("local", "central"))
    ledger = DeviceLedger(tmp_path / "privacy.json")
    local = DpParams("local", 2.0, 1.0, 0.1)
    assert decline_reason(policy, local, ledger) is None
    assert decline_reason(policy, None, ledger).reason is DeclineReason.DP_REQUIRED  # type: ignore[union-attr]
    assert decline_reason(None, None, ledger) is None  # a device without [privacy] takes any round
    assert decline_reason(policy, DpParams("local", 0.5, 1.0), ledger).reason is DeclineReason.NOISE_BELOW_FLOOR  # type: ignore[union-attr]
    assert decline_reason(policy, DpParams("local", 1.0, 5.0), ledger).reason is DeclineReason.CLIP_ABOVE_CEILING  # type: ignore[union-attr]
    assert decline_reason(policy, DpParams("distributed", 1.0, 1.0), ledger).reason is DeclineReason.MODE_NOT_ALLOWED  # type: ignore[union-attr]
    # distributed is declined even by a device without a policy: its own update carries only zC/sqrt(m)
    assert decline_reason(None, DpParams("distributed", 1.0, 1.0), ledger).reason is DeclineReason.MODE_NOT_ALLOWED  # type: ignore[union-attr]
    # ... unless the round is a secure-aggregation round: the hub then sees only the sum
    assert decline_reason(None, DpParams("distributed", 1.0, 1.0), ledger, secure=True) is None
    ledger.record(1, local)
    ledger.record(2, local)
    # local mode: two unamplified Gaussian rounds, charged at z/2 (replacement adjacency)
    assert ledger.epsilon(1e-5) == pytest.approx(_reference_epsilon(1.0, 1.0, 2, 1e-5, False), rel=1e-9)
    reopened = DeviceLedger(tmp_path / "privacy.json")
    assert reopened.entries == ledger.entries and reopened.entries[0].noise_std == 2.0
    n = 2
    while decline_reason(policy, local, reopened) is None:
        reopened.record(n + 1, local)
        n += 1
    refused = decline_reason(policy, local, reopened)
    assert refused is not None and refused.reason is DeclineReason.BUDGET_EXHAUSTED and "budget 20" in refused.detail
    assert reopened.epsilon(1e-5) <= 20.0 < reopened.epsilon(1e-5, local)
    (tmp_path / "privacy.json").write_text("{not json")
    with pytest.raises(ValueError, match="refusing to reset"):
        DeviceLedger(tmp_path / "privacy.json")
