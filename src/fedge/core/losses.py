"""The one softmax cross-entropy of the kit: training gradient, evaluation score (agent, hub and demo).

Loss everywhere is the masked mean softmax cross-entropy
``sum_i mask_i * -log_softmax(logits_i)[y_i] / max(sum_i mask_i, 1)`` (ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.types import F32


class Score(NamedTuple):
    """Mean softmax cross-entropy and accuracy of a head on labelled data (named: no order to get wrong)."""

    loss: float
    accuracy: float


def log_softmax(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """Row-wise log-softmax in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    out: NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def softmax_xent(logits: F32, y: NDArray[np.integer], mask: F32) -> tuple[float, F32]:
    """Masked mean softmax cross-entropy and its gradient with respect to the logits (float32)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    logp = z - np.log(s)
    rows = np.arange(z.shape[0])
    denom = np.float32(max(float(mask.sum()), 1.0))
    loss = float(-(mask * logp[rows, y]).sum() / denom)
    g = e / s
    g[rows, y] -= np.float32(1)
    g *= (mask / denom)[:, None]
    return loss, g.astype(np.float32, copy=False)


class ScoreSum:
    """Accumulates the cross-entropy sum and correct count over chunks; :meth:`score` gives the means."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.n = 0

    def add(self, logits: NDArray[np.floating], y: NDArray[np.integer]) -> None:
        logp = log_softmax(logits)
        yy = np.asarray(y, dtype=np.int64)
        self.loss_sum += float(-logp[np.arange(yy.shape[0]), yy].sum())
        self.correct += int((logp.argmax(axis=1) == yy).sum())
        self.n += int(yy.shape[0])

    def score(self) -> Score:
        if self.n == 0:
            raise ValueError("no examples were scored")
        return Score(self.loss_sum / self.n, self.correct / self.n)


def score(logits: NDArray[np.floating], y: NDArray[np.integer]) -> Score:
    """:class:`Score` of ``logits [N, C]`` against labels ``[N]`` (N >= 1)."""
    acc = ScoreSum()
    acc.add(logits, y)
    return acc.score()


__all__ = ["Score", "ScoreSum", "log_softmax", "score", "softmax_xent"]
