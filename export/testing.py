"""Fixture helpers for tests across the repository: a quick, small export.

``export_small(out_dir)`` exports a zoo model with fresh seeded weights (no training) in a few
seconds; ``trained=True`` first fits it for one epoch on 4,000 source images/vectors (slower).
``export_mobilenet(out_dir)`` exports a Keras MobileNetV2 (alpha 0.35, 96x96x3, weights=None) with a Dense head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedge.export.tfenv import import_tensorflow
from fedge.protocol.manifest import Manifest

__all__ = ["export_mobilenet", "export_small", "mobilenet_v2"]


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


def mobilenet_v2(num_classes: int = 5, size: int = 96, seed: int = 0) -> Any:
    """The transfer-learning tutorial's model: ``MobileNetV2(alpha=0.35, weights=None, include_top=False,
    pooling="avg")`` on ``[size, size, 3]`` plus a ``Dense(num_classes)`` head named ``head0``."""
    import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, weights=None, include_top=False,
                                          pooling="avg")
    inp = keras.Input((size, size, 3), name="image")
    return keras.Model(inp, keras.layers.Dense(num_classes, name="head0")(base(inp)), name="mobilenetv2")


def export_mobilenet(out_dir: str | Path, *, quantize: str | None = None, size: int = 96, seed: int = 0,
                     report: Callable[[str], None] | None = None) -> Manifest:
    """Export :func:`mobilenet_v2` (``quantize``: int8 calibrates on 64 seeded random images)."""
    from fedge.export.exporter import export

    out = Path(out_dir)
    calibration = None
    if quantize == "int8":
        calibration = out.with_name(out.name + "-calibration.npz")
        rng = np.random.default_rng(seed)
        np.savez(calibration, x=rng.random((64, size, size, 3), dtype=np.float32))
    return export(mobilenet_v2(size=size, seed=seed), out, quantize=quantize, calibration=calibration,
                  report=report).manifest
