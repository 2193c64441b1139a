"""Fixture helpers for tests across the repository: a quick, small export.

``export_small(out_dir)`` exports a zoo model with fresh seeded weights (no training) in a few
seconds; ``trained=True`` first fits it for one epoch on 4,000 source images/vectors (slower).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedge.protocol.manifest import Manifest

__all__ = ["export_small"]


def export_small(
    out_dir: str | Path,
    model: str = "cnn28",
    *,
    num_classes: int = 10,
    input_dim: int = 64,
    train_batch: int = 32,
    seed: int = 0,
    trained: bool = False,
) -> Manifest:
    """Export ``model`` (``cnn28`` or ``mlp``) to ``out_dir``; returns the verified manifest."""
    from fedge.export.exporter import export_model

    if not trained:
        return export_model(model, out_dir, None, train_batch, num_classes, input_dim=input_dim, seed=seed)
    from fedge.datasets.source import load_source
    from fedge.export.pretrain import _train, model_for_input

    data = load_source("fashion-mnist" if model == "cnn28" else "digits")
    n = min(4000, len(data.y_train))
    idx = np.random.default_rng(seed).permutation(len(data.y_train))[:n]
    x, y = data.x_train[idx], data.y_train[idx]
    keras_model = _train(model_for_input(model, x), x, y, data.num_classes, seed, epochs=1)
    return export_model(keras_model, out_dir, None, train_batch)
