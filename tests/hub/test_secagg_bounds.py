"""Secure aggregation with bounded inputs (issue 21, item 2): devices clip in L2 to an announced bound and per
coordinate; the hub refuses an unmasked sum that so many bounded inputs cannot make (not deployed, reason recorded,
an alert); the L2 bound follows the devices' median update norm through one bit per input."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.core.secagg import SecAggConfig, bounded_input, next_l2_clip, quantise, sum_problem, under_bound
from fedge.protocol.messages import RoundStatus
from tests.hub.fleet import SHAPES, Fleet, hub_config, iter_hub
from tests.hub.test_secagg_hub import SaDevice, settle

DEVICES = ("d0", "d1", "d2", "d3")
DIM = sum(math.prod(s) for s in SHAPES.values())


def _ring_sum(inputs: list[np.ndarray], cfg: SecAggConfig) -> np.ndarray:
    total = np.zeros(inputs[0].size, dtype=np.uint64)
    for x in inputs:
        total += quantise(x, cfg, np.random.default_rng(0))
    return total & np.uint64((1 << cfg.ring_bits) - 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.floats(0.01, 5.0), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_honest_bounded_inputs_are_never_refused(n: int, l2: float, stochastic: bool, bit: bool, seed: int) -> None:
    cfg = SecAggConfig(clip=1.0, scale=2**12, ring_bits=40, stochastic=stochastic, l2_clip=l2, norm_bit=bit)
    rng = np.random.default_rng(seed)
    inputs = []
    for _ in range(n):  # any direction, any length: every device clips what it sends
        x = rng.normal(size=DIM) * rng.choice([1e-3, 1.0, 1e3])
        inputs.append(bounded_input(x, cfg))
        assert np.linalg.norm(inputs[-1][:DIM]) <= l2 * (1 + 1e-9)
    assert sum_problem(_ring_sum(inputs, cfg), n, cfg) is None


def test_a_huge_input_is_refused_per_coordinate() -> None:
    cfg = SecAggConfig(clip=1.0, scale=2**16, l2_clip=1.0)
    honest = [bounded_input(np.full(DIM, 0.01), cfg) for _ in range(4)]
    total = _ring_sum(honest, cfg) + np.full(DIM, 2**30, dtype=np.uint64)  # 2^30 in every coordinate
    why = sum_problem(total & np.uint64(2**32 - 1), 5, cfg)
    assert why is not None and "coordinates" in why


def test_an_input_inside_the_coordinate_clip_but_too_long_is_refused_in_l2() -> None:
    cfg = SecAggConfig(clip=1.0, scale=2**16, l2_clip=0.5)
    honest = [bounded_input(np.full(DIM, 0.01), cfg) for _ in range(4)]
    long = np.full(DIM, 1.0)  # every coordinate at the clip: L2 sqrt(d), far beyond 5 x 0.5
    why = sum_problem(_ring_sum([*honest, long], cfg), 5, cfg)
    assert why is not None and "L2 norm" in why
    assert sum_problem(_ring_sum([*honest, long], SecAggConfig(clip=1.0, scale=2**16)), 5,
                       SecAggConfig(clip=1.0, scale=2**16)) is None  # without an L2 clip it would pass


def test_the_norm_bit_counts_the_inputs_within_the_bound_and_the_clip_moves_toward_the_median() -> None:
    cfg = SecAggConfig(clip=1.0, scale=2**16, l2_clip=1.0, norm_bit=True)
    lengths = [0.2, 0.5, 3.0, 4.0, 5.0]
    inputs = [bounded_input(np.full(DIM, r / math.sqrt(DIM)), cfg) for r in lengths]
    under = under_bound(_ring_sum(inputs, cfg), len(inputs), cfg)
    assert under == pytest.approx(2 / 5)
    clip = 1.0
    for _ in range(60):  # the same five devices round after round: the clip settles around the median norm (3)
        inputs = [bounded_input(np.full(DIM, r / math.sqrt(DIM)), SecAggConfig(l2_clip=clip, norm_bit=True))
                  for r in lengths]
        clip = next_l2_clip(clip, under_bound(_ring_sum(inputs, SecAggConfig(l2_clip=clip, norm_bit=True)), 5,
                                               SecAggConfig(l2_clip=clip, norm_bit=True)) or 0.0)
    assert 2.5 < clip < 4.5


@pytest.fixture
def make(tmp_path: Path, artifacts: Path) -> Iterator[Any]:
    hubs: list[Any] = []

    def start(**secagg: Any) -> Fleet:
        gen = iter_hub(hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 3},
                                  secagg={"enabled": True, "stage_timeout_s": 5.0, **secagg},
                                  aggregation={"proximal_lambda": 0.0}))
        hubs.append(gen)
        return next(gen)

    yield start
    for gen in hubs:
        gen.close()


def _round(fleet: Fleet, hostile: np.ndarray | None) -> tuple[Any, Any]:
    devs = {d: SaDevice(fleet, d) for d in DEVICES}
    for d in devs.values():
        d.hello()
    ann = fleet.start_round()
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    for i, d in enumerate(DEVICES):
        dev = devs[d]
        if i == 0 and hostile is not None:
            assert dev.session is not None
            dev.send(dev.session.set_input(hostile & dev.session.setup.mask))
        else:
            dev.input({k: np.full(s, 0.01, np.float32) for k, s in SHAPES.items()})
    settle(fleet)
    return ann, fleet.results[-1]


def test_a_sum_no_bounded_inputs_can_make_is_refused_with_an_alert_and_nothing_deployed(make: Any) -> None:
    fleet = make()
    ann, res = _round(fleet, np.full(DIM + 1, 2**30, dtype=np.uint64))  # the update and its norm bit
    assert ann.secagg_l2_clip == 1.0 and ann.secagg_norm_bit  # "auto": announced, starting at l2_clip_start
    assert res.status is RoundStatus.REFUSED_INPUT and res.model_version is None
    assert res.detail is not None and "cannot come from bounded honest inputs" in res.detail
    [alert] = fleet.hub.store.alerts()
    assert alert["kind"] == "secagg_sum_refused" and alert["round"] == ann.round
    from fedge.hub.dashboard.snapshot import FleetReader  # the dashboard shows it (read-only view of the store)

    state = FleetReader(fleet.cfg.state_dir / "hub.sqlite", fleet=fleet.cfg.fleet).snapshot()
    assert [a["kind"] for a in state["alerts"]] == ["secagg_sum_refused"]
    assert state["rounds"][-1]["status"] == "refused_input"
    assert fleet.hub.registry.current().version == "v0"  # type: ignore[union-attr]
    assert [h.version for h in fleet.heads] == ["v0"]


def test_honest_rounds_pass_and_the_auto_clip_follows_the_devices(make: Any) -> None:
    fleet = make()
    ann, res = _round(fleet, None)
    assert res.status is RoundStatus.COMPLETED and res.model_version == "v1"
    ann2, _ = _round(fleet, None)  # every update was under 1.0: the clip shrinks toward their norm
    assert ann2.secagg_l2_clip is not None and ann2.secagg_l2_clip < ann.secagg_l2_clip  # type: ignore[operator]
    assert fleet.hub.store.alerts() == []


def test_a_fixed_l2_clip_is_announced_without_the_norm_bit(make: Any) -> None:
    fleet = make(l2_clip=0.3)
    ann, res = _round(fleet, None)
    assert ann.secagg_l2_clip == 0.3 and not ann.secagg_norm_bit and res.status is RoundStatus.COMPLETED
