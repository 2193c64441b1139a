"""Targets of the benchmarks: each bench declares its figures and targets here, checks them, prints them beside
its figures, and exits non-zero when one is missed. ``bench/readme_table.py`` renders the README table from the
same declarations and a bench run's JSON, so figures and targets cannot drift apart."""

from __future__ import annotations

import json
import operator
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    figure: str   # key in the bench's JSON object
    op: str       # ">=" or "<="
    value: float
    what: str     # one line for the README: what the figure measures, against which baseline

    def met(self, measured: float) -> bool:
        return _OPS[self.op](measured, self.value)

    def text(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.value:g}"


TRAIN_STEP = (
    Target("litert_vs_tf_function_speedup", ">=", 10,
           "head-only train step, LiteRT vs TensorFlow `tf.function` (graph mode, warmed up)"),
    Target("litert_vs_tf_eager_speedup", ">=", 10, "head-only train step, LiteRT vs TensorFlow eager"),
    Target("feature_cache_vs_per_round", ">=", 2.5,
           "3 rounds × 5 epochs, 2,000 samples: feature cache vs features computed once per round"),
    Target("feature_cache_speedup", ">=", 8, "same, vs features recomputed every epoch"),
    Target("agent_peak_rss_mb", "<=", 150, "LiteRT agent process fine-tuning the cnn28 head (no TensorFlow)"),
    Target("mobilenet_feature_ms_per_image", "<=", 50,
           "Keras MobileNetV2 (α 0.35, 96×96×3) backbone features, LiteRT, one thread, batch 32: ms per image"),
    Target("mobilenet_head_step_ms_max", "<=", 1,
           "MobileNetV2 head (1280 → 5) train step, batch 32: the slowest of the LiteRT, ORT and NumPy trainers (ms)"),
    Target("mobilenet_agent_peak_rss_mb", "<=", 150,
           "LiteRT agent process: MobileNetV2 features of 128 images, then 5 epochs of head fine-tuning"),
    Target("mobilenet_int8_size_ratio", "<=", 0.4,
           "MobileNetV2 export with `--quantize int8`: .tflite bytes over the float export's"),
    Target("int8_top1_drop_pts", "<=", 1,
           "cnn28 pre-trained on Fashion-MNIST: top-1 points lost by the int8 backbone on the 10,000 test images"),
)

ROUND_OVERHEAD = (
    Target("overhead_s_median_20", "<=", 0.5,
           "round overhead, 20 agent processes, loopback mosquitto (wall minus the slowest device's own work)"),
    Target("overhead_s_median_500", "<=", 3, "round overhead, 500 simulated devices, one MQTT connection each"),
    Target("aggregation_mb_per_s", ">=", 500,
           "norm-bounded FedAvg (add + combine at close), 1,000 updates of 100k float32"),
    Target("hub_rss_growth_mb", "<=", 50, "hub RSS after 1,000 updates minus after 100"),
)

PRIVACY_UTILITY = (
    Target("simulate_1000_s", "<=", 300,
           "`fedge simulate`, 1,000 devices × 5 rounds, no DP, one process (pre-training excluded)"),
    Target("dp_loss_points_eps8", "<=", 3,
           "accuracy points lost with central DP at ε = 8 (δ 1e-5, q 0.1, 1,000 devices) vs the same run without DP"),
    Target("dp_eps2_gain_points", ">=", 1,
           "accuracy points the ε = 2 and ε = 1 global models (the worse of the two) gain over the source model"),
)

TRANSFER_QUALITY = (
    Target("personalized_gain_a_points", ">=", 3,
           "Fashion-MNIST demo task, 100 devices: personalised minus the better of global and local-only accuracy "
           "(points, federated on the devices' validation data)"),
    Target("global_minus_source_min_points", ">=", 0,
           "both tasks, every round after the deploy gate: lowest federated global minus source accuracy (points)"),
    Target("simulate_1000_s", "<=", 300,
           "`fedge simulate` with validation split, local-only, ditto and federated evaluation, 1,000 devices × 5 "
           "rounds"),
    Target("selection_correct", ">=", 0.9,
           "both tasks, 5 seeds, 3 candidates (source, fresh, zero-feature poor): share of seeds in which selection "
           "picked the candidate with the best fine-tuned held-out accuracy (the lower task)"),
    Target("spd40_personal_minus_local_only_points", ">=", 3,
           "demo task, 20 devices x 40 samples, 10 rounds, CLI defaults: median personal minus median local-only "
           "accuracy on the devices' held-out rows (points)"),
    Target("spd40_personal_minus_global_points", ">=", 3, "same: median personal minus median global (points)"),
    Target("demo_personal_minus_local_only_points", ">=", -0.5,
           "the demo's setting (5 devices, 5 rounds, all their data): median personal minus median local-only"),
)

