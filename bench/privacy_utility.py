"""Privacy/utility benchmark: what client-level central DP costs on the demo task, 1,000 simulated devices.

Runs ``fedge.simulate`` (the agent's trainer, clipping and noise, the hub's selection, aggregation, evaluation and
accounting, in one process) on the demo task: source CNN pre-trained on upright Fashion-MNIST, 1,000 devices
holding the rotated, lower-contrast, label-skewed domain (~12 samples each), the hub's held-out ``eval.npz``.

Prints (with ``--json``) ONE JSON object:

* ``simulate_1000_s``: wall time of a no-DP run, 1,000 devices x 5 rounds, every device in every round: device
  shards, backbone features and the rounds (pre-training and export are one-off: ``pretrain_export_s``).
  Target <= 300.
* ``accuracy_no_dp`` and ``accuracy_eps8`` ... ``accuracy_eps1``: final accuracy of the global model after
  ``rounds_dp`` rounds at sample rate q = 0.1 (about 100 devices a round), without DP (sample-weighted FedAvg,
  ``select_devices``) and with central DP (Poisson sampling, clip C, DP-FedAvg with the hub's noise) at
  epsilon 8, 4, 2, 1 (delta 1e-5; z from ``noise_for_epsilon`` for ``rounds_dp`` rounds, counted as
  Poisson-subsampled: the hub's ``[privacy] amplification = true``). Same data, local epochs, lr, proximal
  lambda and seed everywhere. ``accuracy_eps*_unamplified``: the same epsilons counted without amplification
  (the hub's default), no target.
* ``dp_loss_points_eps8``: accuracy points lost at epsilon 8 against no DP. Target <= 3.
* ``dp_eps2_gain_points``: the worse of the epsilon 2 and epsilon 1 models minus the source model, in points.
  Target >= 1 (DP at epsilon <= 2 still beats the source model).

plus the noise multipliers, the epsilon each run actually spent, the median update norm (what C is tuned
against) and a PNG of accuracy against epsilon (``plot``). The work folder (default ``.fedge/bench/
privacy_utility``, git-ignored) keeps the pre-trained source model between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._targets import PRIVACY_UTILITY, finish  # noqa: E402
from fedge.demo import DemoPaths, prepare  # noqa: E402
from fedge.simulate import SimFleet, SimRun, SimSettings, load_fleet, resolve_dp, run_rounds  # noqa: E402

DEVICES = 1000
TIMED_ROUNDS = 5
SAMPLE_RATE = 0.1
DELTA = 1e-5
EPSILONS = (8.0, 4.0, 2.0, 1.0)
# Tuned on this task (see the docstring of main's --help): ~12 samples a device, so 5 local epochs at lr 0.2
# (5 SGD steps) rather than the 5-device demo's 2 epochs at 0.05 (126 steps on 2,000 samples); C = 1 is about the
# median update norm (0.7-0.9 after the first rounds, ~1.5 in round 1); 50 rounds at q = 0.1.
ROUNDS_DP = 50
LOCAL_EPOCHS = 5
LR = 0.2
CLIP = 1.0
PROXIMAL_LAMBDA = 0.01  # the demo hub's
SEED = 0


def _final(run: SimRun) -> float:
    acc = run.results[-1].accuracy
    if acc is None:
        raise RuntimeError(f"round {run.results[-1].round} failed: no device was selected")
    return acc


def _median_norm(run: SimRun) -> float:
    return statistics.median(n for n in run.update_norms if n is not None)


def _settings(rounds: int, **kw: Any) -> SimSettings:
    return SimSettings(devices=DEVICES, rounds=rounds, seed=SEED, local_epochs=LOCAL_EPOCHS, lr=LR,
                       proximal_lambda=PROXIMAL_LAMBDA, delta=DELTA, **kw)


def _plot(out: Path, source: float, no_dp: float, series: dict[bool, dict[float, float]], rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(series[True])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(eps, [series[True][e] for e in eps], marker="o", label="central DP, amplified by sampling")
    ax.plot(eps, [series[False][e] for e in eps], marker="s", label="central DP, not amplified")
    ax.axhline(no_dp, color="tab:green", linestyle="--", label="no DP")
    ax.axhline(source, color="grey", linestyle=":", label="source model only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps)
    ax.set_xticklabels([f"{e:g}" for e in eps])
    ax.set_xlabel("ε after all rounds (δ = 1e-5)")
    ax.set_ylabel("accuracy on held-out device-domain data")
    ax.set_title(f"{DEVICES} simulated devices, q = {SAMPLE_RATE}, {rounds} rounds, C = {CLIP}")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run(work: Path, rounds_dp: int) -> dict[str, Any]:
    paths = DemoPaths(work.resolve())
    out: dict[str, Any] = {"devices": DEVICES, "sample_rate": SAMPLE_RATE, "delta": DELTA, "clip": CLIP,
                           "local_epochs": LOCAL_EPOCHS, "lr": LR, "proximal_lambda": PROXIMAL_LAMBDA, "seed": SEED,
                           "rounds_timed": TIMED_ROUNDS, "rounds_dp": rounds_dp, "work": str(paths.root)}

    # one-off: pre-train and export the source model (skipped when the work folder has them)
    out["pretrained_now"] = not paths.source_model.exists()
    t0 = time.perf_counter()
    prepare(paths, 1, SEED, quiet=True)
    out["pretrain_export_s"] = round(time.perf_counter() - t0, 2)

    # 1,000 devices x 5 rounds without DP, every device every round: shards + features + rounds
    t0 = time.perf_counter()
    fleet: SimFleet = load_fleet(paths, DEVICES, SEED)
    full = run_rounds(fleet, _settings(TIMED_ROUNDS))
    out["simulate_1000_s"] = round(time.perf_counter() - t0, 2)
    out.update(simulate_1000_prepare_s=round(fleet.prepare_seconds, 2),
               simulate_1000_features_s=round(fleet.features_seconds, 2),
               simulate_1000_rounds_s=round(full.seconds, 2), backend=fleet.trainer.name, dataset=fleet.info["dataset"],
               samples_per_device=round(statistics.mean(len(y) for y in fleet.labels), 2),
               source_accuracy=round(fleet.source_accuracy, 4), accuracy_1000x5_no_dp=round(_final(full), 4))

    # the DP comparison: same fleet, rounds_dp rounds at q = 0.1, without DP and at each epsilon
    t0 = time.perf_counter()
    base = run_rounds(fleet, _settings(rounds_dp, fraction=SAMPLE_RATE))
    no_dp = _final(base)
    out.update(accuracy_no_dp=round(no_dp, 4), median_update_norm_no_dp=round(_median_norm(base), 4),
               no_dp_s=round(time.perf_counter() - t0, 2))
    series: dict[bool, dict[float, float]] = {True: {}, False: {}}
    for amplified in (True, False):
        for eps in EPSILONS:
            t0 = time.perf_counter()
            dp = resolve_dp("central", noise_multiplier=None, target_epsilon=eps, clip=CLIP, sample_rate=SAMPLE_RATE,
                            delta=DELTA, rounds=rounds_dp, amplification=amplified)
            if dp is None:
                raise RuntimeError("resolve_dp returned no DP parameters for central mode")
            res = run_rounds(fleet, _settings(rounds_dp, dp=dp, target_epsilon=eps, amplification=amplified))
            series[amplified][eps] = _final(res)
            tag = f"eps{eps:g}" + ("" if amplified else "_unamplified")
            out.update({f"accuracy_{tag}": round(_final(res), 4),
                        f"noise_multiplier_{tag}": round(dp.noise_multiplier, 4),
                        f"epsilon_spent_{tag}": round(res.results[-1].epsilon or 0.0, 4),
                        f"median_update_norm_{tag}": round(_median_norm(res), 4),
                        f"{tag}_s": round(time.perf_counter() - t0, 2)})
            if amplified:
                out[f"mean_cohort_{tag}"] = round(statistics.mean(len(r.devices) for r in res.results), 1)
    by_eps = series[True]
    out["dp_loss_points_eps8"] = round((no_dp - by_eps[8.0]) * 100, 2)
    out["dp_eps2_gain_points"] = round((min(by_eps[2.0], by_eps[1.0]) - fleet.source_accuracy) * 100, 2)
    plot = paths.root / "privacy_utility.png"
    _plot(plot, fleet.source_accuracy, no_dp, series, rounds_dp)
    out["plot"] = str(plot)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--work", default=str(ROOT / ".fedge" / "bench" / "privacy_utility"),
                   help="work folder: source model, artifacts, device data, plot (reused between runs)")
    p.add_argument("--rounds", type=int, default=ROUNDS_DP, help="rounds of the DP comparison")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return finish({"bench": "bench/privacy_utility.py", **run(Path(args.work), args.rounds)}, PRIVACY_UTILITY,
                  args.json)


if __name__ == "__main__":
    raise SystemExit(main())
