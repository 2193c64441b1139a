"""`fedge simulate`: N virtual devices in one process, with the agent's trainer, clipping and noise and the hub's
selection, aggregation, evaluation and accounting. Every check is on outputs (heads, reports, epsilons),
recomputed independently from the real data and the real trainer; nothing is mocked."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.cli import main
from fedge.demo import DemoPaths, source_accuracy
from fedge.edge_agent.data import load_local
from fedge.edge_agent.privacy import DpEvent, DpParams, epsilon, event_for, noise_for_epsilon
from fedge.edge_agent.trainers import open_trainer
from fedge.edge_agent.training import fit
from fedge.hub.rounds import poisson_select, select_devices
from fedge.protocol.errors import ConfigError
from fedge.simulate import (
    SimFleet,
    SimSettings,
    build_sim_report,
    load_fleet,
    resolve_dp,
    run_rounds,
    settings_from_args,
    train_rng,
)

DEVICES = 20
TIMING_KEYS = {"seconds", "prepare_seconds", "features_seconds", "rounds_seconds"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """The demo's work folder with a small source model: cnn28 fitted for one epoch on 4,000 upright images
    (~15 s, against ~60 s for the demo's full pre-training). ``demo.prepare`` pre-trains only when the folder has
    no source model and exports only when the artifacts do not verify, so it keeps this one and writes the
    device shards and the eval set of the demo's rotated domain."""
    from fedge.export.testing import export_small

    paths = DemoPaths(tmp_path_factory.mktemp("simulate"))
    export_small(paths.artifacts, trained=True)
    paths.source_model.write_bytes(b"")  # a placeholder: its presence is what makes prepare skip pre-training
    return paths


@pytest.fixture(scope="module")
def fleet(work: DemoPaths) -> SimFleet:
    return load_fleet(work, DEVICES, seed=0)


def _head_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).ravel() for k in a])


