"""Buffered asynchronous rounds against synchronous ones, on a fleet whose devices come and go.

The demo task (Fashion-MNIST, rotated device domain, label skew), ``DEVICES`` devices, each online 30 % of the
time (exponential spells), training jobs with heavy-tailed durations (a per-device speed times a log-normal draw);
``fedge.simulate_async`` runs ``ROUNDS`` synchronous rounds of ``K`` devices (over-selected as the hub does by
default: ``ceil(1.25 K)`` asked, closed at the target plus the stragglers' grace), then buffered aggregation (``K``
updates from ``K`` distinct devices per version, staleness-weighted, each device training once per version as the
agent does) for the same simulated time, on the same availability and job times, with real training (the round
core's device round) on every update. In both modes the hub's held-out deploy gate (default tolerance) decides
which versions are deployed; accuracy is measured on the other half of the hub's eval set.

``time_to_target_speedup``: the simulated time the synchronous run took to reach its final measured accuracy (and
stay within a point of it), over the time the buffered run took to do the same; the median over ``SEEDS``
availability traces (target >= 2). Both modes see the same availability and the same duration for a device's
j-th job. The same figures for a fleet of ``SMALL_FLEET`` devices (15 online at a time for a round of 13: little
room for asynchrony) are printed as ``small_fleet_*``, without a target. Prints ONE JSON object with ``--json``;
exits non-zero when the target is missed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._targets import ASYNC_ROUNDS, finish  # noqa: E402

DEVICES, SMALL_FLEET, ROUNDS, K, SEED = 100, 50, 20, 10, 0
SEEDS = (0, 1, 2, 3, 4)  # availability traces and job times; the figure is the median speedup


def one(fleet: Any, seed: int) -> dict[str, Any]:
    """One availability trace and set of job times (``seed``), both modes."""
    from fedge.simulate_async import AsyncSettings, Availability, HeldOut, run_buffered, run_sync, time_to_target

    settings = AsyncSettings(k=K, rounds=ROUNDS, seed=seed)
    availability = Availability(fleet.devices, settings, horizon=1e5)
    held_out = HeldOut(fleet, seed)
    sync = run_sync(fleet, settings, availability, held_out)
    target = sync.points[-1][1]
    t_sync = time_to_target(sync, target)
    buffered = run_buffered(fleet, settings, availability, held_out, horizon=sync.end)
    t_buf = time_to_target(buffered, target)
    return {
        "seed": seed, "sync_final_accuracy": round(target, 4), "sync_time": round(sync.end, 2),
        "sync_time_to_target": round(t_sync, 2), "sync_updates": sync.updates, "sync_lost_jobs": sync.lost_jobs,
        "sync_held_back": sync.held_back, "buffered_held_back": buffered.held_back,
        "buffered_refused": buffered.refused,
        "buffered_versions": len(buffered.points) - 1, "buffered_final_accuracy": round(buffered.points[-1][1], 4),
        "buffered_time_to_target": round(t_buf, 2) if math.isfinite(t_buf) else None,
        "buffered_updates": buffered.updates, "buffered_lost_jobs": buffered.lost_jobs,
        "speedup": round(t_sync / t_buf, 3) if math.isfinite(t_buf) and t_buf > 0 else 0.0,
    }


def fleet_runs(work: Path, devices: int) -> tuple[str, list[dict[str, Any]], list[float]]:
    """Every seed's runs on a fleet of ``devices``: (backend, runs, sorted speedups)."""
    from fedge.demo import DemoPaths
    from fedge.simulate import load_fleet

    fleet = load_fleet(DemoPaths(work), devices, SEED)
    runs = [one(fleet, seed) for seed in SEEDS]
    return fleet.trainer.name, runs, sorted(r["speedup"] for r in runs)


def run(work: Path) -> dict[str, Any]:
    backend, runs, speedups = fleet_runs(work, DEVICES)
    _, small_runs, small_speedups = fleet_runs(work, SMALL_FLEET)
    return {
        "devices": DEVICES, "rounds": ROUNDS, "k": K, "online_share": 0.3, "seeds": list(SEEDS),
        "backend": backend, "runs": runs, "speedups": speedups,
        "time_to_target_speedup": speedups[len(speedups) // 2],  # the median over the seeds
        "small_fleet_devices": SMALL_FLEET, "small_fleet_runs": small_runs, "small_fleet_speedups": small_speedups,
        "small_fleet_time_to_target_speedup": small_speedups[len(small_speedups) // 2],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--work", default=str(ROOT / ".fedge" / "bench" / "async_rounds"),
                   help="work folder (the demo task's source model, artifacts and shards; reused between runs)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return finish({"bench": "bench/async_rounds.py", **run(Path(args.work).resolve())}, ASYNC_ROUNDS, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
