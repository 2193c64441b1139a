"""Federated evaluation on the device: a fixed validation split and the scores of the heads a device can compare.

Every round a device scores, on validation data that never trains, the source head (w0 of the backbone), the
global head it received, the head it trained, its personalised head and a local-only head (trained from w0 on
this device's training split alone, once per backbone and cached). The hub averages these sample-weighted,
so an operator sees whether federating helped the devices at all. Nothing here runs under DP: the scores
describe the local data (PROTOCOL.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from fedge.core.trainer import Trainer
from fedge.core.training import evaluate
from fedge.protocol.types import HeadLike

HEADS = ("source", "global", "trained", "personal", "local_only")


def split_indices(n: int, fraction: float, key: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(train, validation)`` row indices: a permutation seeded by ``key`` (the data's sha256), so the split is
    the same on every run; at least one training row; no validation rows when ``fraction`` is 0 or n < 2."""
    n_val = min(round(n * fraction), n - 1) if n >= 2 else 0
    order = np.random.default_rng(int(key[:16], 16)).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


def head_scores(trainer: Trainer, heads: Mapping[str, HeadLike], feats: NDArray[np.float32],
                y: NDArray[np.int64]) -> dict[str, float]:
    """``val_acc_<name>`` and ``val_loss_<name>`` of every head on ``(feats, y)``, plus ``val_n``. Leaves the
    trainer holding the last head scored."""
    out: dict[str, float] = {"val_n": float(len(y))}
    for name, head in heads.items():
        trainer.set_head(head)
        score = evaluate(trainer, feats, y)
        out[f"val_acc_{name}"] = float(score.accuracy)
        out[f"val_loss_{name}"] = float(score.loss)
    return out


__all__ = ["HEADS", "head_scores", "split_indices"]
