"""The hub under DP (in-memory broker): announced parameters, Poisson cohorts, the DP-FedAvg estimator, the
ledger, budget refusal across restarts, and declines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.edge_agent.privacy import DpEvent, epsilon, l2_norm
from fedge.protocol.codec import encode
from fedge.protocol.errors import ConfigError
from fedge.protocol.manifest import load_head
from fedge.protocol.messages import Decline, DeclineReason, RoundResult, RoundStatus
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, iter_hub, zero_delta

DEVICES = [f"d{i:02d}" for i in range(12)]


def _cfg(tmp_path: Path, artifacts: Path, **privacy: object):  # type: ignore[no-untyped-def]
    table = {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 0.5, "delta": 1e-5, **privacy}
    return hub_config(tmp_path / "state", artifacts, privacy=table, rounds={"min_devices": 1},
                      aggregation={"proximal_lambda": 0.0})


def _hello(fleet: Fleet) -> None:
    for d in DEVICES:
        fleet.device(d).hello()


def test_distributed_mode_is_refused_until_secure_aggregation_exists(tmp_path: Path, artifacts: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, artifacts, mode="distributed")
    assert info.value.field == "privacy.mode" and "secure aggregation" in str(info.value)


def test_central_round_announces_dp_and_uses_the_fixed_denominator(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, noise_multiplier=1e-6))
    fleet = next(gen)
    try:
        _hello(fleet)
        rnd = fleet.start_round()
        assert (rnd.dp_mode, rnd.dp_noise_multiplier, rnd.dp_clip, rnd.dp_sample_rate) == ("central", 1e-6, 1.0, 0.5)
        assert 0 < len(rnd.selected) < len(DEVICES)  # Poisson cohort of 12 devices at q = 0.5 (seeded)
        big = zero_delta(SHAPES, 10.0)  # norm far above C = 1: the hub re-clips
        for d in rnd.selected:
            fleet.device(d).update(rnd, big, n=1000)
        (res,) = fleet.results
        assert res.status is RoundStatus.COMPLETED and res.epsilon is not None and res.epsilon > 0
        new = fleet.hub.registry.load_head(res.model_version or "")
        w0 = load_head(artifacts)
        step = {k: new[k].astype(np.float64) - w0[k] for k in SHAPES}
        expected_cohort = 0.5 * len(DEVICES)
        # every update clipped to norm 1, uniform weights, sum divided by q*N = 6 (not by the cohort, not by n)
        assert l2_norm(step) == pytest.approx(len(rnd.selected) / expected_cohort, rel=1e-3)
        (row,) = fleet.hub.store.ledger()
        assert (row.round, row.mode, row.cohort, row.expected_cohort) == (1, "central", len(rnd.selected), 6.0)
        assert row.epsilon == pytest.approx(epsilon([DpEvent(1e-6, 0.5, True)], 1e-5)) == res.epsilon
    finally:
        gen.close()


def test_budget_refuses_the_round_past_it_and_survives_a_restart(tmp_path: Path, artifacts: Path) -> None:
    one, two, three = (epsilon([DpEvent(1.0, 0.5, True)] * k, 1e-5) for k in (1, 2, 3))
    budget = (two + three) / 2
    cfg = _cfg(tmp_path, artifacts, epsilon_budget=budget)
    gen = iter_hub(cfg)
    fleet = next(gen)
    try:
        _hello(fleet)
        for _ in range(2):
            rnd = fleet.start_round()
            for d in rnd.selected:
                fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01))
            if not rnd.selected:
                fleet.advance(31)
        fleet.control(b"{}")
        refused = fleet.results[-1]
        assert refused.status is RoundStatus.REFUSED_BUDGET and refused.round == 3
        assert refused.detail is not None and "budget" in refused.detail and f"{three:.3f}" in refused.detail
        assert TOPICS.announce not in fleet.broker.retained
        assert [r.epsilon for r in fleet.hub.store.ledger()] == pytest.approx([one, two])
    finally:
        gen.close()
    gen = iter_hub(cfg)  # a restarted hub reads the same ledger: still refused
    fleet = next(gen)
    try:
        _hello(fleet)
        fleet.control(b"{}")
        last = fleet.retained(TOPICS.result)
        assert isinstance(last, RoundResult) and last.status is RoundStatus.REFUSED_BUDGET and last.round == 4
        assert fleet.hub.epsilon_spent() == pytest.approx(two)
    finally:
        gen.close()


def test_a_decline_closes_the_round_without_waiting(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, sample_rate=1.0))
    fleet = next(gen)
    try:
        _hello(fleet)
        rnd = fleet.start_round()
        assert rnd.selected == tuple(DEVICES)
        *rest, last = rnd.selected
        for d in rest:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01))
        assert fleet.results == []
        # hostile declines are counted, not obeyed: for another device, for another round, garbage
        fleet.device("d00").transport.publish(TOPICS.decline(last), encode(
            Decline("f1", rnd.round, "d00", DeclineReason.BUDGET_EXHAUSTED)))
        fleet.device(last).transport.publish(TOPICS.decline(last), encode(
            Decline("f1", rnd.round + 5, last, DeclineReason.BUDGET_EXHAUSTED)))
        fleet.device(last).transport.publish(TOPICS.decline(last), b"\x00garbage")
        assert fleet.results == []
        fleet.device(last).transport.publish(TOPICS.decline(last), encode(
            Decline("f1", rnd.round, last, DeclineReason.BUDGET_EXHAUSTED, "epsilon 8.1 > 8")))
        (res,) = fleet.results
        assert res.status is RoundStatus.COMPLETED and res.declined == (last,)
        assert set(res.devices) == set(rest)
        assert sum(fleet.hub.store.reject_counts().values()) == 3
        assert fleet.hub.store.decline_counts() == {"budget_exhausted": 1}
    finally:
        gen.close()
