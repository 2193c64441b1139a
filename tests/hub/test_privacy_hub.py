"""The hub under DP (in-memory broker): announced parameters, Poisson cohorts of DP-capable devices, the DP-FedAvg
estimator, the ledger, budget refusal across restarts, declines, what results publish, and resumption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.core.privacy import DpEvent, epsilon, l2_norm
from fedge.hub.config import HubConfig
from fedge.protocol.codec import encode
from fedge.protocol.errors import ConfigError
from fedge.protocol.manifest import load_head
from fedge.protocol.messages import Decline, DeclineReason, Reject, RejectReason, RoundResult, RoundStatus
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, iter_hub, zero_delta

DEVICES = [f"d{i:02d}" for i in range(12)]


def _cfg(tmp_path: Path, artifacts: Path, min_devices: int = 1, **privacy: Any) -> HubConfig:
    table = {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 0.5, "delta": 1e-5, **privacy}
    return hub_config(tmp_path / "state", artifacts, privacy=table, rounds={"min_devices": min_devices},
                      aggregation={"proximal_lambda": 0.0})


def _hello(fleet: Fleet, devices: list[str] = DEVICES) -> None:
    for d in devices:
        fleet.device(d).hello()


def test_distributed_mode_is_refused_without_secure_aggregation(tmp_path: Path, artifacts: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, artifacts, mode="distributed")
    assert info.value.field == "privacy.mode" and "secure aggregation" in str(info.value)


def test_central_round_announces_dp_and_uses_the_fixed_denominator(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, noise_multiplier=1e-6))
    fleet = next(gen)
    try:
        _hello(fleet)
        fleet.device("old-agent").hello(dp=False)  # an agent that ignores DP fields is never selected
        rnd = fleet.start_round()
        assert (rnd.dp_mode, rnd.dp_noise_multiplier, rnd.dp_clip, rnd.dp_sample_rate) == ("central", 1e-6, 1.0, 0.5)
        assert 0 < len(rnd.selected) < len(DEVICES) and "old-agent" not in rnd.selected
        big = zero_delta(SHAPES, 10.0)  # norm far above C = 1: the hub re-clips
        for d in rnd.selected:
            fleet.device(d).update(rnd, big, n=1, metrics={})
        (res,) = fleet.results
        assert res.status is RoundStatus.COMPLETED and res.epsilon is not None and res.epsilon > 0
        # the published result names nobody and counts no samples; the operator's store has them
        assert res.devices == () and res.n_samples == 0 and res.declined == ()
        stored = fleet.hub.store.round(1)
        assert stored is not None and set(stored.devices) == set(rnd.selected)
        new = fleet.hub.registry.load_head(res.model_version or "")
        w0 = load_head(artifacts)
        step = {k: new[k].astype(np.float64) - w0[k] for k in SHAPES}
        expected_cohort = 0.5 * len(DEVICES)  # q * eligible (12 DP-capable devices)
        # every update clipped to norm 1, uniform weights, sum divided by q*N = 6 (not by the cohort, not by n)
        assert l2_norm(step) == pytest.approx(len(rnd.selected) / expected_cohort, rel=1e-3)
        (row,) = fleet.hub.store.ledger()
        assert (row.round, row.mode, row.cohort, row.expected_cohort, row.amplified) == (
            1, "central", len(rnd.selected), 6.0, False)
        assert row.epsilon == pytest.approx(epsilon([DpEvent(1e-6)], 1e-5)) == res.epsilon
    finally:
        gen.close()


def test_amplification_is_opt_in_and_recorded_per_round(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, amplification=True, sample_rate=0.5))
    fleet = next(gen)
    try:
        _hello(fleet)
        rnd = fleet.start_round()
        for d in rnd.selected:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={})
        (row,) = fleet.hub.store.ledger()
        assert row.amplified and row.epsilon == pytest.approx(epsilon([DpEvent(1.0, 0.5, True)], 1e-5))
        assert row.epsilon < epsilon([DpEvent(1.0)], 1e-5)
    finally:
        gen.close()


def test_updates_that_are_not_private_are_rejected(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, sample_rate=1.0))
    fleet = next(gen)
    try:
        _hello(fleet, DEVICES[:3])
        rnd = fleet.start_round()
        a, b, c = (fleet.device(d) for d in rnd.selected)
        a.update(rnd, zero_delta(SHAPES, 0.01), n=250, metrics={})          # a real sample count
        b.update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={"acc": 0.9})  # metrics in the clear
        for dev in (a, b):
            assert isinstance(dev.inbox[-1], Reject) and dev.inbox[-1].reason is RejectReason.MALFORMED
        fleet.device(c.name).transport.publish(TOPICS.decline(c.name), encode(
            Decline("f1", rnd.round, c.name, DeclineReason.BUDGET_EXHAUSTED)))
        c.update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={})  # an update after its own decline
        assert isinstance(c.inbox[-1], Reject) and c.inbox[-1].reason is RejectReason.DUPLICATE
    finally:
        gen.close()


def test_a_hostile_local_mode_update_cannot_blow_up_the_model(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, mode="local", sample_rate=1.0, min_devices=2))
    fleet = next(gen)
    try:
        _hello(fleet, DEVICES[:2])
        rnd = fleet.start_round()
        for d in rnd.selected:
            fleet.device(d).update(rnd, zero_delta(SHAPES, 3e38), n=1, metrics={})  # finite, huge
        (res,) = fleet.results
        assert res.status is RoundStatus.COMPLETED
        head = fleet.hub.registry.load_head(res.model_version or "")
        assert all(np.isfinite(a).all() for a in head.values())
        # bounded by C + z*C*(sqrt(d) + 10) per update, averaged over q*N = 2
        d = sum(int(np.prod(s)) for s in SHAPES.values())
        step = {k: head[k].astype(np.float64) - load_head(artifacts)[k] for k in SHAPES}
        assert l2_norm(step) <= 1.0 + (np.sqrt(d) + 10.0) + 1e-3
    finally:
        gen.close()


def test_a_cohort_below_quorum_is_skipped_without_spending_budget(tmp_path: Path, artifacts: Path) -> None:
    gen = iter_hub(_cfg(tmp_path, artifacts, sample_rate=0.05, min_devices=3))
    fleet = next(gen)
    try:
        _hello(fleet, DEVICES[:4])
        fleet.control(b"{}")
        res = fleet.retained(TOPICS.result)
        assert isinstance(res, RoundResult) and res.status is RoundStatus.FAILED_QUORUM
        assert res.detail is not None and "no privacy spent" in res.detail
        assert TOPICS.announce not in fleet.broker.retained and fleet.hub.store.ledger() == []
    finally:
        gen.close()


def test_budget_refuses_the_round_past_it_and_survives_a_restart(tmp_path: Path, artifacts: Path) -> None:
    one, two, three = (epsilon([DpEvent(2.0)] * k, 1e-5) for k in (1, 2, 3))
    cfg = _cfg(tmp_path, artifacts, noise_multiplier=2.0, sample_rate=1.0, epsilon_budget=(two + three) / 2)
    gen = iter_hub(cfg)
    fleet = next(gen)
    try:
        _hello(fleet)
        for _ in range(2):
            rnd = fleet.start_round()
            for d in rnd.selected:
                fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={})
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
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={})
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
        assert res.status is RoundStatus.COMPLETED
        stored = fleet.hub.store.round(1)
        assert stored is not None and set(stored.devices) == set(rest)
        assert fleet.hub.store.declines(1) == {last: "budget_exhausted"}
        assert sum(fleet.hub.store.reject_counts().values()) == 3
    finally:
        gen.close()


def test_an_open_dp_round_resumes_after_a_crash(tmp_path: Path, artifacts: Path) -> None:
    cfg = _cfg(tmp_path, artifacts, sample_rate=1.0, noise_multiplier=1e-6)
    gen = iter_hub(cfg)
    fleet = next(gen)
    _hello(fleet, DEVICES[:3])
    rnd = fleet.start_round()
    a, b, c = rnd.selected
    fleet.device(a).update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={})
    fleet.device(b).transport.publish(TOPICS.decline(b), encode(Decline("f1", 1, b, DeclineReason.NOISE_BELOW_FLOOR)))
    fleet.hub.halt()  # kill -9
    gen = iter_hub(cfg, broker=fleet.broker)
    again = next(gen)
    try:
        assert again.hub.round is not None and again.hub.round.declined == {b: "noise_below_floor"}
        assert again.hub.round.aggregator.expected_cohort == 3.0  # the DP estimator, rebuilt
        again.device(c).update(rnd, zero_delta(SHAPES, 0.01), n=1, metrics={})
        res = again.retained(TOPICS.result)
        assert isinstance(res, RoundResult) and res.status is RoundStatus.COMPLETED and res.round == 1
        assert len(again.hub.store.ledger()) == 1  # the round was charged once
    finally:
        gen.close()
