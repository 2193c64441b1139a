"""The head a device keeps for itself, chosen by measurement on its own training data.

Three candidates: the **global** head as received, the global head **fine-tuned** on the device's training rows, and
a **local**-only head (the source head w0 trained on those rows alone). How long to fine-tune, how long to train the
local head, and which of the three to keep are decided by k-fold cross-validation *inside the training rows*
(:func:`cv_curve`): each candidate is scored, after every epoch, on rows it did not train on, and the device keeps
the candidate and epoch count with the best held-fold accuracy (ties: lower loss, then fewer epochs, then the
simpler candidate: global, fine-tuned, local), unless that is not better than the local head by at least one
standard error of the held-fold accuracy: then the local head (training alone is the baseline a device must never
lose to, and a difference within the estimate's noise is no evidence). The chosen head is then refitted on all training rows. The device's
validation split never takes part, so the federated evaluation that scores these heads on it stays honest.

The local-only baseline the device reports is this same early-stopped local head: it gets the same epochs budget
and the same early stopping as the personalised path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedge.core.losses import ScoreSum
from fedge.core.trainer import Trainer
from fedge.core.training import fit
from fedge.protocol.types import F32, I64, Head, HeadLike

__all__ = ["CANDIDATES", "Choice", "Curve", "best_epoch", "choose", "cv_curve", "folds", "local_baseline"]

CANDIDATES = ("global", "finetune", "local")
MIN_ROWS = 4
"""Fewer training rows than this: no cross-validation (the fine-tuned head is kept, as ``finetune`` does)."""


@dataclass(frozen=True)
class Curve:
    """Held-fold accuracy and loss after 0, 1, ..., ``max_epochs`` epochs (epoch 0: the starting head as is)."""

    accuracy: tuple[float, ...]
    loss: tuple[float, ...]


@dataclass(frozen=True)
class Choice:
    """A candidate head with how many epochs it trained and its cross-validated accuracy and loss."""

    name: str
    head: Head
    epochs: int
    cv_accuracy: float
    cv_loss: float


CV_ROWS = 2048
"""Cross-validation looks at most this many training rows (a seeded sample), which bounds its cost on devices with
much data. Measured on the demo (1,600 training rows per device): a 512-row sample biased the choice toward the
fine-tuned global head (a local head gains more from the rows the sample leaves out) and cost 1.5 points against
local-only training; 2,048 chooses as the full data does. The chosen head is refitted on every row."""


def folds(n: int, k: int, seed: int) -> list[tuple[I64, I64]]:
    """``k`` (train, held) splits of ``n`` rows (of at most ``CV_ROWS`` of them, sampled): a seeded permutation cut
    into ``k`` nearly equal parts."""
    order = np.random.default_rng([seed, 0xF01D]).permutation(n)[:CV_ROWS]
    parts = np.array_split(order, k)
    out = []
    for i, held in enumerate(parts):
        train = np.concatenate([p for j, p in enumerate(parts) if j != i])
        out.append((np.sort(train).astype(np.int64), np.sort(held).astype(np.int64)))
    return out


PATIENCE = 3
"""Cross-validation stops once the pooled held-fold score has not improved for this many epochs."""


def cv_curve(trainer: Trainer, start: HeadLike, feats: F32, y: I64, splits: Sequence[tuple[I64, I64]],
             max_epochs: int, lr: float, seed: int, patience: int = PATIENCE) -> Curve:
    """The cross-validated learning curve of training ``start`` on ``(feats, y)``: every split trains on its train
    rows one epoch at a time, in lockstep, and is scored on its held rows after each epoch (pooled over the
    splits). The curve ends early once the pooled score has not improved for ``patience`` epochs."""
    heads: list[HeadLike] = [start] * len(splits)
    rngs = [np.random.default_rng([seed, 0xC0DE, i]) for i in range(len(splits))]
    first = ScoreSum()
    for _, held in splits:
        first.add(_logits(trainer, start, feats[held]), y[held])
    scores = [first.score()]
    best, since = (scores[0].accuracy, -scores[0].loss), 0
    for _ in range(max_epochs):
        total = ScoreSum()
        for i, (tr, held) in enumerate(splits):
            trainer.set_head(heads[i])
            fit(trainer, feats[tr], y[tr], 1, lr, rngs[i])
            heads[i] = trainer.get_head()
            total.add(trainer.logits(feats[held]), y[held])
        s = total.score()
        scores.append(s)
        key = (s.accuracy, -s.loss)
        best, since = (key, 0) if key > best else (best, since + 1)
        if since >= patience:
            break
    return Curve(tuple(float(s.accuracy) for s in scores), tuple(float(s.loss) for s in scores))


def _logits(trainer: Trainer, head: HeadLike, f: F32) -> F32:
    trainer.set_head(head)
    return trainer.logits(f)


def best_epoch(curve: Curve, first: int = 0) -> int:
    """The epoch count (at least ``first``) with the best held-fold accuracy; ties: lower loss, fewer epochs."""
    def key(e: int) -> tuple[float, float, int]:
        loss = curve.loss[e]
        return (-curve.accuracy[e], loss if math.isfinite(loss) else math.inf, e)

    return min(range(first, len(curve.accuracy)), key=key)


def _standard_error(p: float, n: int) -> float:
    """The standard error of an accuracy ``p`` measured on ``n`` rows."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _refit(trainer: Trainer, start: HeadLike, feats: F32, y: I64, epochs: int, lr: float, seed: int) -> Head:
    trainer.set_head(start)
    if epochs:
        fit(trainer, feats, y, epochs, lr, np.random.default_rng([seed, 0x5E7]))
    return {k: np.asarray(v, dtype=np.float32) for k, v in trainer.get_head().items()}


