"""Source-model selection in simulation: every virtual device scores every candidate with the agent's code
(``edge_agent.selection.score_candidate`` on its ``split_indices`` train/validation split, ``report_metrics``) and
the hub ranks the reports with its own ``hub.selection.rank``, as a selection round does over MQTT.

For checking the choice, each candidate also gets a reference score the fleet never sees: its w0 fine-tuned (same
epochs and learning rate) on every device's training split pooled, scored on the hub's held-out set. The
selection is ``correct`` when its winner is the candidate with the best reference score.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.evaluation import split_indices
from fedge.core.selection import CandidateScore, rank, report_metrics, score_candidate
from fedge.core.training import evaluate, fit
from fedge.demo import DemoPaths
from fedge.protocol.errors import ConfigError

if TYPE_CHECKING:
    from fedge.simulate_fleet import SimFleet, SimSettings

_SELECT = 0x5EED_0006  # seed-sequence tag of the selection fine-tunes (see fedge.simulate)

Shard = tuple[NDArray[np.float32], NDArray[np.int64]]


@dataclass(frozen=True)
class SelectionSim:
    """The fleet's ranking (best first), each candidate's reference accuracy, and the wall time."""

    ranking: list[CandidateScore]
    reference: dict[str, float]
    seconds: float

    @property
    def winner(self) -> str:
        return self.ranking[0].name

    @property
    def best(self) -> str:
        return max(sorted(self.reference), key=lambda n: self.reference[n])

    @property
    def correct(self) -> bool:
        return self.winner == self.best

    def as_dict(self) -> dict[str, Any]:
        return {"ranking": [c.as_dict() for c in self.ranking], "winner": self.winner,
                "reference_accuracy": {k: round(v, 4) for k, v in self.reference.items()}, "best": self.best,
                "correct": self.correct, "seconds": round(self.seconds, 2)}


def parse_candidates(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=ARTIFACTS_DIR`` pairs (``fedge simulate --candidate``) as an ordered mapping."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder or name in out:
            raise ConfigError("candidate", f"{spec!r}: expected a new NAME=ARTIFACTS_DIR")
        out[name] = Path(folder)
    return out


def simulate_selection(candidates: Mapping[str, Path], shards: Sequence[Shard], keys: Sequence[str],
                       eval_file: Path, *, validation_fraction: float = 0.2, epochs: int = 3, lr: float = 0.05,
                       seed: int = 0, backend: str = "auto") -> SelectionSim:
    """Run a selection round over ``shards`` (one per device; ``keys``: their data sha256, which fixes each
    device's validation split) among ``candidates`` (name -> exported artifacts folder)."""
    from fedge.protocol.manifest import load_head, load_manifest
    from fedge.runtime.data import load_local
    from fedge.runtime.trainers import open_trainer

    if len(candidates) < 1:
        raise ConfigError("candidate", "selection needs at least one candidate")
    t0 = time.perf_counter()
    splits = [split_indices(len(y), validation_fraction, k) for (_, y), k in zip(shards, keys, strict=True)]
    reports: list[dict[str, float]] = [{"val_n": float(len(va))} for _, va in splits]
    reference: dict[str, float] = {}
    sizes = [len(y) for _, y in shards]
    for ci, (name, folder) in enumerate(candidates.items()):
        trainer = open_trainer(folder, backend)
        manifest = load_manifest(folder)
        if max(int(np.max(y)) for _, y in shards) >= manifest.num_classes:
            reference[name] = 0.0  # no device can use it (the agent leaves it out of its report)
            continue
        w0 = load_head(folder)
        all_x = np.concatenate([np.asarray(x, dtype=np.float32) for x, _ in shards])
        feats = np.split(trainer.features(all_x.reshape((len(all_x), *manifest.input.shape))), np.cumsum(sizes)[:-1])
        pooled_f, pooled_y = [], []
        for i, ((_, y), (tr, va)) in enumerate(zip(shards, splits, strict=True)):
            y = np.asarray(y, dtype=np.int64)
            pooled_f.append(feats[i][tr])
            pooled_y.append(y[tr])
            if not len(va):
                continue
            s = score_candidate(trainer, w0, feats[i][tr], y[tr], feats[i][va], y[va], epochs, lr,
                                np.random.default_rng([seed, _SELECT, i, ci]))
            if s is not None:  # always: nothing stops a simulated fine-tune
                reports[i].update(report_metrics({name: s}, len(va)))
        trainer.set_head(w0)
        fit(trainer, np.concatenate(pooled_f), np.concatenate(pooled_y), epochs, lr,
            np.random.default_rng([seed, _SELECT, len(shards), ci]))
        ev = load_local(eval_file, manifest.input.shape)
        x_ev = np.asarray(ev.x, dtype=np.float32).reshape((len(ev.y), *manifest.input.shape))
        reference[name] = float(evaluate(trainer, trainer.features(x_ev), np.asarray(ev.y, np.int64)).accuracy)
    ranking = rank(list(candidates), reports)
    return SelectionSim(ranking, reference, time.perf_counter() - t0)


def select_and_load(paths: DemoPaths, settings: SimSettings, candidates: Mapping[str, Path], *,
                    backend: str = "auto", quiet: bool = True) -> tuple[SelectionSim, SimFleet]:
    """``fedge simulate --candidate``: prepare the demo task in ``paths``, run a selection round among the demo's
    own source model (``source``) and ``candidates`` (fine-tune ``settings.local_epochs`` at ``settings.lr``,
    validation split ``settings.validation_fraction`` or the agent's 0.2), then load the fleet over the winner's
    artifacts: the rounds start from the winner's w0, as the hub deploys it."""
    from fedge.simulate_fleet import device_data, fleet_from_shards

    t0 = time.perf_counter()
    info, shards, keys = device_data(paths, settings.devices, settings.seed, quiet)
    pool = {"source": paths.artifacts, **{k: Path(v).resolve() for k, v in candidates.items() if k != "source"}}
    sim = simulate_selection(pool, shards, keys, paths.data / "eval.npz",
                             validation_fraction=settings.validation_fraction or 0.2, epochs=settings.local_epochs,
                             lr=settings.lr, seed=settings.seed, backend=backend)
    fleet = fleet_from_shards(_WinnerPaths(paths.root, pool[sim.winner]), info, shards, keys, backend=backend,
                              prepare_seconds=time.perf_counter() - t0)
    return sim, fleet


@dataclass(frozen=True)
class _WinnerPaths(DemoPaths):
    """The demo's folders with the selected candidate's artifacts."""

    winner: Path = Path()

    @property
    def artifacts(self) -> Path:
        return self.winner


__all__ = ["SelectionSim", "parse_candidates", "select_and_load", "simulate_selection"]