def _strip_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def _cli_json(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, dict[str, Any]]:
    code = main(["simulate", *args, "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # --json: one JSON object, nothing else on stdout
    report: dict[str, Any] = json.loads(lines[0])
    return code, report


def test_small_real_run_beats_the_source_model(fleet: SimFleet) -> None:
    settings = SimSettings(devices=DEVICES, rounds=2)  # the demo hub's local_epochs 2, lr 0.05, lambda 0.01
    run = run_rounds(fleet, settings)
    report = build_sim_report(fleet, settings, run)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["status"] == "completed" and r["devices"] == DEVICES for r in report["rounds"])
    assert all(r["epsilon"] is None and r["update_norm_median"] > 0 for r in report["rounds"])
    assert report["final_accuracy"] > report["source_accuracy"] + 0.1, report
    assert report["passed"] and report["dp"] is None and report["epsilon"] is None
    assert report["final_accuracy"] == run.results[-1].accuracy
    # the source accuracy is the exported head scored on the eval set, as the demo computes it
    assert report["source_accuracy"] == pytest.approx(source_accuracy(fleet.paths), abs=1e-4)


def test_features_and_a_device_update_are_the_agents(fleet: SimFleet, work: DemoPaths) -> None:
    """One device selected, no proximal pull: the new global head is exactly that device's fit of the global head
    on the backbone features an agent computes from its own shard file."""
    trainer = open_trainer(work.artifacts, fleet.trainer.name)
    local = load_local(work.data / "device-03.npz")
    np.testing.assert_allclose(fleet.feats[3], trainer.features(local.x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fleet.labels[3], local.y)

    for lam in (0.0, 0.01):
        settings = SimSettings(devices=DEVICES, rounds=1, fraction=1 / DEVICES, proximal_lambda=lam)
        run = run_rounds(fleet, settings)
        (picked,) = select_devices(fleet.names, 1 / DEVICES, 1, 0, 1)
        assert run.results[0].devices == (picked,)
        i = fleet.names.index(picked)
        trainer.set_head(fleet.w0)
        fit(trainer, fleet.feats[i], fleet.labels[i], 2, 0.05, train_rng(0, i, 1))
        trained = trainer.get_head()
        for k, w0 in fleet.w0.items():
            expected = (trained[k].astype(np.float64) + 2 * lam * w0) / (1 + 2 * lam)
            np.testing.assert_allclose(run.head[k], expected, rtol=1e-5, atol=1e-6)
        assert run.results[0].n_samples == len(fleet.labels[i])


def test_central_dp_is_dp_fedavg_over_clipped_updates(fleet: SimFleet) -> None:
    """No noise (z = 0), a clip that binds: the new head is w0 + Σ clip(Δ_k) / (q·N), pulled towards w0, over the
    Poisson-sampled cohort, with Δ_k recomputed here from each device's fit."""
    q, clip, lam = 0.5, 0.05, 0.01
    dp = DpParams("central", 0.0, clip, q)
    run = run_rounds(fleet, SimSettings(devices=DEVICES, rounds=1, dp=dp, proximal_lambda=lam))
    cohort = poisson_select(fleet.names, q, 0, 1)
    assert run.results[0].devices == cohort and len(cohort) >= 2
    assert run.results[0].n_samples == len(cohort)  # under DP a device reports 1 sample, as the agent does
    trainer = open_trainer(fleet.paths.artifacts, fleet.trainer.name)
    total = {k: np.zeros(v.shape) for k, v in fleet.w0.items()}
    norms = []
    for name in cohort:
        i = fleet.names.index(name)
        trainer.set_head(fleet.w0)
        fit(trainer, fleet.feats[i], fleet.labels[i], 2, 0.05, train_rng(0, i, 1))
        trained = trainer.get_head()
        delta = {k: trained[k].astype(np.float64) - fleet.w0[k] for k in fleet.w0}
        norm = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
        norms.append(norm)
        for k in total:
            total[k] += delta[k] * min(1.0, clip / norm)
    assert min(norms) > clip  # the clip binds for every device
    assert run.update_norms[0] == pytest.approx(float(np.median(norms)), rel=1e-4)
    for k, w0 in fleet.w0.items():
        expected = (w0 + total[k] / (q * DEVICES) + 2 * lam * w0) / (1 + 2 * lam)
        np.testing.assert_allclose(run.head[k], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_dp_noise_changes_the_result_by_the_announced_amount(fleet: SimFleet, mode: str) -> None:
    """Same seed, same cohort, same clipped updates: the head with noise minus the head without is the DP noise
    divided by q·N (and the proximal 1 + 2λ): std z·C/(q·N) centrally, z·C·sqrt(cohort)/(q·N) locally."""
    q, clip, z, lam = 0.5, 0.5, 1.0, 0.01
    quiet = run_rounds(fleet, SimSettings(devices=DEVICES, rounds=1, dp=DpParams(mode, 0.0, clip, q),
                                          proximal_lambda=lam))
    noisy = run_rounds(fleet, SimSettings(devices=DEVICES, rounds=1, dp=DpParams(mode, z, clip, q),
                                          proximal_lambda=lam))
    assert noisy.results[0].devices == quiet.results[0].devices
    diff = _head_diff(noisy.head, quiet.head)
    cohort = len(noisy.results[0].devices)
    std = z * clip / (q * DEVICES) / (1 + 2 * lam) * (math.sqrt(cohort) if mode == "local" else 1.0)
    assert diff.std() == pytest.approx(std, rel=0.06)  # 2,410 coordinates: the estimate is within ~3%
    assert abs(diff.mean()) < 4 * std / math.sqrt(diff.size)
    assert (noisy.results[0].accuracy, noisy.results[0].loss) != (quiet.results[0].accuracy, quiet.results[0].loss)


def test_cli_same_seed_same_report(work: DemoPaths, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--devices", str(DEVICES), "--rounds", "2", "--out", str(work.root), "--dp-mode", "central",
            "--noise-multiplier", "0.8", "--sample-rate", "0.5", "--clip", "0.5"]
    code1, first = _cli_json(capsys, [*args, "--seed", "3"])
    code2, second = _cli_json(capsys, [*args, "--seed", "3"])
    assert (code1, code2) == (0 if first["passed"] else 1, 0 if second["passed"] else 1)
    assert _strip_timings(first) == _strip_timings(second)
    assert json.loads(work.report.read_text()) == second
    assert work.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first["dp"]["mode"] == "central" and first["dp"]["noise_multiplier"] == 0.8
    _, other = _cli_json(capsys, [*args, "--seed", "4"])
    assert [r["accuracy"] for r in other["rounds"]] != [r["accuracy"] for r in first["rounds"]]


def test_reported_epsilon_is_the_accountants(fleet: SimFleet) -> None:
    """Each round's epsilon is ``epsilon()`` of the events the hub's ledger would hold; ``--epsilon`` picks the
    z that ``noise_for_epsilon`` gives, and the run ends within the target."""
    common: dict[str, Any] = {"clip": 1.0, "sample_rate": 0.5, "delta": 1e-5, "local_epochs": 1, "lr": 0.05,
                              "proximal_lambda": 0.01, "fraction": 1.0}
    settings = settings_from_args(DEVICES, 3, 0, dp_mode="central", noise_multiplier=None, target_epsilon=4.0,
                                  amplification=True, **common)
    assert settings.dp is not None
    z = settings.dp.noise_multiplier
    assert z == noise_for_epsilon(4.0, 1e-5, 3, 0.5)
    run = run_rounds(fleet, settings)
    report = build_sim_report(fleet, settings, run)
    event = event_for(DpParams("central", z, 1.0, 0.5), trust_sampling=True)
    assert event == DpEvent(z, 0.5, True)
    assert all(res.devices for res in run.results)  # q = 0.5 of 20: no empty cohort here
    for r, res in enumerate(run.results, start=1):
        assert res.epsilon == epsilon([event] * r, 1e-5)
        assert report["rounds"][r - 1]["epsilon"] == round(res.epsilon, 4)
    assert 3.9 < report["epsilon"] <= 4.0
    assert report["dp"] == {"mode": "central", "noise_multiplier": z, "clip": 1.0, "sample_rate": 0.5,
                            "delta": 1e-5, "target_epsilon": 4.0, "amplification": True, "expected_cohort": 10.0,
                            "accountant": "RDP (dp-accounting)"}

    # without amplification (the hub's default) the same z costs an unamplified Gaussian round each
    plain = run_rounds(fleet, SimSettings(devices=DEVICES, rounds=3, local_epochs=1, dp=settings.dp))
    unamplified = event_for(settings.dp, trust_sampling=False)
    assert plain.results[-1].epsilon == epsilon([unamplified] * 3, 1e-5) > report["epsilon"]

    # local mode is charged as event_for says (never amplified); --epsilon still lands within the target
    local = settings_from_args(DEVICES, 3, 0, dp_mode="local", noise_multiplier=None, target_epsilon=4.0, **common)
    assert local.dp is not None
    local_run = run_rounds(fleet, local)
    local_event = event_for(local.dp, trust_sampling=True)
    assert not local_event.amplified
    assert local_run.results[-1].epsilon == epsilon([local_event] * 3, 1e-5)
    assert 3.9 < local_run.results[-1].epsilon <= 4.0


def test_an_empty_cohort_is_skipped_and_spends_nothing(fleet: SimFleet) -> None:
    dp = DpParams("central", 1.0, 1.0, 0.02)
    run = run_rounds(fleet, SimSettings(devices=DEVICES, rounds=6, dp=dp, amplification=True))
    event = event_for(dp, trust_sampling=True)
    announced = 0
    for r, res in enumerate(run.results, start=1):
        assert res.devices == poisson_select(fleet.names, 0.02, 0, r)
        announced += bool(res.devices)
        assert res.status == ("completed" if res.devices else "failed_quorum")
        assert res.epsilon == epsilon([event] * announced, 1e-5)
    assert announced < len(run.results)  # some cohort of this seed is empty (1 - 0.98^20 = 33% are not)


def test_dp_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="dp-mode"):
        resolve_dp("off", noise_multiplier=None, target_epsilon=2.0, clip=1.0, sample_rate=0.1, delta=1e-5, rounds=5)
    with pytest.raises(ConfigError, match="not both"):
        resolve_dp("central", noise_multiplier=1.0, target_epsilon=2.0, clip=1.0, sample_rate=0.1, delta=1e-5,
                   rounds=5)
    with pytest.raises(ConfigError, match="clip"):
        resolve_dp("central", noise_multiplier=1.0, target_epsilon=None, clip=0.0, sample_rate=0.1, delta=1e-5,
                   rounds=5)
    assert resolve_dp("off", noise_multiplier=None, target_epsilon=None, clip=1.0, sample_rate=0.1, delta=1e-5,
                      rounds=5) is None
    with pytest.raises(ConfigError, match="devices"):
        SimSettings(devices=0, rounds=1)


def test_more_devices_than_the_demo_partition_gives_ten_samples(work: DemoPaths, fleet: SimFleet,
                                                                 tmp_path: Path) -> None:
    """Past 1,200 devices (12,000 held-back images, at least 10 each in the demo) the pool is split evenly: every
    device still has at least one sample; more devices than samples is a clear error."""
    if fleet.info["dataset"] != "fashion-mnist":
        pytest.skip("sized for Fashion-MNIST's 12,000 held-back images")
    paths = DemoPaths(tmp_path / "big")
    shutil.copytree(work.artifacts, paths.artifacts)
    shutil.copy(work.source_model, paths.source_model)
    big = load_fleet(paths, 1500, seed=0)
    assert big.devices == 1500
    assert {len(y) for y in big.labels} == {8}  # 12,000 // 1,500
    run = run_rounds(big, SimSettings(devices=1500, rounds=1, dp=DpParams("central", 1.0, 1.0, 0.02)))
    assert run.results[0].status == "completed" and len(run.results[0].devices) > 0
    with pytest.raises(ConfigError, match="devices"):
        load_fleet(paths, 12_001, seed=0)