def local_baseline(trainer: Trainer, w0: HeadLike, feats: F32, y: I64, max_epochs: int, lr: float,
                   seed: int) -> Choice:
    """The local-only head: w0 trained on the device's rows alone, early-stopped by cross-validation (at least
    one epoch), refitted on every row. Depends only on the backbone and the data: computed once and cached."""
    n = len(y)
    if n < MIN_ROWS:
        head = _refit(trainer, w0, feats, y, max_epochs, lr, seed)
        return Choice("local", head, max_epochs, math.nan, math.nan)
    curve = cv_curve(trainer, w0, feats, y, folds(n, min(4, n), seed), max_epochs, lr, seed + 1)
    e = best_epoch(curve, first=1)
    return Choice("local", _refit(trainer, w0, feats, y, e, lr, seed), e, curve.accuracy[e], curve.loss[e])


def choose(trainer: Trainer, global_head: HeadLike, local: Choice, feats: F32, y: I64, max_epochs: int, lr: float,
           seed: int, round_id: int = 0) -> Choice:
    """The device's personal head: the best of the global head, the global head fine-tuned (early-stopped) and the
    local head, by cross-validation inside the training rows (see the module docstring). The folds are the ones
    the local head was scored on (``seed``: the device's), so the candidates are compared on the same rows;
    ``round_id`` varies only the fine-tune's shuffles."""
    n = len(y)
    if n < MIN_ROWS or not math.isfinite(local.cv_accuracy):
        return Choice("finetune", _refit(trainer, global_head, feats, y, 1, lr, seed), 1, math.nan, math.nan)
    curve = cv_curve(trainer, global_head, feats, y, folds(n, min(4, n), seed), max_epochs, lr,
                     seed + 2 + 7919 * round_id)
    e = best_epoch(curve, first=1)
    ranked = sorted(
        [("global", 0, curve.accuracy[0], curve.loss[0]), ("finetune", e, curve.accuracy[e], curve.loss[e]),
         ("local", local.epochs, local.cv_accuracy, local.cv_loss)],
        key=lambda c: (-c[2], c[3] if math.isfinite(c[3]) else math.inf, CANDIDATES.index(c[0])))
    name, epochs, acc, loss = ranked[0]
    held = sum(len(h) for _, h in folds(n, min(4, n), seed))
    if name == "local" or acc - local.cv_accuracy < _standard_error(local.cv_accuracy, held):
        return local  # the fleet's heads must beat training alone clearly, not within the estimate's noise
    head = _refit(trainer, global_head, feats, y, epochs, lr, seed)
    return Choice(name, head, epochs, acc, loss)
