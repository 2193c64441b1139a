"""``fedge simulate``: N virtual devices in one process, no MQTT, on the demo's task.

The simulator drives the same round core as the hub daemon and the agents (:mod:`fedge.simulate_rounds`): the
hub's strategy plans each round, every selected virtual device runs the agent's device round on the announce the
hub would publish, and the hub's close aggregates, scores and gates. The fleet (shards, cached features, the hub's
evaluator, seeds) is built by :mod:`fedge.simulate_fleet`. Every random draw comes from a Generator seeded from
``seed``: a run is a pure function of its settings and the data (wall-clock ``seconds`` aside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedge.demo import DemoPaths, build_report
from fedge.protocol.errors import ConfigError
from fedge.protocol.messages import RoundResult
from fedge.simulate_fleet import (
    SimFleet,
    SimSettings,
    content_key,
    device_noise_rng,
    device_seed,
    ditto_rng,
    fleet_from_shards,
    hub_noise_rng,
    load_fleet,
    local_only_rng,
    resolve_dp,
    train_rng,
)
from fedge.simulate_rounds import SimRun, run_rounds

__all__ = [
    "DEFAULT_OUT",
    "SimFleet",
    "SimRun",
    "SimSettings",
    "build_sim_report",
    "content_key",
    "device_noise_rng",
    "device_seed",
    "ditto_rng",
    "fleet_from_shards",
    "hub_noise_rng",
    "load_fleet",
    "local_only_rng",
    "resolve_dp",
    "run_rounds",
    "run_simulate",
    "settings_from_args",
    "train_rng",
]

DEFAULT_OUT = "simulate-out"


# -- report --------------------------------------------------------------------------------------------------------


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def build_sim_report(fleet: SimFleet, settings: SimSettings, run: SimRun) -> dict[str, Any]:
    """The demo's report (``demo.build_report``: rounds, source/final accuracy, passed ...) plus each round's
    epsilon and median update norm, the DP settings and the timings."""
    report = build_report(fleet.info, settings.devices, fleet.source_accuracy, run.results, fleet.paths)
    for entry, res, norm, made in zip(report["rounds"], run.results, run.update_norms, run.deployed, strict=True):
        entry["epsilon"] = _r(res.epsilon)
        entry["update_norm_median"] = _r(norm, 5)
        entry["deployed"] = made
        if res.detail is not None:
            entry["detail"] = res.detail
        if res.declined:
            entry["declined"] = len(res.declined)
    deployed_acc = next((r.accuracy for r, made in zip(reversed(run.results), reversed(run.deployed), strict=True)
                         if made), fleet.source_accuracy)
    dp = settings.dp
    report.update(
        simulated=True, backend=fleet.trainer.name, seed=settings.seed, local_epochs=settings.local_epochs,
        lr=settings.lr, proximal_lambda=settings.proximal_lambda,
        fraction=None if dp is not None else settings.fraction,
        dp=None if dp is None else {
            "mode": dp.mode, "noise_multiplier": dp.noise_multiplier, "clip": dp.clip, "sample_rate": dp.sample_rate,
            "delta": settings.delta, "target_epsilon": settings.target_epsilon,
            "amplification": settings.amplification,
            "expected_cohort": dp.sample_rate * settings.devices, "accountant": "RDP (dp-accounting)",
        },
        epsilon=None if dp is None else _r(run.results[-1].epsilon),
        validation_fraction=settings.validation_fraction, local_only_epochs=settings.local_only_epochs,
        personalization=settings.personalization,
        ditto_mu=settings.ditto_mu if settings.personalization == "ditto" else None,
        deploy_gate=settings.deploy_tolerance is not None, deploy_tolerance=settings.deploy_tolerance,
        deployed_accuracy=_r(deployed_acc),
        # per device, on its held-out validation rows: medians over devices and the worst device of each head
        final_federated={**{k[len("median_"):]: v for k, v in run.final.items() if k.startswith("median_")},
                         **{k: v for k, v in run.final.items() if k.startswith("worst_")}},
        final_federated_mean={k[len("val_acc_"):]: v for k, v in run.final.items() if k.startswith("val_acc_")},
        final_val_n=int(run.final.get("val_n", 0)),
        prepare_seconds=round(fleet.prepare_seconds, 3), features_seconds=round(fleet.features_seconds, 3),
        rounds_seconds=round(run.seconds, 3),
    )
    return report


def _cell(x: float | None, width: int = 8) -> str:
    return f"{x:{width}.3f}" if x is not None else f"{'-':>{width}}"


def _table_row(res: RoundResult, made: bool) -> str:
    acc = f"{res.accuracy:8.3f}" if res.accuracy is not None else f"{'failed':>8}"
    fed = res.federated
    cells = "  ".join(_cell(fed.get(f"val_acc_{h}")) for h in ("source", "local_only", "global", "personal"))
    deployed = "yes" if made else ("kept" if res.accuracy is not None else "-")
    return (f"{res.round:>5}  {len(res.devices):>7}  {acc}  {deployed:>8}  {cells}  {res.seconds:7.2f}  "
            f"{_cell(res.epsilon)}")


def _print_table(report: dict[str, Any], run: SimRun) -> None:
    print("\n(held-out: the hub's eval set; src, local, global, personal: federated, on the devices' validation data)")
    print(f"{'round':>5}  {'devices':>7}  {'held-out':>8}  {'deployed':>8}  {'src':>8}  {'local':>8}  {'global':>8}  "
          f"{'personal':>8}  {'seconds':>7}  {'epsilon':>8}")
    print(f"{'src':>5}  {'-':>7}  {report['source_accuracy']:8.3f}  {'-':>8}  " + "  ".join([f"{'-':>8}"] * 4)
          + f"  {'-':>7}  {'-':>8}")
    for res, made in zip(run.results, run.deployed, strict=True):
        print(_table_row(res, made))
    if run.final:
        fin = report["final_federated"]
        print(f"{'med':>5}  {'-':>7}  {report['deployed_accuracy']:8.3f}  {'-':>8}  "
              + "  ".join(_cell(fin.get(h)) for h in ("source", "local_only", "global", "personal"))
              + "   (final heads: median over devices)")
        print(f"{'worst':>5}  {'-':>7}  {'-':>8}  {'-':>8}  "
              + "  ".join(_cell(fin.get(f"worst_{h}")) for h in ("source", "local_only", "global", "personal")))
    final = report["final_accuracy"]
    dp = report["dp"]
    amplified = " (amplified by sampling)" if dp is not None and dp["amplification"] else ""
    privacy = "no DP" if dp is None else (
        f"{dp['mode']} DP: z {dp['noise_multiplier']:.4g}, C {dp['clip']:g}, q {dp['sample_rate']:g}, "
        f"epsilon {report['epsilon']} at delta {dp['delta']:g}{amplified}")
    print(f"\n{report['devices']} simulated devices, {privacy}; {report['rounds_seconds']:.2f} s of rounds "
          f"({report['prepare_seconds']:.1f} s preparing, {report['features_seconds']:.1f} s features)")
    print(f"source-only accuracy {report['source_accuracy']:.3f} → federated "
          f"{'-' if final is None else f'{final:.3f}'} (chance {report['chance_accuracy']:.3f})")
    if not report["passed"]:
        print("FAILED: the federated model did not beat the source model and chance + margin")
    print(f"report: {report['report']}\nplot:   {report['plot']}")


def run_simulate(settings: SimSettings, out: str | Path, *, as_json: bool = False, backend: str = "auto",
                 plot: bool = True, candidates: dict[str, Path] | None = None, engine: str = "local",
                 address: str | None = None) -> int:
    """``fedge simulate``: prepare (or reuse) the demo task in ``out``, run the rounds, write ``report.json`` (and
    the plot), print a table or one JSON object. 0 when the final model beats the source model and chance."""
    from fedge.demo import _plot

    paths = DemoPaths(Path(out).resolve())
    if not as_json:
        print(f"preparing {settings.devices} devices in {paths.root}", flush=True)
    selection = None
    if candidates:  # a selection round first (fedge.simulate_selection); the rounds start from the winner
        from fedge.simulate_selection import select_and_load

        selection, fleet = select_and_load(paths, settings, candidates, backend=backend, quiet=as_json)
    else:
        fleet = load_fleet(paths, settings.devices, settings.seed, backend=backend, quiet=as_json,
                           samples_per_device=settings.samples_per_device,
                           validation_fraction=settings.validation_fraction)
    from fedge.core.device import DeviceData
    from fedge.simulate_engines import open_engine

    data = [DeviceData(f, y, k) for f, y, k in zip(fleet.feats, fleet.labels, fleet.keys, strict=True)]
    runner = open_engine(engine, fleet.trainer, paths.artifacts, data, address)  # where the devices train
    try:
        run = run_rounds(fleet, settings, engine=runner)
    finally:
        runner.close()
    report = build_sim_report(fleet, settings, run)
    report["engine"] = engine
    if selection is not None:
        report["selection"] = selection.as_dict()
    paths.report.write_text(json.dumps(report, indent=2) + "\n")
    if plot:
        _plot(report, paths.plot)
    if as_json:
        print(json.dumps(report))
    else:
        _print_table(report, run)
        if selection is not None:
            print("selection: " + ", ".join(f"{c.name} {c.accuracy:.4f}" for c in selection.ranking)
                  + f" -> {selection.winner} (rounds ran from its w0)")
    return 0 if report["passed"] else 1


def settings_from_args(devices: int, rounds: int, seed: int, *, dp_mode: str, noise_multiplier: float | None,
                       target_epsilon: float | None, clip: float, sample_rate: float, delta: float,
                       local_epochs: int, lr: float, proximal_lambda: float, fraction: float,
                       amplification: bool = False, validation_fraction: float = 0.0, local_only_epochs: int = 10,
                       personalization: str = "finetune", ditto_mu: float = 0.1,
                       deploy_tolerance: float | None = None, samples_per_device: int | None = None,
                       compression: str | None = None) -> SimSettings:
    """The settings of ``fedge simulate``'s command line (the noise multiplier resolved from ``--epsilon``)."""
    if amplification and dp_mode != "central":
        raise ConfigError("amplification", "applies to --dp-mode central only")
    dp = resolve_dp(dp_mode, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, clip=clip,
                    sample_rate=sample_rate, delta=delta, rounds=rounds, amplification=amplification)
    return SimSettings(devices=devices, rounds=rounds, seed=seed, local_epochs=local_epochs, lr=lr,
                       proximal_lambda=proximal_lambda, fraction=fraction, dp=dp, delta=delta,
                       target_epsilon=target_epsilon if dp is not None else None, amplification=amplification,
                       validation_fraction=validation_fraction, local_only_epochs=local_only_epochs,
                       personalization=personalization, ditto_mu=ditto_mu, deploy_tolerance=deploy_tolerance,
                       samples_per_device=samples_per_device, compression=compression)
