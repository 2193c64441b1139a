"""Source-model selection and the federated deploy gate, without I/O: a device scores candidates, the hub ranks
the reports (PROTOCOL.md, "Selection rounds").

A device fine-tunes each candidate's w0 briefly on its training split and scores it on its validation split
(:func:`score_candidate`; 0 epochs: an evaluation round scores a head as is), and reports only ``val_n`` and the
scores (:func:`report_metrics`). The hub ranks candidates by validation-size-weighted accuracy with each report's
``val_n`` capped (:func:`rank`), refuses unusable reports (:func:`report_problem`), and decides a deploy gate's
evaluation round with the same ranking (:func:`gate_verdict`).

Reports are what devices say about their own data, so no one device may decide anything (issue 21): each weighs its
``val_n`` capped at a multiple of the lower median and at what the device reported before (:func:`report_weights`;
a device's validation split is fixed), a score out of its range counts for nothing (:func:`score_in_range`), a report
that disagrees with the device's own earlier report of the same head is refused (:func:`history_problem`), and every
score is a trimmed, share-capped mean (:func:`~fedge.core.aggregators.robust_mean`): a liar at either end is dropped,
one in the middle lies between honest values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.core.aggregators import lower_median, robust_mean
from fedge.core.losses import Score
from fedge.core.trainer import Trainer
from fedge.core.training import evaluate, fit
from fedge.protocol.selection import acc_key, loss_key
from fedge.protocol.types import F32, I64, HeadLike

__all__ = ["CandidateScore", "GateVerdict", "gate_verdict", "history_problem", "paired_gain", "rank",
           "report_metrics", "report_problem", "report_weights", "score_candidate", "score_in_range"]


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


def report_weights(reports: Sequence[Mapping[str, float]], max_weight_ratio: float = 4.0,
                   caps: Sequence[float | None] | None = None) -> list[float]:
    """Each report's weight: its self-declared ``val_n``, capped at ``max_weight_ratio`` x the lower median ``val_n``
    of the reports (as FedAvg caps sample counts) and at ``caps[i]``, what the same device reported before (None:
    nothing known)."""
    counts = [max(float(r.get("val_n", 0.0)), 0.0) for r in reports]
    positive = [c for c in counts if c > 0]
    if not positive:
        return [0.0] * len(counts)
    cap = max_weight_ratio * lower_median(positive)
    own = list(caps) if caps is not None else [None] * len(counts)
    return [min(c, cap, math.inf if o is None else float(o)) for c, o in zip(counts, own, strict=True)]


def score_in_range(key: str, value: float) -> bool:
    """An accuracy in [0, 1], a loss >= 0 (both finite); anything else is not a score."""
    if not math.isfinite(value):
        return False
    return 0.0 <= value <= 1.0 if "_acc_" in key or key.startswith("val_acc") else value >= 0.0


def history_problem(report: Mapping[str, float], earlier: Mapping[str, float] | None,
                    same_heads: Mapping[str, str] | None = None) -> str | None:
    """Why a device's report contradicts what it reported before (None: it does not, or nothing is known): its
    validation split is fixed, so ``val_n`` must not grow; and a head it scored before must score the same again on
    the same rows (``same_heads``: report key -> the earlier report's key of the same head, e.g. the deployed head's
    ``val_acc_global`` of the round that made a candidate), within one validation row (a near-tie may flip when the
    device's back-end changed), and must not be left out of the report."""
    if earlier is None:
        return None
    before = earlier.get("val_n")
    if before is not None and report.get("val_n", 0.0) > before:
        return f"val_n {report.get('val_n'):g} is more than the {before:g} validation rows this device reported before"
    rows = max(report.get("val_n", 0.0), before or 0.0, 1.0)
    for key, old in (same_heads or {}).items():
        if old not in earlier:
            continue
        if key not in report:
            return f"no {key}: this device scored that head before ({old} {earlier[old]:g}) and must score it again"
        if abs(report[key] - earlier[old]) > 1.0 / rows + 1e-9:  # one row may flip (another back-end's last bits)
            return f"{key} = {report[key]:g}, but this device scored the same head {earlier[old]:g} before"
    return None


def rank(candidates: Sequence[str], reports: Iterable[Mapping[str, float]],
         max_weight_ratio: float = 4.0, *, caps: Sequence[float | None] | None = None) -> list[CandidateScore]:
    """Candidates best first: by accuracy, then lower loss, then name (deterministic).

    A report weighs its ``val_n`` (:func:`report_weights`, ``caps``: what each device reported before); a
    candidate's accuracy is the :func:`~fedge.core.aggregators.robust_mean` over the reports (a device that did not
    score it counts as 0 for it; a score out of range counts as 0 too), its loss the same over the devices that
    scored it: one device must not decide the ranking."""
    rows = [r for r in reports if r.get("val_n", 0) > 0]
    weight = report_weights(rows, max_weight_ratio, caps)
    out = []
    for name in candidates:
        akey, lkey = acc_key(name), loss_key(name)
        accs = [r[akey] if akey in r and score_in_range(akey, r[akey]) else 0.0 for r in rows]
        acc = robust_mean(accs, weight) if rows and sum(weight) > 0 else 0.0
        with_loss = [(r[lkey], w) for r, w in zip(rows, weight, strict=True)
                     if lkey in r and score_in_range(lkey, r[lkey])]
        loss = robust_mean([v for v, _ in with_loss], [w for _, w in with_loss]) if with_loss else None
        n = sum(r["val_n"] for r in rows if akey in r)
        out.append(CandidateScore(name, round(acc, 6), None if loss is None else round(loss, 6), int(n)))
    return sorted(out, key=lambda c: (-c.accuracy, float("inf") if c.loss is None else c.loss, c.name))


def paired_gain(candidate: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]],
                candidate_key: str, baseline_key: str, max_weight_ratio: float = 4.0) -> tuple[float, int] | None:
    """How much better the candidate scores than the deployed head on the same devices' validation rows, as no one
    device can steer it: per device that reported both (``candidate`` and ``baseline``: device -> report), its
    candidate score minus its baseline score; their :func:`~fedge.core.aggregators.robust_mean`, each device weighing
    its ``val_n`` capped (:func:`report_weights`, and at its baseline report's ``val_n``). ``(gain, devices)``, None
    when no device reported both.

    For the deploy gate this is the comparison one liar cannot move: unpaired, a device that scores the deployed
    head 0 and the candidate 1 is dropped from both trimmed means, but at opposite ends, which shifts them apart by
    the spread of the honest devices' scores; paired, its difference is one extreme value among the devices'
    differences, and dropped."""
    devices = [d for d in sorted(candidate) if d in baseline and score_in_range(candidate_key,
               candidate[d].get(candidate_key, math.nan)) and score_in_range(baseline_key,
               baseline[d].get(baseline_key, math.nan))]
    if not devices:
        return None
    rows = [candidate[d] for d in devices]
    caps = [baseline[d].get("val_n") for d in devices]
    weights = report_weights(rows, max_weight_ratio, caps)
    gains = [candidate[d][candidate_key] - baseline[d][baseline_key] for d in devices]
    return robust_mean(gains, weights), len(devices)


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
    """Whether ``version`` deploys after its evaluation round: only when it is not worse than the ``deployed`` head
    by more than ``tolerance`` on both counts: their federated accuracies ranked from the same reports (:func:`rank`:
    trimmed, capped means), and per device that scored both, its accuracy of ``version`` minus that of the deployed
    head on the same rows, robustly averaged (:func:`paired_gain`: one liar's difference is one extreme value, and
    dropped). Either alone can be fooled: the paired mean trims away a real loss concentrated on one device of a
    small cohort (label skew), the unpaired means drift apart when one liar sits at opposite ends of them."""
    rows = [r for r in reports if r.get("val_n", 0) > 0]
    scores = {c.name: c for c in rank([version, deployed], rows, max_weight_ratio)}
    score, base = scores[version], scores[deployed]
    keyed = {str(i): r for i, r in enumerate(rows)}
    paired = paired_gain(keyed, keyed, acc_key(version), acc_key(deployed), max_weight_ratio)
    if len(rows) < min_devices or paired is None or paired[1] < min_devices:
        return GateVerdict(False, False, f"{version} stays a candidate: {0 if paired is None else paired[1]} of "
                           f"{len(rows)} validation reports score both {version} and {deployed}, quorum "
                           f"{min_devices}")
    gain, _n = paired
    figures = (f"federated validation accuracy {score.accuracy:.4f} against the deployed {deployed}'s "
               f"{base.accuracy:.4f}, paired difference {gain:+.4f} on the same rows")
    if gain < -tolerance or score.accuracy < base.accuracy - tolerance:
        return GateVerdict(True, False, f"{version} kept as a candidate, not deployed: {figures}: worse by more than "
                           f"{tolerance:g} (fedge hub rollback --to {version} deploys it anyway)")
    return GateVerdict(True, True, f"{version} deployed: {figures} (tolerance {tolerance:g})")
