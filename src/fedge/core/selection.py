"""Source-model selection and the federated deploy gate, without I/O: a device scores candidates, the hub ranks
the reports (PROTOCOL.md, "Selection rounds").

A device fine-tunes each candidate's w0 briefly on its training split and scores it on its validation split
(:func:`score_candidate`; 0 epochs: an evaluation round scores a head as is), and reports only ``val_n`` and the
scores (:func:`report_metrics`). The hub ranks candidates by validation-size-weighted accuracy with each report's
``val_n`` capped (:func:`rank`), refuses unusable reports (:func:`report_problem`), and decides a deploy gate's
evaluation round with the same ranking (:func:`gate_verdict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.core.aggregators import lower_median
from fedge.core.losses import Score
from fedge.core.trainer import Trainer
from fedge.core.training import evaluate, fit
from fedge.protocol.selection import acc_key, loss_key
from fedge.protocol.types import F32, I64, HeadLike

__all__ = ["CandidateScore", "GateVerdict", "gate_verdict", "rank", "report_metrics", "report_problem",
           "score_candidate"]


@dataclass(frozen=True)
class CandidateScore:
    """A candidate's federated validation score: accuracy weighted by the reporting devices' ``val_n`` (a device
    that did not score it counts as 0), loss over the devices that did; ``val_n`` the rows that scored it."""

    name: str
    accuracy: float
    loss: float | None
    val_n: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "accuracy": self.accuracy, "loss": self.loss, "val_n": self.val_n}


def rank(candidates: Sequence[str], reports: Iterable[Mapping[str, float]],
         max_weight_ratio: float = 4.0) -> list[CandidateScore]:
    """Candidates best first: by weighted accuracy, then lower loss, then name (deterministic).

    A report weighs its ``val_n``, capped at ``max_weight_ratio`` x the lower median ``val_n`` of the reports
    (as FedAvg caps sample counts): ``val_n`` is self-declared, and one device must not decide the ranking."""
    rows = [r for r in reports if r.get("val_n", 0) > 0]
    cap = max_weight_ratio * lower_median([float(r["val_n"]) for r in rows]) if rows else 0.0
    weight = [min(float(r["val_n"]), cap) for r in rows]
    total = sum(weight)
    out = []
    for name in candidates:
        scored = [(r, w) for r, w in zip(rows, weight, strict=True) if acc_key(name) in r]
        n = sum(r["val_n"] for r, _ in scored)
        acc = sum(r[acc_key(name)] * w for r, w in scored) / total if total else 0.0
        with_loss = [(r, w) for r, w in scored if loss_key(name) in r]
        wl = sum(w for _, w in with_loss)
        loss = sum(r[loss_key(name)] * w for r, w in with_loss) / wl if wl else None
        out.append(CandidateScore(name, round(acc, 6), None if loss is None else round(loss, 6), int(n)))
    return sorted(out, key=lambda c: (-c.accuracy, float("inf") if c.loss is None else c.loss, c.name))


def report_problem(metrics: Mapping[str, float], candidates: Iterable[str]) -> str | None:
    """Why a report's metrics are unusable (None when fine): ``val_n`` >= 1, accuracies in [0, 1], losses >= 0."""
    if metrics.get("val_n", 0) < 1:
        return "val_n must be >= 1"
    for name in candidates:
        acc, loss = metrics.get(acc_key(name)), metrics.get(loss_key(name))
        if acc is not None and not 0.0 <= acc <= 1.0:
            return f"{acc_key(name)} = {acc} is not in [0, 1]"
        if loss is not None and loss < 0:
            return f"{loss_key(name)} = {loss} is negative"
    return None


def score_candidate(trainer: Trainer, w0: HeadLike, train_f: F32, train_y: I64, val_f: F32,
                    val_y: I64, epochs: int,
                    lr: float, rng: np.random.Generator, stop: Callable[[], bool] | None = None) -> Score | None:
    """A candidate's score: its source head ``w0`` fine-tuned ``epochs`` on ``(train_f, train_y)`` (0: as is, an
    evaluation round), evaluated on ``(val_f, val_y)``. The features are the candidate backbone's. Leaves the
    trainer holding the tuned head. None when ``stop`` ended the fine-tune early (a partial fine-tune would not
    compare with the others)."""
    trainer.set_head(w0)
    if epochs > 0 and fit(trainer, train_f, train_y, epochs, lr, rng, stop=stop).stopped:
        return None
    return evaluate(trainer, val_f, val_y)


def report_metrics(scores: Mapping[str, Score], val_n: int) -> dict[str, float]:
    """The report's metrics: ``val_n`` and every scored candidate's accuracy and loss."""
    out = {"val_n": float(val_n)}
    for name, s in scores.items():
        out[acc_key(name)] = float(s.accuracy)
        out[loss_key(name)] = float(s.loss)
    return out




@dataclass(frozen=True)
class GateVerdict:
    """An evaluation round's decision: ``quorum`` (enough reports to decide), ``deploy``, and why."""

    quorum: bool
    deploy: bool
    detail: str


def gate_verdict(version: str, deployed: str, reports: Iterable[Mapping[str, float]], min_devices: int,
                 tolerance: float, max_weight_ratio: float = 4.0) -> GateVerdict:
    """Whether ``version`` deploys after its evaluation round: its federated validation accuracy against the
    ``deployed`` head's, both ranked as candidates of the same reports (the same devices, rows and capped
    weights: a tie is a tie). Not worse by more than ``tolerance``: deployed."""
    rows = list(reports)
    scores = {c.name: c for c in rank([version, deployed], rows, max_weight_ratio)}
    score, base = scores[version], scores[deployed]
    if len(rows) < min_devices or score.val_n == 0 or base.val_n == 0:
        return GateVerdict(False, False, f"{version} stays a candidate: {len(rows)} validation reports, quorum "
                           f"{min_devices}")
    if score.accuracy < base.accuracy - tolerance:
        return GateVerdict(True, False, f"{version} kept as a candidate, not deployed: federated validation "
                           f"accuracy {score.accuracy:.4f} is below the deployed {deployed}'s {base.accuracy:.4f} "
                           f"by more than {tolerance:g} (fedge hub rollback --to {version} deploys it anyway)")
    return GateVerdict(True, True, f"{version} deployed: federated validation accuracy {score.accuracy:.4f} "
                       f"(deployed {deployed} {base.accuracy:.4f} on the same rows, tolerance {tolerance:g})")
