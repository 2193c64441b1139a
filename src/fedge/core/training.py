"""The local fitting loop shared by every back-end: shuffled mini-batch SGD over cached features."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import Score, ScoreSum
from fedge.core.trainer import Trainer

__all__ = ["FitResult", "Prox", "evaluate", "fit"]

EVAL_CHUNK = 1024


@dataclass(frozen=True)
class FitResult:
    """``loss_first``/``loss_last``: the loss of the first and of the last step (before each update);
    ``epoch_losses``: the sample-weighted mean step loss of every epoch begun (the last one may be partial);
    ``stopped``: ``fit``'s ``stop`` ended training before all epochs ran."""

    steps: int
    loss_first: float
    loss_last: float
    seconds: float
    epoch_losses: tuple[float, ...] = ()
    stopped: bool = False


def _check(feats: NDArray[np.float32], y: NDArray[np.integer]) -> None:
    if feats.ndim not in (2, 4):
        raise ValueError(f"features must be [N, F] (or [N, H, W, C] before a conv head), got shape {feats.shape}")
    if y.shape != (feats.shape[0],):
        raise ValueError(f"labels must be [{feats.shape[0]}], got shape {y.shape}")
    if feats.shape[0] == 0:
        raise ValueError("no samples to train on")


@dataclass(frozen=True)
class Prox:
    """A pull ``mu * ||w - anchor||^2`` on the head, applied after every step as its exact proximal operator
    ``w <- (w + 2 lr mu anchor) / (1 + 2 lr mu)``: works with every trainer (through get_head / set_head).
    Ditto uses it toward the global head; the seed's lambda term toward the source head w0."""

    anchor: Mapping[str, NDArray[np.float32]]
    mu: float


def fit(
    trainer: Trainer,
    feats: NDArray[np.float32],
    y: NDArray[np.integer],
    epochs: int,
    lr: float,
    rng: np.random.Generator,
    prox: Prox | None = None,
    stop: Callable[[], bool] | None = None,
    clock: Callable[[], float] | None = None,
) -> FitResult:
    """``epochs`` passes of SGD in batches of ``trainer.batch_size``, reshuffled with ``rng`` each epoch, with an
    optional proximal pull after every step.

    The last batch of an epoch may be short (the trainer pads and masks it). ``stop`` is asked before every batch
    (so also between epochs): once it returns True training ends there, with ``stopped`` set (the agent stops at
    the round's deadline, at its own time limit, or when the round closed). ``clock`` (seconds) times the fit for
    ``FitResult.seconds`` (0 without one: the round core reads no clock of its own).
    """
    feats = np.asarray(feats, dtype=np.float32)
    labels: NDArray[np.int64] = np.asarray(y, dtype=np.int64)
    _check(feats, labels)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    n, b = feats.shape[0], trainer.batch_size
    steps = 0
    first = last = float("nan")
    epoch_losses: list[float] = []
    stopped = False
    t0 = clock() if clock is not None else 0.0
    for _ in range(epochs):
        if stop is not None and stop():
            stopped = True
            break
        order = rng.permutation(n)
        shuffled_f, shuffled_y = feats[order], labels[order]  # one gather per epoch, then contiguous batches
        total, seen = 0.0, 0
        for s in range(0, n, b):
            if s and stop is not None and stop():
                stopped = True
                break
            fb, yb = shuffled_f[s : s + b], shuffled_y[s : s + b]
            last = trainer.train_step(fb, yb, lr)
            if prox is not None and prox.mu > 0:
                k = 2.0 * lr * prox.mu
                head = trainer.get_head()
                trainer.set_head({name: ((np.asarray(w, np.float64) + k * np.asarray(prox.anchor[name], np.float64))
                                         / (1.0 + k)).astype(np.float32) for name, w in head.items()})
            if steps == 0:
                first = last
            steps += 1
            total += last * fb.shape[0]
            seen += fb.shape[0]
        epoch_losses.append(total / seen)
        if stopped:
            break
    seconds = clock() - t0 if clock is not None else 0.0
    return FitResult(steps, first, last, seconds, tuple(epoch_losses), stopped)


def evaluate(trainer: Trainer, feats: NDArray[np.float32], y: NDArray[np.integer]) -> Score:
    """:class:`Score` (mean softmax cross-entropy, accuracy) of the trainer's head on ``(feats, y)``."""
    feats = np.asarray(feats, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    _check(feats, y)
    total = ScoreSum()
    for s in range(0, feats.shape[0], EVAL_CHUNK):
        total.add(trainer.logits(feats[s : s + EVAL_CHUNK]), y[s : s + EVAL_CHUNK])
    return total.score()
