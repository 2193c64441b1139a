"""The hub's round, without I/O: open (a strategy's plan or refusal) and close (aggregate, score, gate, outcome).

The daemon and the simulator both run these; what they do with the outcome (register a version, store, publish;
or keep it in memory) is theirs. A round closes in four steps: the aggregate (only with a quorum, only if
finite), its score on the hub's held-out data (``evaluate``; None without such data), the held-out gate against
the deployed version's score, and whether the round's devices gate it next (the federated gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fedge.core.aggregators import robust_mean
from fedge.core.buffered import Buffer
from fedge.core.losses import Score
from fedge.core.rounds import OpenRound, RoundParams
from fedge.core.selection import report_weights, score_in_range
from fedge.core.strategy import Strategy, held_out_verdict
from fedge.protocol.messages import RoundResult, RoundStatus
from fedge.protocol.types import Head, HeadLike, Metrics

__all__ = ["Closing", "buffered_version", "close_round", "federated_scores", "finite_or_none", "for_devices",
           "min_inputs", "robust_federated_scores"]

NOT_FINITE = "the aggregate is not finite: no version registered"


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (results carry no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None


def federated_scores(metrics: Iterable[Mapping[str, float]]) -> Metrics:
    """Validation-size-weighted means of the devices' ``val_acc_*`` / ``val_loss_*`` (and the total ``val_n``)."""
    rows = [m for m in metrics if m.get("val_n", 0) > 0]
    total = sum(m["val_n"] for m in rows)
    if not total:
        return {}
    keys = sorted({k for m in rows for k in m if k.startswith(("val_acc_", "val_loss_"))})
    out = {"val_n": float(total)}
    for k in keys:
        have = [m for m in rows if k in m]
        weight = sum(m["val_n"] for m in have)
        out[k] = round(sum(m[k] * m["val_n"] for m in have) / weight, 6)
    return out


def robust_federated_scores(metrics: Iterable[Mapping[str, float]], max_weight_ratio: float = 4.0) -> Metrics:
    """The devices' ``val_acc_*`` / ``val_loss_*`` as no one device can steer them (round results, the dashboard,
    the federated gate's baseline): each device weighs its ``val_n`` capped at ``max_weight_ratio`` x the lower
    median ``val_n`` (:func:`fedge.core.selection.report_weights`), scores outside their range (accuracies in
    [0, 1], losses >= 0) are left out, and each score is a :func:`~fedge.core.aggregators.robust_mean` (the extreme
    devices dropped). ``val_n``: the capped total."""
    rows = [m for m in metrics if m.get("val_n", 0) > 0]
    if not rows:
        return {}
    weights = report_weights(rows, max_weight_ratio)
    keys = sorted({k for m in rows for k in m if k.startswith(("val_acc_", "val_loss_"))})
    out = {"val_n": float(round(sum(weights), 3))}
    for k in keys:
        have = [(m[k], w) for m, w in zip(rows, weights, strict=True) if k in m and score_in_range(k, m[k])]
        if have:
            out[k] = round(robust_mean([v for v, _ in have], [w for _, w in have]), 6)
    return out


def for_devices(result: RoundResult) -> RoundResult:
    """A round's result as every device reads it (``round/result``): no cohort, no declines, no sample or validation
    row totals (a device learns whether a round completed and what it deployed, not who took part or how much data
    they hold); operators get the full result on ``control/round/result``."""
    return replace(result, devices=(), declined=(), n_samples=0,
                   federated={k: v for k, v in result.federated.items() if k != "val_n"})


def min_inputs(params: RoundParams) -> int:
    """The fewest masked inputs a SecAgg round's sum may hold: min_devices, and under distributed DP the m its
    noise is split over. The stages fail before unmasking when fewer can arrive."""
    return max(params.min_devices, params.dp.min_cohort if params.dp is not None else 0)


@dataclass(frozen=True)
class Closing:
    """How a round ends. ``head`` None: no version (no quorum, or ``detail`` says why). Otherwise a version is
    registered with ``accuracy``/``loss`` (None without held-out data); ``held_back`` says why the held-out gate
    keeps it a candidate (None: it passed), and ``federated_gate`` that the round's devices score it first."""

    status: RoundStatus
    head: Head | None
    accuracy: float | None = None
    loss: float | None = None
    detail: str | None = None
    held_back: str | None = None
    federated_gate: bool = False
    federated: Metrics = field(default_factory=dict)

    @property
    def deploy(self) -> bool:
        """Whether the version becomes the deployed one now."""
        return self.head is not None and self.held_back is None and not self.federated_gate


def close_round(r: OpenRound, strategy: Strategy, global_head: HeadLike, w0: HeadLike,
                evaluate: Callable[[Head], Score | None], deployed_accuracy: float | None,
                device_metrics: Iterable[Mapping[str, float]] = ()) -> Closing:
    """Close ``r``: aggregate its updates (from ``global_head``, pulled toward ``w0``), score the result with
    ``evaluate`` and gate it against ``deployed_accuracy`` (the deployed version's score by the same evaluator).
    ``device_metrics``: the accepted updates' metrics (federated evaluation; ignored in DP rounds)."""
    federated = robust_federated_scores(device_metrics) if r.params.dp is None else {}
    if not r.quorum():
        return Closing(RoundStatus.FAILED_QUORUM, None, federated=federated)
    head = r.aggregator.result(global_head, w0)
    if not all(np.isfinite(a).all() for a in head.values()):
        return Closing(RoundStatus.FAILED_QUORUM, None, detail=NOT_FINITE, federated=federated)
    score = evaluate(head)
    acc = None if score is None else finite_or_none(score.accuracy)
    loss = None if score is None else finite_or_none(score.loss)
    held_back = held_out_verdict(strategy.gates, acc, deployed_accuracy)
    gate = (held_back is None and strategy.federated_gate(r.params) and bool(r.accepted)
            and "val_acc_global" in federated)
    return Closing(RoundStatus.COMPLETED, head, acc, loss, held_back=held_back, federated_gate=gate,
                   federated=federated)


def buffered_version(buffer: Buffer, strategy: Strategy, global_head: HeadLike, w0: HeadLike,
                     evaluate: Callable[[Head], Score | None], deployed_accuracy: float | None) -> Closing:
    """A buffered round's next version from its full ``buffer`` (a ``server_lr`` step from ``global_head``, the
    version it made last), scored and passed through the held-out gate as a round's version is. No federated gate:
    the round goes on, so no evaluation round can decide its versions (without held-out data they deploy unscored)."""
    head = buffer.result(global_head, w0)
    if not all(np.isfinite(a).all() for a in head.values()):
        return Closing(RoundStatus.FAILED_QUORUM, None, detail=NOT_FINITE)
    score = evaluate(head)
    acc = None if score is None else finite_or_none(score.accuracy)
    loss = None if score is None else finite_or_none(score.loss)
    return Closing(RoundStatus.COMPLETED, head, acc, loss, held_back=held_out_verdict(strategy.gates, acc,
                                                                                          deployed_accuracy))