SECAGG = (
    Target("secagg_overhead_s_100", "<=", 3,
           "SecAgg+ round minus plain round, 100 simulated devices (one MQTT connection each), loopback mosquitto"),
    Target("secagg_overhead_s_500", "<=", 15, "same, 500 simulated devices"),
    Target("secagg_overhead_s_1000", "<=", 15,
           "same, 1,000 simulated devices (their own cryptography runs on the bench's cores too)"),
    Target("device_bytes_500_over_10", "<=", 4,
           "bytes a device sends in a SecAgg round (4 stages), cohort of 500 over cohort of 10"),
    Target("distributed_minus_central_points", ">=", -1,
           "accuracy points at ε = 8, privacy_utility's task: distributed DP (SecAgg) minus central DP as the hub "
           "accounts it by default (neither amplified: the hub knows who took part; the amplified central figure "
           "is printed beside it)"),
)

COMPRESSION = (
    Target("bytes_ratio", ">=", 3.5,
           "one device's update frame (the demo task, metrics included): float32 bytes over int4 bytes"),
    Target("accuracy_drop_pts", "<=", 0.5,
           "the demo's 5 rounds (simulated, same seed): final deployed held-out accuracy, float32 minus int4 updates "
           "(points)"),
)

ASYNC_ROUNDS = (
    Target("time_to_target_speedup", ">=", 2,
           "demo task, 100 devices online 30 % of the time, heavy-tailed job times, deploy gate on: simulated time "
           "for synchronous rounds (over-selected, the hub's defaults) to reach their final measured accuracy over "
           "the time buffered aggregation "
           "(FedBuff) takes"),
)

ROBUST_STRATEGY = (
    Target("default_clean_cost_5", "<=", 1,
           "5 label-skewed devices, after 5 clean rounds: accuracy points the default aggregation (FedAvg, share cap, "
           "median-norm clip) costs a clean round against the old FedAvg"),
    Target("default_minus_best_robust_worst_drop_5", "<=", 0.5,
           "same, one device hostile (sign flip, noise, in-bound flip, 10^9 samples): the default's worst drop minus "
           "the better of coordinate-wise median and trimmed mean (points)"),
)

ATTACKS = (
    Target("worst_deployed_drop_pts", "<=", 2,
           "one hostile device of 5 on a `fedge fleet init` fleet (mosquitto, TLS): the most accuracy points any "
           "attack costs the deployed model against a clean round (an attack whose version is not deployed costs "
           "nothing)"),
    Target("stalls_within_limit", ">=", 1,
           "silent device, garbage SecAgg shares, withheld masked input: each round completes without the attacker "
           "within 3x a clean round + 2 s (1 = all of them)"),
)

SCALE = (
    Target("round_overhead_s", "<=", 5,
           "10,000 simulated devices (2 processes × 4 MQTT connections), loopback mosquitto, sample-weighted FedAvg: "
           "control → result wall time, hub + broker + simulator on the same 2 cores"),
)

BENCHES: dict[str, tuple[Target, ...]] = {"bench/train_step.py": TRAIN_STEP, "bench/round_overhead.py": ROUND_OVERHEAD,
                                          "bench/privacy_utility.py": PRIVACY_UTILITY,
                                          "bench/transfer_quality.py": TRANSFER_QUALITY,
                                          "bench/secagg.py": SECAGG, "bench/compression.py": COMPRESSION,
                                          "bench/async_rounds.py": ASYNC_ROUNDS, "bench/attacks.py": ATTACKS,
                                          "bench/robust_strategy.py": ROBUST_STRATEGY,
                                          "bench/scale.py": SCALE}


def check(figures: Mapping[str, Any], targets: tuple[Target, ...]) -> dict[str, Any]:
    """``{"targets": {figure: "op value"}, "missed": [figure, ...], "targets_met": bool}`` for ``figures``."""
    missed = [t.figure for t in targets if not isinstance(figures.get(t.figure), int | float)
              or not t.met(float(figures[t.figure]))]
    return {"targets": {t.figure: f"{t.op}{t.value:g}" for t in targets}, "missed": missed,
            "targets_met": not missed}


def measured() -> dict[str, Any]:
    """Where and when a bench ran (kept in its JSON, shown under the README table)."""
    import datetime as dt
    import os
    import platform
    import subprocess
    from pathlib import Path

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
            "machine": platform.machine(), "cpus": cpus, "python": platform.python_version(), "commit": commit}


def finish(figures: dict[str, Any], targets: tuple[Target, ...], as_json: bool) -> int:
    """Print the figures with their targets (one JSON object with ``--json``); 1 when a target is missed."""
    figures.update(check(figures, targets))
    figures["measured"] = measured()
    if as_json:
        print(json.dumps(figures, sort_keys=True))
    else:
        for t in targets:
            mark = "ok  " if t.figure not in figures["missed"] else "MISS"
            print(f"{mark} {t.figure:34s} {figures.get(t.figure)!s:>10}  target {t.text():8s} {t.what}")
        print()
        for k, v in sorted(figures.items()):
            if k not in {t.figure for t in targets} | {"targets", "missed", "targets_met", "measured"}:
                print(f"     {k:34s} {v}")
    if figures["missed"]:
        print(f"missed targets: {', '.join(figures['missed'])}", file=sys.stderr)
        return 1
    return 0
