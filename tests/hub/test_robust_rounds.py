"""Rounds that one device cannot own (issue 12, item 2): capped weights, bounded norms, robust strategies, a
non-finite aggregate refused, a result that always encodes and goes out only after it encoded."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.core.losses import Score
from fedge.core.privacy import l2_norm
from fedge.hub.config import AggregationConfig
from fedge.protocol.messages import ModelHead, RoundStatus
from tests.hub.fleet import SHAPES, TOPICS, Fleet, hub_config, run_hub, zero_delta

HONEST = ("a", "b", "c", "d")
MULTIPLIER = AggregationConfig().norm_multiplier  # the "auto" bound's default multiple of the median norm


def _fleet(tmp_path: Path, artifacts: Path, **aggregation: Any) -> Iterator[Fleet]:
    cfg = hub_config(tmp_path / "state", artifacts, devices=[*HONEST, "evil"], rounds={"over_select": 0.0},
                     aggregation={"proximal_lambda": 0.0, **aggregation})
    yield from run_hub(cfg)


def _honest(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 0.05).astype(np.float32) for k, s in SHAPES.items()}


def _moved(fleet: Fleet, before: Mapping[str, np.ndarray]) -> float:
    head = fleet.retained(TOPICS.model_head)
    assert isinstance(head, ModelHead)
    return l2_norm({k: np.asarray(head.head[k], np.float64) - before[k] for k in SHAPES})


def _bounds(fleet: Fleet) -> list[dict[str, Any]]:
    """The rounds.jsonl records of aggregated rounds (they say what the bounds did)."""
    return [line for line in fleet.jsonl() if "norm_bound" in line]


def _round(fleet: Fleet, seed: int, attack: dict[str, np.ndarray]) -> list[float]:
    """One round: four honest devices (100 samples each), the attacker claiming 10^9; the honest norms."""
    rnd = fleet.start_round()
    assert set(rnd.selected) == {*HONEST, "evil"}
    norms = []
    for i, d in enumerate(HONEST):
        delta = _honest(seed * 10 + i)
        norms.append(l2_norm(delta))
        fleet.device(d).update(rnd, delta, n=100)
    fleet.device("evil").update(rnd, attack, n=10**9)
    assert fleet.results[-1].round == rnd.round and fleet.results[-1].status is RoundStatus.COMPLETED
    return norms


@pytest.mark.parametrize("strategy", ["fedavg", "median", "trimmed_mean"])
@pytest.mark.parametrize("attack", [1e3, 1e30])  # the head moved to 1e3, or overflowing float32
def test_an_attacker_with_a_huge_count_and_delta_moves_the_head_by_at_most_the_bound(
        tmp_path: Path, artifacts: Path, strategy: str, attack: float) -> None:
    for fleet in _fleet(tmp_path, artifacts, strategy=strategy):
        before = fleet.hub.registry.load_head("v0")
        honest = _round(fleet, 1, zero_delta(SHAPES, attack))  # finite float32
        # "auto", first round: the multiplier x the lower median of this round's five norms = the third smallest
        # honest one
        bound = MULTIPLIER * sorted(honest)[2]
        [line] = _bounds(fleet)
        assert line["norm_bound"] == pytest.approx(bound) and line["clipped"] >= 1
        assert _moved(fleet, before) <= bound * (1 + 1e-6) + 1e-6


def test_a_fixed_bound_holds_and_the_weight_cap_is_reported(tmp_path: Path, artifacts: Path) -> None:
    for fleet in _fleet(tmp_path, artifacts, max_update_norm=0.05, max_weight_ratio=2.0):
        before = fleet.hub.registry.load_head("v0")
        _round(fleet, 2, zero_delta(SHAPES, -3e38))
        [line] = _bounds(fleet)
        # 2 x the median count (200), then lowered so that the liar has a quarter of the weight: c = (400 + c) / 4
        assert line["norm_bound"] == 0.05 and line["weight_cap"] == pytest.approx(400 / 3) and line["capped"] == 1
        assert _moved(fleet, before) <= 0.05 * (1 + 1e-6) + 1e-6


def test_the_auto_bound_cannot_be_trained_upward_over_rounds(tmp_path: Path, artifacts: Path) -> None:
    """Each round the attacker sends an update exactly as long as the last bound (the longest that is not clipped)
    and then a huge one: the bound stays a multiple of what honest devices send."""
    for fleet in _fleet(tmp_path, artifacts, norm_window=5):
        honest_max = 0.0
        attack_norm = 1e6
        for r in range(1, 9):
            attack = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}
            scale = attack_norm / l2_norm(attack)
            honest_max = max(honest_max, *_round(fleet, r, {k: v * np.float32(scale) for k, v in attack.items()}))
            bound = _bounds(fleet)[-1]["norm_bound"]
            assert bound <= MULTIPLIER * honest_max * (1 + 1e-9)
            attack_norm = bound if r % 2 else 1e30  # ride the bound, or push with a huge norm
        assert len(fleet.hub.store.recent_update_norms(100)) == 5 * 5  # the window: the last five rounds


def test_a_single_device_round_is_bounded_by_the_ceiling(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, devices=["evil"], rounds={"min_devices": 1},
                     aggregation={"proximal_lambda": 0.0, "norm_ceiling": 2.0})
    for fleet in run_hub(cfg):
        before = fleet.hub.registry.load_head("v0")
        rnd = fleet.start_round()
        fleet.device("evil").update(rnd, zero_delta(SHAPES, 1e30), n=10**9)
        assert _bounds(fleet)[-1]["norm_bound"] == 2.0
        assert _moved(fleet, before) <= 2.0 * (1 + 1e-6) + 1e-6


def test_finite_updates_whose_aggregate_overflows_fail_the_round_and_publish_no_model(
        tmp_path: Path, artifacts: Path) -> None:
    big = float(np.finfo(np.float32).max)
    cfg = hub_config(tmp_path / "state", artifacts, devices=["a", "b"],
                     aggregation={"proximal_lambda": 0.0, "max_update_norm": 1e300, "norm_ceiling": 1e300})
    for fleet in run_hub(cfg):
        for expect in ("v1", None):  # the first round lifts the head to ~float32 max, the second overflows it
            rnd = fleet.start_round()
            for d in ("a", "b"):
                fleet.device(d).update(rnd, zero_delta(SHAPES, big), n=10)
            res = fleet.results[-1]
            assert res.round == rnd.round and res.model_version == expect
        assert res.status is RoundStatus.FAILED_QUORUM and res.detail is not None and "not finite" in res.detail
        assert fleet.hub.round is None and [h.version for h in fleet.heads] == ["v0", "v1"]
        assert fleet.hub.registry.current().version == "v1"  # type: ignore[union-attr]
        rnd = fleet.start_round()  # the hub goes on
        for d in ("a", "b"):
            fleet.device(d).update(rnd, zero_delta(SHAPES, -big / 4), n=10)
        assert fleet.results[-1].model_version == "v2"


@pytest.mark.parametrize("loss", [float("inf"), float("nan")])
def test_a_non_finite_loss_still_encodes_a_result_published_after_the_model(
        tmp_path: Path, artifacts: Path, loss: float) -> None:
    scores = iter([Score(1.0, 0.5), Score(loss, 0.6)])  # v0 at import, then the round's version

    def evaluator(_d: Path, _s: str, _h: Mapping[str, np.ndarray]) -> Score:
        return next(scores)

    fleet = Fleet(hub_config(tmp_path / "state", artifacts, devices=["a", "b"]), evaluator=evaluator)
    order: list[str] = []
    original = fleet.hub.transport.publish

    def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        order.append(topic)
        original(topic, payload, qos=qos, retain=retain)

    fleet.hub.transport.publish = publish  # type: ignore[method-assign]
    fleet.hub.start()
    try:
        rnd = fleet.start_round()
        for d in ("a", "b"):
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=10)
        res = fleet.results[-1]
        assert res.status is RoundStatus.COMPLETED and res.model_version == "v1"
        assert res.loss is None and res.accuracy == 0.6
        assert fleet.heads[-1].version == "v1"
        last = {t: i for i, t in enumerate(order)}
        assert last[TOPICS.model_head] < last[TOPICS.result]  # the model of the round, then its result
    finally:
        fleet.hub.stop()
